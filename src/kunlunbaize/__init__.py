"""kunlunbaize: reference PyTorch implementation of the KunlunBaize language model."""

from __future__ import annotations

from typing import Any

from . import _hf_hook
from .config import PRESETS, ModelConfig

__version__ = "0.1.0"

_hf_hook.install()  # Auto classes know model_type "kunlunbaize" once transformers is imported

_MODEL_NAMES = ("InferenceCache", "KunlunBaize", "ModelOutput")


def __getattr__(name: str) -> Any:
    """The model classes, imported on first use: ``import kunlunbaize`` (and so ``kunlun --help``) needs no torch."""
    if name in _MODEL_NAMES:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PRESETS", "InferenceCache", "KunlunBaize", "ModelConfig", "ModelOutput", "__version__"]
