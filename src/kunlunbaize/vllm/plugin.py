"""vLLM's `vllm.general_plugins` entry point: registers the KunlunBaize architecture with vLLM's model registry."""

from __future__ import annotations

ARCHITECTURE = "KunlunBaizeForCausalLM"


def register() -> None:
    """Register KunlunBaizeForCausalLM (lazily, by module path) unless vLLM already knows it."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "kunlunbaize.vllm.model:KunlunBaizeForCausalLM")
