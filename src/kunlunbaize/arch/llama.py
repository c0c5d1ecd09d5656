"""The side-by-side peer: Hugging Face ``LlamaForCausalLM`` with width, depth and parameters matched (its training
module: :mod:`.llama_baseline`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import ModelConfig
from .spec import ArchSpec

NAME = "llama"
ARCH_KEY = "arch"  # in a Llama baseline checkpoint's config.json: the spec's name
LLAMA_CONFIG_KEY = "llama_config"  # …and the LlamaConfig of its weights
WEIGHT_PREFIX = "hf."  # weight names in a training checkpoint: the LlamaBaseline wrapper's attribute


def checkpoint_config(cfg: ModelConfig) -> dict[str, Any]:
    """A checkpoint's ``config.json``: the ModelConfig, ``arch`` and the LlamaConfig, so that the checkpoint says what
    it holds (``kunlun generate``/``export`` read it)."""
    return {ARCH_KEY: NAME, **cfg.to_dict(), LLAMA_CONFIG_KEY: matched_llama_config(cfg).to_dict()}


def model_config_dict(saved: dict) -> dict:
    """The ModelConfig fields of a checkpoint's ``config.json`` (without what :func:`checkpoint_config` adds)."""
    if not isinstance(saved, dict):  # not a config at all: left for the caller's comparison to refuse
        return saved
    return {k: v for k, v in saved.items() if k not in (ARCH_KEY, LLAMA_CONFIG_KEY)}


def matched_llama_config(cfg: ModelConfig):
    """A ``LlamaConfig`` with KunlunBaize's width, depth, heads and vocabulary, and an FFN widened so the
    parameter count equals KunlunBaize's without its MTP depths (the part that serves next-token
    prediction; MTP depths are extra heads, counted separately)."""
    from transformers import LlamaConfig

    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    return LlamaConfig(
        vocab_size=V, hidden_size=d, intermediate_size=matched_ffn(cfg), num_hidden_layers=L,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
    )


def matched_ffn(cfg: ModelConfig) -> int:
    """The FFN width that gives a plain Llama of ``cfg``'s width and depth KunlunBaize's parameters (without MTP)."""
    target = cfg.num_params() - cfg.param_breakdown()["mtp"]
    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    fixed = V * d * (1 if cfg.tie_embeddings else 2) + d + L * (2 * d + 2 * d * d + 2 * d * cfg.kv_dim)
    return max(8, round((target - fixed) / (3 * d * L)))


def training_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: a plain decoder (all three switches off) with the matched FFN."""
    plain = dataclasses.replace(cfg, transformerx=False, dense_residual=False, mtp_depth=0, mtp_loss_weights=None,
                                ffn_hidden=matched_ffn(cfg))
    return plain.flops_per_token(seq_len, training=True)


LLAMA = ArchSpec(
    name=NAME,
    title="HF Llama, matched params",
    module="kunlunbaize.arch.llama_baseline:LlamaBaseline",
    checkpoint_config=checkpoint_config,
    model_config=model_config_dict,
    training_flops=training_flops,
    set_activation_checkpointing=lambda model, on: model.set_activation_checkpointing(on),
    mtp=False,
    fused_loss=False,
    hf_model_type="llama",
    weight_prefix=WEIGHT_PREFIX,
    note="Llama baseline",
    hooks={"generator": "kunlunbaize.infer.llama:llama_generator",
           "export": "kunlunbaize.hf.export_llama:export_llama"},
)
