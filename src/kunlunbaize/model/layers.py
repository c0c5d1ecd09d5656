"""Small building blocks: rotary embeddings, eSwish, the SwiGLU MLP and the causal depthwise-separable conv."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .rope import dynamic_inv_freq, inv_freq_and_attention


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) tables; ``forward(positions)`` returns ``(cos, sin)`` [T, head_dim].

    ``scaling`` is a model's ``rope_scaling`` (:mod:`kunlunbaize.rope_scaling`; None: plain RoPE): the tables are
    those of transformers' RoPE of the same type, cos/sin multiplied by its attention factor (YaRN's mscale).
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.dynamic = bool(scaling) and scaling["rope_type"] == "dynamic"
        """Dynamic NTK: the frequencies depend on the length of the sequence a forward reaches."""
        self.attention_factor = 1.0
        # Not a parameter and not saved: always recomputed, so checkpoints stay free of derived tensors.
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        device = torch.get_default_device() if device is None else torch.device(device)
        # a meta model's table: computed on the CPU (a few numbers), since torch's meta arithmetic imports
        # torch._dynamo (~3 CPU-s), then placed
        on = torch.device("cpu") if device.type == "meta" else device
        with torch.device(on):
            inv_freq, self.attention_factor = inv_freq_and_attention(self.head_dim, self.theta, self.scaling, on)
        return inv_freq.to(device)

    def reset_parameters(self) -> None:
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        """Moves follow ``model.to(device)``, but the table stays float32 under ``model.to(bfloat16)``."""
        super()._apply(fn, recurse)
        self.reset_parameters()
        return self

    def at(self, length: int | torch.Tensor | None) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The tables of a forward whose sequence reaches ``length`` tokens: with dynamic NTK every query and key
        of one forward must share its frequencies; for the other types simply this module."""
        if not self.dynamic or length is None:
            return self
        return partial(self.forward, length=length)

    def forward(self, positions: torch.Tensor,
                length: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for ``positions`` [T] or [B, T]: each [T, head_dim] or [B, T, head_dim]. ``length`` (dynamic NTK
        only): the sequence length the forward reaches; by default the largest position + 1, as transformers."""
        inv_freq = self.inv_freq
        if self.dynamic:
            if length is None:
                length = positions.max() + 1
            inv_freq = dynamic_inv_freq(self.head_dim, self.theta, self.scaling, length, inv_freq)
        freqs = positions.to(torch.float32)[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.attention_factor != 1.0:
            return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, hd] by ``cos``/``sin`` [T, hd] (shared) or [B, T, hd] (per row; rotate-half)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class ESwish(nn.Module):
    """eSwish(x) = x · σ(βx) with learnable β initialised to ``beta_init`` (1: the paper; eq. 5); β scalar or
    per channel."""

    def __init__(self, channels: int, per_channel: bool = False, beta_init: float = 1.0) -> None:
        super().__init__()
        self.beta_init = float(beta_init)
        self.beta = nn.Parameter(torch.full((channels if per_channel else 1,), self.beta_init))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.beta, self.beta_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta.to(x.dtype) * x)


SMALL_ROWS = 8
"""From 2 up to this many rows (speculative verification) a CPU matrix product runs as ``weight @ x.T``."""


@contextlib.contextmanager
def small_rows(n: int) -> Iterator[None]:
    """Within the block, :func:`linear` multiplies 2 to ``n`` rows as ``weight @ x.T`` (0: always ``F.linear``)."""
    global SMALL_ROWS
    before, SMALL_ROWS = SMALL_ROWS, n
    try:
        yield
    finally:
        SMALL_ROWS = before


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` [..., in] and ``weight`` [out, in]: ``F.linear`` without a bias.

    On a CPU, 2 to :data:`SMALL_ROWS` rows are multiplied as ``weight @ x.T``. In that orientation the BLAS streams
    the weight once, so 2–8 rows cost about what one row costs; ``F.linear``'s small-row GEMM costs 1.5–1.9× its
    one-row cost there (``benchmarks/small_gemm.py``), which made verifying k drafts cost far more than one
    decoding step. One row stays ``F.linear`` (a matrix–vector product, faster than either)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type == "cpu" and 1 < rows <= SMALL_ROWS:
        return torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous().view(*x.shape[:-1], -1)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict, no bias) whose product is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            raise ValueError("kunlunbaize.model.layers.Linear has no bias: make it with bias=False")
        return linear(x, self.weight)


class SwiGLU(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))``; act is eSwish (TransformerX) or fixed Swish/SiLU (plain)."""

    def __init__(self, d_model: int, hidden: int, eswish: bool, per_channel: bool = False,
                 beta_init: float = 1.0) -> None:
        super().__init__()
        self.gate = Linear(d_model, hidden, bias=False)
        self.up = Linear(d_model, hidden, bias=False)
        self.down = Linear(hidden, d_model, bias=False)
        self.act: nn.Module = ESwish(hidden, per_channel, beta_init) if eswish else nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


DIRECT_CONV_MAX_TOKENS = 8
"""Up to this many new tokens (decoding, speculative verification) the depthwise convolution is computed as one
multiply-add over the unfolded windows: the library convolution's fixed per-call setup cost is many times the
arithmetic there."""


class CausalDSConv(nn.Module):
    """Causal depthwise-separable 1-D convolution followed by eSwish: h = eSwish(PW(DW(x))) (eq. 6–8).

    Eq. 6 slides the kernel forward (x[l+j]), which would let position l read future tokens; we pad
    ``k − 1`` zeros on the left instead, so output l reads inputs l−k+1 … l (a causal convolution).
    """

    def __init__(self, d_model: int, kernel_size: int, per_channel: bool = False, beta_init: float = 1.0,
                 init: str = "normal") -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, bias=False)  # K_d, eq. 6
        self.pointwise = Linear(d_model, d_model, bias=False)  # K_p, eq. 7
        self.act = ESwish(d_model, per_channel, beta_init)  # eq. 8
        if init == "fan_in":  # variance-preserving starts, read by the model's initialiser
            self.depthwise.init_std = kernel_size ** -0.5
            self.pointwise.init_std = d_model ** -0.5

    def forward(self, x: torch.Tensor, history: torch.Tensor | None = None,
                doc_positions: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, T, d] new inputs; ``history`` [B, ≥k−1, d] earlier inputs (None: zeros, sequence start).
        ``doc_positions`` [B, T] (packed documents, no history): each token's position within its document; taps
        that reach before the document start read zeros, as at a sequence start."""
        if doc_positions is not None:
            return self.act(self.pointwise(self._per_document(x, doc_positions)))
        k = self.kernel_size
        xt = x.transpose(1, 2)
        if k > 1:
            if history is None or history.shape[1] == 0:
                xt = F.pad(xt, (k - 1, 0))
            else:
                past = history[:, -(k - 1):].transpose(1, 2)
                if past.shape[-1] < k - 1:
                    past = F.pad(past, (k - 1 - past.shape[-1], 0))
                xt = torch.cat((past.to(xt.dtype), xt), dim=-1)
        if x.shape[1] <= DIRECT_CONV_MAX_TOKENS:  # decoding: the windows as a view, one multiply-add (eq. 6)
            y = (xt.unfold(-1, k, 1) * self._depthwise_kernel()[:, None]).sum(-1).transpose(1, 2)
        else:
            y = self.depthwise(xt).transpose(1, 2)
        return self.act(self.pointwise(y))

    def _depthwise_kernel(self) -> torch.Tensor:
        """The depthwise kernel K_d (eq. 6) as a plain tensor [d, k], tap k−1 reading the token itself. Under tensor
        parallelism the plan replicates the weight as a DTensor: its local tensor is the whole kernel, and its
        gradient flows back as the replicated weight's."""
        weight = self.depthwise.weight
        if hasattr(weight, "to_local"):
            weight = weight.to_local()
        return weight[:, 0]

    def _per_document(self, x: torch.Tensor, doc_positions: torch.Tensor) -> torch.Tensor:
        """The depthwise convolution (eq. 6) of ``x`` [B, T, d] as one multiply-add per tap, the tap reaching
        ``s`` tokens back kept only where the token is at least ``s`` into its document."""
        k, T = self.kernel_size, x.shape[1]
        padded = F.pad(x, (0, 0, k - 1, 0))
        weight = self._depthwise_kernel().to(x.dtype)
        y = x * weight[:, k - 1]
        for s in range(1, k):
            y = y + padded[:, k - 1 - s:k - 1 - s + T] * weight[:, k - 1 - s] * (doc_positions >= s)[..., None]
        return y
