"""kunlunbaize: reference PyTorch implementation of the KunlunBaize language model."""

from . import _hf_hook
from .config import PRESETS, ModelConfig
from .model import InferenceCache, KunlunBaize, ModelOutput

__version__ = "0.1.0"

_hf_hook.install()  # Auto classes know model_type "kunlunbaize" once transformers is imported

__all__ = ["PRESETS", "InferenceCache", "KunlunBaize", "ModelConfig", "ModelOutput", "__version__"]
