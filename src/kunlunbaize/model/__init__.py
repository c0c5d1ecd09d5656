"""The KunlunBaize model (paper §3): layers, TransformerX block, dense residuals, MTP, cache."""

from .cache import CacheOverflowError, InferenceCache
from .model import KunlunBaize, ModelOutput
from .prefill import DEFAULT_PREFILL_CHUNK, check_prefill_chunk, prefill

__all__ = ["DEFAULT_PREFILL_CHUNK", "CacheOverflowError", "InferenceCache", "KunlunBaize", "ModelOutput",
           "check_prefill_chunk", "prefill"]
