"""RoPE inverse frequencies and attention factors of every scaling type (:mod:`kunlunbaize.rope_scaling`).

Each function computes what transformers' ``ROPE_INIT_FUNCTIONS`` entry of the same name computes, in the same
order of float32 operations, so the tables are equal (``tests/test_rope_scaling.py`` compares them):

* plain:   θ_i = base^(−2i/d)
* linear:  θ_i / s (position interpolation)
* dynamic: plain with base' = base · (s·L/L₀ − (s − 1))^(d/(d−2)) once the sequence length L exceeds L₀
* yarn:    a per-dimension blend of θ_i (fast dims) and θ_i / s (slow dims) over the ramp between the dims that
           turn β_fast and β_slow times in L₀ positions; cos/sin scaled by 0.1·ln s + 1 (the attention factor)
* llama3:  θ_i / s below the wavelength L₀/low_freq_factor, θ_i above L₀/high_freq_factor, smoothed between
"""

from __future__ import annotations

import math
from typing import Any

import torch


def plain_inv_freq(head_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """Unscaled RoPE: base^(−2i/d) for i < d/2, float32."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (its eq. 21): 0.1 · mscale · ln(scale) + 1, 1 for scale ≤ 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, base: float, s: dict[str, Any], device: torch.device | None) -> tuple[torch.Tensor, float]:
    factor, original = s["factor"], s["original_max_position_embeddings"]
    attention = s.get("attention_factor")
    if attention is None:
        mscale, all_dim = s.get("mscale"), s.get("mscale_all_dim")
        attention = (float(yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim)) if mscale and all_dim
                     else yarn_mscale(factor))
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns ``rotations`` times in L₀ positions
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, head_dim, 2).to(device=device, dtype=torch.float) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp.to(device=device, dtype=torch.float)  # 1: the dimension keeps its frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attention)


def _llama3(head_dim: int, base: float, s: dict[str, Any], device: torch.device | None) -> torch.Tensor:
    inv_freq = plain_inv_freq(head_dim, base, device)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inv_freq_and_attention(head_dim: int, base: float, scaling: dict[str, Any] | None,
                           device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies [head_dim/2] and the factor cos/sin are multiplied by. For ``dynamic`` these are
    the frequencies up to the original context (:func:`dynamic_inv_freq` gives them beyond it)."""
    kind = scaling["rope_type"] if scaling else None
    if kind == "yarn":
        return _yarn(head_dim, base, scaling, device)
    if kind == "llama3":
        return _llama3(head_dim, base, scaling, device), 1.0
    if kind == "linear":
        return plain_inv_freq(head_dim, base, device) / scaling["factor"], 1.0
    if kind == "dynamic":  # transformers' value at the original length (the bracket is 1 there, up to rounding)
        factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
        base = base * ((factor * original / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return plain_inv_freq(head_dim, base, device), 1.0


def dynamic_inv_freq(head_dim: int, base: float, scaling: dict[str, Any], length: torch.Tensor,
                     short: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK frequencies for a sequence of ``length`` tokens (a long tensor): ``short`` (the frequencies up to
    the original context) while ``length`` ≤ L₀, beyond it base' = base · (s·L/L₀ − (s − 1))^(d/(d−2)).
    Tensor operations only, so a compiled step needs no host synchronisation."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    length = torch.as_tensor(length, device=short.device)
    seq_len = torch.maximum(length, torch.tensor(original, dtype=length.dtype, device=short.device))
    grown = base * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    idx = torch.arange(0, head_dim, 2, dtype=torch.int64, device=short.device).float() / head_dim
    return torch.where(length > original, 1.0 / (grown ** idx), short)
