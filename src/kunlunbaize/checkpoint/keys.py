"""Parameter names of a training checkpoint (:class:`KunlunBaize`) ↔ the Hugging Face model.

Torch-only, so ``kunlun generate`` reads an exported folder without importing transformers.
The trunk sits under ``model.`` (the backbone), the output head is ``lm_head`` and the MTP depths
stay ``mtp.`` at the top, next to the head they are trained with.
"""

from __future__ import annotations

import torch

_TOP_LEVEL = ("mtp.",)


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`KunlunBaize` state dict with Hugging Face names."""
    out = {}
    for key, value in state.items():
        if key == "head.weight":
            out["lm_head.weight"] = value
        elif key.startswith(_TOP_LEVEL):
            out[key] = value
        else:
            out["model." + key] = value
    return out


def from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face ``KunlunBaizeForCausalLM`` state dict with :class:`KunlunBaize` names."""
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            out["head.weight"] = value
        elif key.startswith("model."):
            out[key[len("model."):]] = value
        elif key.startswith(_TOP_LEVEL):
            out[key] = value
        else:
            raise KeyError(f"unexpected parameter {key!r} in a KunlunBaize Hugging Face checkpoint")
    return out
