"""Inference: sampling, cached generation, MTP self-speculative decoding."""

from .generate import GenerationResult, generate
from .sampling import SamplingParams, distribution, sample
from .speculative import DraftVocab, frequent_tokens, speculative_generate
from .static import StaticDecoder

__all__ = ["DraftVocab", "GenerationResult", "SamplingParams", "StaticDecoder", "distribution", "frequent_tokens",
           "generate", "sample", "speculative_generate"]
