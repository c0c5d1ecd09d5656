"""RoPE scaling settings: the types, their keys (transformers' ``rope_parameters`` names), defaults and validation.

A model's scaling is ``ModelConfig.rope_scaling``: None (plain RoPE) or a dict such as
``{"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256}``. Its keys are those of
transformers' ``rope_parameters`` without ``rope_theta`` (that is ``ModelConfig.rope_theta``), so
``{"rope_theta": θ, **rope_scaling}`` is the ``rope_parameters`` of a transformers config. The frequencies
themselves are computed by :mod:`kunlunbaize.model.rope`.
"""

from __future__ import annotations

import math
from typing import Any

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
"""The scaling types: position interpolation, dynamic NTK, YaRN and Llama 3.1's frequency-band scaling."""

ORIGINAL = "original_max_position_embeddings"

_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor", ORIGINAL),
    "yarn": ("factor", ORIGINAL),
    "llama3": ("factor", ORIGINAL),
}
_OPTIONAL = {
    "linear": (ORIGINAL,),  # not used by the frequencies; kept as a record of the pre-training context
    "dynamic": (),
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("low_freq_factor", "high_freq_factor"),
}
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
"""Llama 3.1's values, filled in when left out (transformers requires them in the config)."""


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_rope_scaling(value: Any, max_seq_len: int) -> dict[str, Any] | None:
    """The normalised scaling of ``value`` (None, or a dict with defaults filled in and ``rope_type`` ``"default"``
    read as None); ValueError saying what is wrong in one line."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("must be None (plain RoPE) or a dict with rope_type and factor")
    kind = value.get("rope_type", value.get("type"))
    if kind in (None, "default") and set(value) <= {"rope_type", "type", "rope_theta"}:
        return None
    if kind not in ROPE_TYPES:
        raise ValueError(f"unknown RoPE scaling type {kind!r}; choose one of {', '.join(ROPE_TYPES)}")
    out = {k: v for k, v in value.items() if k not in ("type", "rope_theta")}
    out["rope_type"] = kind
    missing = [k for k in _REQUIRED[kind] if out.get(k) is None]
    if missing:
        raise ValueError(f"RoPE scaling {kind!r} needs {', '.join(missing)} (e.g. {ORIGINAL}: the context the "
                         "model was pre-trained at)")
    unknown = sorted(set(out) - {"rope_type", *_REQUIRED[kind], *_OPTIONAL[kind]})
    if unknown:
        raise ValueError(f"RoPE scaling {kind!r} has no setting {', '.join(unknown)}; it takes "
                         f"{', '.join((*_REQUIRED[kind], *_OPTIONAL[kind]))}")
    if kind == "llama3":
        out = {**LLAMA3_DEFAULTS, **out}
    _check_values(out, max_seq_len)
    return out


def _check_values(s: dict[str, Any], max_seq_len: int) -> None:
    """ValueError for the first value that makes no sense."""
    factor = s["factor"]
    if not _number(factor) or factor <= 1:
        raise ValueError(f"factor {factor!r} must be a number > 1 (1 is no scaling: leave rope_scaling unset)")
    original = s.get(ORIGINAL)
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 2):
        raise ValueError(f"{ORIGINAL} {original!r} must be an integer >= 2 (the pre-training context)")
    if original is not None and original > max_seq_len:
        raise ValueError(f"{ORIGINAL} {original} exceeds max_seq_len {max_seq_len}: scaling extends a context, "
                         "so max_seq_len must be at least the original one")
    for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "low_freq_factor",
                "high_freq_factor"):
        if key in s and s[key] is not None and (not _number(s[key]) or s[key] < 0):
            raise ValueError(f"{key} {s[key]!r} must be a finite number >= 0")
    if "truncate" in s and not isinstance(s["truncate"], bool):
        raise ValueError(f"truncate {s['truncate']!r} must be true or false")
    if s["rope_type"] == "yarn" and (s.get("beta_fast") or 32) <= (s.get("beta_slow") or 1):
        raise ValueError("beta_fast must be greater than beta_slow (defaults 32 and 1)")
    if s["rope_type"] == "llama3" and s["high_freq_factor"] <= s["low_freq_factor"]:
        raise ValueError(f"high_freq_factor {s['high_freq_factor']} must be greater than low_freq_factor "
                         f"{s['low_freq_factor']}")


def rope_parameters(theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    """transformers' ``rope_parameters`` dict of a RoPE base and a scaling (None: ``rope_type`` ``"default"``)."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_theta": theta, **scaling}


def from_rope_parameters(params: dict[str, Any] | None) -> tuple[float | None, dict[str, Any] | None]:
    """(``rope_theta`` or None, the scaling dict or None) of a transformers ``rope_parameters`` dict."""
    if not params:
        return None, None
    theta = params.get("rope_theta")
    rest = {k: v for k, v in params.items() if k != "rope_theta"}
    if rest.get("rope_type", rest.get("type", "default")) == "default":
        return theta, None
    return theta, rest
