"""Inference: sampling, cached generation, MTP self-speculative decoding."""

from .generate import GenerationResult, generate
from .sampling import SamplingParams, distribution, sample
from .speculative import speculative_generate

__all__ = ["GenerationResult", "SamplingParams", "distribution", "generate", "sample", "speculative_generate"]
