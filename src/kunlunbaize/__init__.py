"""kunlunbaize: reference PyTorch implementation of the KunlunBaize language model."""

from .config import PRESETS, ModelConfig
from .model import InferenceCache, KunlunBaize, ModelOutput

__version__ = "0.1.0"

__all__ = ["PRESETS", "InferenceCache", "KunlunBaize", "ModelConfig", "ModelOutput", "__version__"]
