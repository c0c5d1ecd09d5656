"""The run's model: its architecture's spec (:mod:`kunlunbaize.arch`) built at the run's preset, overrides and
sequence length. Every architecture-specific question of the trainer is asked of that spec."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..arch import ArchSpec, get_arch
from ..config import ModelConfig
from ..model import KunlunBaize
from ..model.init import init_weights
from .config import TrainConfig


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The run's model config: the preset, ``cfg.model_overrides``, the data's vocabulary, long enough for
    ``cfg.seq_len``."""
    overrides = dict(cfg.model_overrides)
    overrides["vocab_size"] = vocab_size
    base = ModelConfig.preset(cfg.preset)
    overrides["max_seq_len"] = max(overrides.get("max_seq_len", base.max_seq_len), cfg.seq_len)
    return ModelConfig.preset(cfg.preset, **overrides)


def build_model(cfg: TrainConfig, vocab_size: int, meta: bool = False) -> tuple[nn.Module, ModelConfig, ArchSpec]:
    """The run's model, its config and its architecture's spec. The model is freshly initialised on the CPU, or with
    ``meta`` (and an architecture that initialises by name, ``spec.meta_init``) built on the meta device: no
    memory until :func:`materialize`."""
    spec = get_arch(cfg.arch)
    mcfg = model_config(cfg, vocab_size)
    return build(spec, mcfg, meta), mcfg, spec


def build(spec: ArchSpec, mcfg: ModelConfig, meta: bool) -> nn.Module:
    """``spec``'s module of ``mcfg``: on the meta device when ``meta`` and ``spec.meta_init``, else on the CPU."""
    if meta and spec.meta_init:
        with torch.device("meta"):
            return spec.build(mcfg)
    return spec.build(mcfg)


def is_meta(module: nn.Module) -> bool:
    """Whether ``module`` holds tensors on the meta device (not yet materialised)."""
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def materialize(module: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate what this rank holds of ``module`` (built on the meta device, then placed: sharded, cut into its
    pipeline stage) on ``device`` and initialise it by name (:func:`~kunlunbaize.model.init.init_weights`): the
    values the one-process model of the run's ``seed`` has, whatever the layout."""
    module.to_empty(device=device)
    init_weights(module, seed, module.config.init_std)

def dense_residual_weights(model: nn.Module) -> torch.Tensor | None:
    """The [L, L] dense-residual weights (a collective under FSDP2: call on every rank), or None: none."""
    return model.dense_residual_weights() if isinstance(model, KunlunBaize) else None
