"""The paper's architecture: :class:`~kunlunbaize.model.KunlunBaize`."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .spec import ArchSpec


def _set_activation_checkpointing(model: Any, on: bool) -> None:
    model.gradient_checkpointing = on


def _model_config(saved: dict[str, Any]) -> dict[str, Any]:
    return dict(saved) if isinstance(saved, dict) else saved  # not a dict: left for the caller to refuse


KUNLUNBAIZE = ArchSpec(
    name="kunlunbaize",
    title="KunlunBaize",
    module="kunlunbaize.model:KunlunBaize",
    checkpoint_config=ModelConfig.to_dict,
    model_config=_model_config,
    training_flops=lambda cfg, seq_len: cfg.flops_per_token(seq_len, training=True),
    set_activation_checkpointing=_set_activation_checkpointing,
    mtp=True,
    fused_loss=True,
    hf_model_type="kunlunbaize",
    meta_init=True,
    hooks={"generator": "kunlunbaize.infer.generator:kunlunbaize_generator",
           "export": "kunlunbaize.hf.export:export_hf",
           "parallelize": "kunlunbaize.train.parallel.kunlunbaize:parallelize",
           "context_parallel": "kunlunbaize.train.parallel.context:context_parallel"},
)
