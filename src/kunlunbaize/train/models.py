"""What the training loop asks of an architecture (``--arch kunlunbaize`` or ``llama``), one small function per
question, so that every architecture-specific decision of the trainer lives here."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..model import KunlunBaize
from .config import TrainConfig


def build_model(cfg: TrainConfig, vocab_size: int) -> tuple[nn.Module, ModelConfig]:
    """The run's model (on the CPU, freshly initialised) and its config, long enough for ``cfg.seq_len``."""
    overrides = dict(cfg.model_overrides)
    overrides["vocab_size"] = vocab_size
    base = ModelConfig.preset(cfg.preset)
    overrides["max_seq_len"] = max(overrides.get("max_seq_len", base.max_seq_len), cfg.seq_len)
    mcfg = ModelConfig.preset(cfg.preset, **overrides)
    if cfg.arch == "llama":
        from .llama_baseline import LlamaBaseline

        return LlamaBaseline(mcfg), mcfg
    return KunlunBaize(mcfg), mcfg


def training_flops(arch: str, model: nn.Module, mcfg: ModelConfig, seq_len: int) -> float:
    """Analytic training FLOPs per token (for tokens/s → MFU)."""
    if arch == "llama":
        hf = model.hf_config
        plain = dataclasses.replace(mcfg, transformerx=False, dense_residual=False, mtp_depth=0,
                                    mtp_loss_weights=None, ffn_hidden=hf.intermediate_size)
        return plain.flops_per_token(seq_len, training=True)
    return mcfg.flops_per_token(seq_len, training=True)


def loss_kwargs(arch: str) -> dict[str, Any]:
    """Forward arguments of the training loss: KunlunBaize's loss without [B, T, V] logits (model/fused_loss.py);
    the HF Llama baseline computes its own."""
    return {"logits": False} if arch == "kunlunbaize" else {}


def n_loss_terms(arch: str, mcfg: ModelConfig) -> int:
    """Entries of a step's loss vector: the joint loss, the main loss and one per MTP depth."""
    return 2 + mcfg.mtp_depth if arch == "kunlunbaize" else 2


def enable_activation_checkpointing(model: nn.Module, arch: str) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    if arch == "llama":
        model.set_activation_checkpointing(True)
    else:
        model.gradient_checkpointing = True


def dense_residual_weights(model: nn.Module) -> torch.Tensor | None:
    """The [L, L] dense-residual weights (a collective under FSDP2: call on every rank), or None: none."""
    return model.dense_residual_weights() if isinstance(model, KunlunBaize) else None
