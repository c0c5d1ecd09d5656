"""Hugging Face transformers integration (install the ``hf`` extra).

Importing :mod:`kunlunbaize` registers ``model_type = "kunlunbaize"`` with ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM`` as soon as transformers is imported too (see
:mod:`kunlunbaize._hf_hook`), so ``AutoModelForCausalLM.from_pretrained(folder)`` works on an
exported folder without ``trust_remote_code``.
"""

from __future__ import annotations

from .configuration import KunlunBaizeConfig
from .export import export_hf
from .modeling import KunlunBaizeCausalLMOutput, KunlunBaizeForCausalLM, KunlunBaizeModel, KunlunBaizePreTrainedModel


def register() -> None:
    """Register the classes with transformers' Auto factories (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(KunlunBaizeConfig.model_type, KunlunBaizeConfig, exist_ok=True)
    AutoModel.register(KunlunBaizeConfig, KunlunBaizeModel, exist_ok=True)
    AutoModelForCausalLM.register(KunlunBaizeConfig, KunlunBaizeForCausalLM, exist_ok=True)


register()

__all__ = ["KunlunBaizeCausalLMOutput", "KunlunBaizeConfig", "KunlunBaizeForCausalLM", "KunlunBaizeModel",
           "KunlunBaizePreTrainedModel", "export_hf", "register"]
