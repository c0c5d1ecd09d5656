"""``KunlunBaizeConfig``: the Hugging Face view of :class:`kunlunbaize.config.ModelConfig`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from transformers import PretrainedConfig

from ..config import ModelConfig
from ..rope_scaling import from_rope_parameters

_FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("tie_embeddings", "rope_scaling")]


class KunlunBaizeConfig(PretrainedConfig):
    """Every :class:`ModelConfig` field under its own name, plus the usual transformers names as aliases
    (``hidden_size`` → ``d_model``, ``num_hidden_layers`` → ``n_layers``, ``max_position_embeddings`` →
    ``max_seq_len`` …) and ``tie_word_embeddings`` for ``tie_embeddings``; the RoPE settings (``rope_theta`` and
    ``rope_scaling``) also as transformers' ``rope_parameters``, which is what ``config.json`` carries and what wins
    when both are given. Invalid values raise ``ValueError`` naming the field, exactly as :class:`ModelConfig`
    does."""

    model_type = "kunlunbaize"
    auto_map: ClassVar[dict[str, str]] = {}
    """No remote code: the classes ship with the package. TRL reads ``config.auto_map`` unguarded for every model
    that is not built into transformers; a class attribute, so it is never written to ``config.json``."""
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "ffn_hidden",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
        "initializer_range": "init_std",
        "tie_embeddings": "tie_word_embeddings",
    }

    def __init__(self, tie_word_embeddings: bool | None = None, use_cache: bool = True, **kwargs: Any) -> None:
        for alias, name in self.attribute_map.items():
            if alias in kwargs and name != "tie_word_embeddings":
                kwargs[name] = kwargs.pop(alias)
        if tie_word_embeddings is None:
            tie_word_embeddings = kwargs.pop("tie_embeddings", False)
        defaults = ModelConfig()
        values = {name: kwargs.pop(name, getattr(defaults, name)) for name in _FIELDS}
        values["rope_scaling"] = kwargs.pop("rope_scaling", None)
        theta, scaling = from_rope_parameters(kwargs.pop("rope_parameters", None))
        if theta is not None or scaling is not None:
            values["rope_theta"] = values["rope_theta"] if theta is None else theta
            values["rope_scaling"] = scaling
        arch = ModelConfig(**values, tie_embeddings=tie_word_embeddings)  # validates, names a bad field
        for name in _FIELDS:
            value = getattr(arch, name)
            setattr(self, name, list(value) if isinstance(value, tuple) else value)  # JSON-friendly
        self.rope_parameters = arch.rope_parameters
        if arch.rope_parameters["rope_type"] in ("linear", "dynamic"):  # ours record the pre-training context too
            self.ignore_keys_at_rope_validation = {"original_max_position_embeddings"}
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_model_config(self) -> ModelConfig:
        """The validated :class:`ModelConfig` this configuration describes."""
        theta, scaling = from_rope_parameters(getattr(self, "rope_parameters", None))
        values = {name: getattr(self, name) for name in _FIELDS}
        values["rope_theta"] = values["rope_theta"] if theta is None else theta
        return ModelConfig(**values, rope_scaling=scaling, tie_embeddings=bool(self.tie_word_embeddings))

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> KunlunBaizeConfig:
        """From a :class:`ModelConfig`; ``kwargs`` add transformers settings (``eos_token_id`` …)."""
        values = {name: getattr(config, name) for name in _FIELDS}
        return cls(tie_word_embeddings=config.tie_embeddings, rope_parameters=config.rope_parameters, **values,
                   **kwargs)
