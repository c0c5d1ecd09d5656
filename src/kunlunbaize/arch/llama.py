"""The side-by-side peer: Hugging Face ``LlamaForCausalLM`` with width, depth and parameters matched (its training
module: :mod:`.llama_baseline`)."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from ..config import ModelConfig
from ..rope_scaling import ORIGINAL, from_rope_parameters
from .spec import ArchSpec

if TYPE_CHECKING:
    import torch

NAME = "llama"
LLAMA_HF_TYPE = "llama"  # ``model_type`` of its transformers folder
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
        rms_norm_eps=cfg.norm_eps, rope_parameters=llama_rope_parameters(cfg), initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
    )


def llama_rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """The ``rope_parameters`` of ``cfg``'s Llama: the same RoPE scaling, in the keys ``LlamaConfig`` takes.
    ValueError for dynamic NTK: a ``LlamaConfig`` scales beyond ``max_position_embeddings``, so it cannot hold
    both the pre-training context and the extended one."""
    params = dict(cfg.rope_parameters)
    if params["rope_type"] == "dynamic":
        raise ValueError("--arch llama cannot use dynamic NTK RoPE scaling (transformers' Llama scales beyond "
                         "max_position_embeddings, which is then not the extended context); use linear, yarn or "
                         "llama3")
    if params["rope_type"] == "linear":
        params.pop(ORIGINAL, None)  # a record of ours that transformers' linear type does not take
    return params


def matched_ffn(cfg: ModelConfig) -> int:
    """The FFN width that gives a plain Llama of ``cfg``'s width and depth KunlunBaize's parameters (without MTP)."""
    target = cfg.num_params() - cfg.param_breakdown()["mtp"]
    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    fixed = V * d * (1 if cfg.tie_embeddings else 2) + d + L * (2 * d + 2 * d * d + 2 * d * cfg.kv_dim)
    return max(8, round((target - fixed) / (3 * d * L)))


def plain_config(cfg: ModelConfig) -> ModelConfig:
    """The KunlunBaize config of the matched Llama: all three switches off, the matched FFN."""
    return dataclasses.replace(cfg, transformerx=False, dense_residual=False, mtp_depth=0, mtp_loss_weights=None,
                               ffn_hidden=matched_ffn(cfg))


def training_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: a plain decoder (all three switches off) with the matched FFN."""
    return plain_config(cfg).flops_per_token(seq_len, training=True)


# LlamaForCausalLM's weight names → KunlunBaize's with all three switches off (tests/test_llama_equivalence.py)
_RENAMES = [(re.compile(p), r) for p, r in (
    (r"model\.embed_tokens\.weight", "embed.weight"), (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "head.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"blocks.\1.attn.w\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"blocks.\1.mlp.\2.weight"),
)]


def as_kunlunbaize(saved: dict[str, Any],
                   state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A Llama baseline checkpoint (or its ``kunlun export --hf`` folder) as the KunlunBaize that computes the same
    logits: all three switches off, which is a LLaMA decoder, with the FFN width of its weights; and its weights
    with KunlunBaize's names. ``saved`` is the folder's ``config.json``, ``state`` its weights. ValueError when the
    Llama is not one KunlunBaize can express (biases, another activation, a RoPE type other than linear, yarn or llama3,
    an unknown weight)."""
    if saved.get("model_type") == LLAMA_HF_TYPE:  # an export: a plain transformers folder
        cfg, prefix = _config_of_llama(saved), ""
    elif isinstance(saved.get(LLAMA_CONFIG_KEY), dict):
        cfg, prefix = _config_of_llama(saved[LLAMA_CONFIG_KEY]), WEIGHT_PREFIX
    else:  # written before checkpoints recorded their LlamaConfig: the FFN training matched
        base = ModelConfig.from_dict(model_config_dict(saved))
        cfg, prefix = dataclasses.replace(base, dense_residual=False, transformerx=False, mtp_depth=0,
                                          mtp_loss_weights=None, ffn_hidden=matched_ffn(base)), WEIGHT_PREFIX
    renamed = {}
    for key, value in state.items():
        name = key.removeprefix(prefix)
        new = next((p.sub(r, name) for p, r in _RENAMES if p.fullmatch(name)), None)
        if new is None:
            raise ValueError(f"weight {key!r} has no place in a KunlunBaize decoder")
        renamed[new] = value
    if cfg.tie_embeddings:
        renamed.pop("head.weight", None)
    return cfg, renamed


def _config_of_llama(llama: dict[str, Any]) -> ModelConfig:
    """The all-switches-off ModelConfig of a ``LlamaConfig`` dict; ValueError for what KunlunBaize lacks."""
    d, heads = int(llama["hidden_size"]), int(llama["num_attention_heads"])
    theta, scaling = from_rope_parameters(llama.get("rope_parameters") or llama.get("rope_scaling"))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    unsupported = [what for what, bad in (
        ("attention or MLP biases", llama.get("attention_bias") or llama.get("mlp_bias")),
        (f"activation {llama.get('hidden_act')}", llama.get("hidden_act", "silu") != "silu"),
        (f"head_dim {llama.get('head_dim')}", llama.get("head_dim") not in (None, d // heads)),
        (f"RoPE type {kind}", kind not in ("default", "linear", "yarn", "llama3")),
    ) if bad]
    if unsupported:
        raise ValueError(f"this Llama has {', '.join(unsupported)}, which a KunlunBaize decoder does not")
    return ModelConfig(
        vocab_size=int(llama["vocab_size"]), d_model=d, n_layers=int(llama["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(llama.get("num_key_value_heads") or heads), ffn_hidden=int(llama["intermediate_size"]),
        max_seq_len=int(llama["max_position_embeddings"]), norm_eps=float(llama["rms_norm_eps"]),
        rope_theta=float(theta if theta is not None else llama.get("rope_theta", 10000.0)), rope_scaling=scaling,
        tie_embeddings=bool(llama.get("tie_word_embeddings", False)),
        init_std=float(llama.get("initializer_range", 0.02)), dense_residual=False, transformerx=False, mtp_depth=0)


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
    hf_model_type=LLAMA_HF_TYPE,
    weight_prefix=WEIGHT_PREFIX,
    note="Llama baseline",
    as_kunlunbaize=as_kunlunbaize,
    hooks={"generator": "kunlunbaize.infer.llama:llama_generator",
           "export": "kunlunbaize.hf.export_llama:export_llama"},
    shape_config=plain_config,
)
