"""The KunlunBaize model (paper §3): layers, TransformerX block, dense residuals, MTP, cache."""

from .cache import CacheOverflowError, InferenceCache
from .model import KunlunBaize, ModelOutput

__all__ = ["CacheOverflowError", "InferenceCache", "KunlunBaize", "ModelOutput"]
