"""The run's model: its architecture's spec (:mod:`kunlunbaize.arch`) built at the run's preset, overrides and
sequence length. Every architecture-specific question of the trainer is asked of that spec."""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ArchSpec, get_arch
from ..config import ModelConfig
from ..model import KunlunBaize
from .config import TrainConfig


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The run's model config: the preset, ``cfg.model_overrides``, the data's vocabulary, long enough for
    ``cfg.seq_len``."""
    overrides = dict(cfg.model_overrides)
    overrides["vocab_size"] = vocab_size
    base = ModelConfig.preset(cfg.preset)
    overrides["max_seq_len"] = max(overrides.get("max_seq_len", base.max_seq_len), cfg.seq_len)
    return ModelConfig.preset(cfg.preset, **overrides)


def build_model(cfg: TrainConfig, vocab_size: int) -> tuple[nn.Module, ModelConfig, ArchSpec]:
    """The run's model (on the CPU, freshly initialised), its config and its architecture's spec."""
    spec = get_arch(cfg.arch)
    mcfg = model_config(cfg, vocab_size)
    return spec.build(mcfg), mcfg, spec


def dense_residual_weights(model: nn.Module) -> torch.Tensor | None:
    """The [L, L] dense-residual weights (a collective under FSDP2: call on every rank), or None: none."""
    return model.dense_residual_weights() if isinstance(model, KunlunBaize) else None
