"""Hugging Face transformers integration (install the ``hf`` extra).

Importing :mod:`kunlunbaize` registers ``model_type = "kunlunbaize"`` with ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM`` as soon as transformers is imported too (see
:mod:`kunlunbaize._hf_hook`), so ``AutoModelForCausalLM.from_pretrained(folder)`` works on an
exported folder without ``trust_remote_code``.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

TRANSFORMERS_SUPPORTED = ("5.0", "6")
"""The transformers versions the integration supports: from the first, up to (excluding) the second.
Keep in step with the ``hf`` and ``train`` extras of pyproject.toml."""


def check_transformers_version(version: str = transformers.__version__) -> None:
    """Raise ``ImportError`` saying what to install if ``version`` of transformers is not supported."""
    low, high = TRANSFORMERS_SUPPORTED
    if not Version(low) <= Version(version) < Version(high):
        raise ImportError(f"KunlunBaize supports transformers >={low},<{high} but transformers {version} is "
                          f"installed: run pip install 'transformers>={low},<{high}'")


check_transformers_version()

from .configuration import KunlunBaizeConfig  # noqa: E402
from .export import export_hf  # noqa: E402
from .modeling import (  # noqa: E402
    KunlunBaizeCausalLMOutput,
    KunlunBaizeForCausalLM,
    KunlunBaizeForSequenceClassification,
    KunlunBaizeModel,
    KunlunBaizePreTrainedModel,
)


def register() -> None:
    """Register the classes with transformers' Auto factories (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoConfig.register(KunlunBaizeConfig.model_type, KunlunBaizeConfig, exist_ok=True)
    AutoModel.register(KunlunBaizeConfig, KunlunBaizeModel, exist_ok=True)
    AutoModelForCausalLM.register(KunlunBaizeConfig, KunlunBaizeForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(KunlunBaizeConfig, KunlunBaizeForSequenceClassification,
                                                exist_ok=True)


register()

__all__ = ["TRANSFORMERS_SUPPORTED", "KunlunBaizeCausalLMOutput", "KunlunBaizeConfig", "KunlunBaizeForCausalLM",
           "KunlunBaizeForSequenceClassification", "KunlunBaizeModel", "KunlunBaizePreTrainedModel",
           "check_transformers_version", "export_hf", "register"]
