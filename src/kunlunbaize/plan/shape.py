"""What one layer, the embedding, the output head and the MTP depths weigh: parameters, training FLOPs per token
(from the architecture spec's own ``training_flops``) and stored activations per token.

The activation counts are elements per token kept for the backward pass by this project's modules (no
checkpointing), counted from what autograd saves (``tests/test_plan.py`` compares them with the saved tensors of a
real forward pass): an attention keeps its input norm's input and output, q, k and v twice (projection and rotary
output) and its output; a SwiGLU MLP keeps its norm's input and output and four hidden-width tensors (five with a
learnable eSwish β); a causal convolution keeps four width-d tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..arch import ArchSpec
from ..config import ModelConfig


@dataclass(frozen=True)
class Shape:
    """Per-layer and per-model quantities of one architecture and config at one sequence length."""

    d: int
    n_layers: int
    vocab: int
    kv_dim: int
    n_kv_heads: int
    layer_params: int
    embed_params: int  # the input embedding
    head_params: int  # the output head and final norm (0 when tied to the embedding, but for the norm)
    mtp_params: int
    dense_params: int  # the dense-residual logits (all layers)
    layer_flops: float  # training FLOPs per token of one layer
    head_flops: float  # … of the output head (and everything outside the layers and MTP depths)
    mtp_flops: float  # … of all MTP depths
    attention_share: float  # the share of all FLOPs in attention scores (never fp8)
    layer_act: float  # activation elements per token of one layer (no checkpointing)
    mtp_act: float  # … of all MTP depths
    tail_act: float  # … of the final norm and the loss's input gradient
    tp_regions: int  # sequence-parallel regions per layer (each an all-gather and a reduce-scatter forward)
    attention_ops: int  # attention operations per layer (self + cross)
    mtp_depth: int
    dense_residual: bool
    fused_loss: bool  # the loss is computed a chunk of rows at a time (no [tokens, vocabulary] logits)
    max_kernel: int  # the longest causal convolution (its k−1 tokens cross a context-parallel shard boundary)

    @property
    def params(self) -> int:
        return (self.n_layers * self.layer_params + self.embed_params + self.head_params + self.mtp_params
                + self.dense_params)

    @property
    def flops(self) -> float:
        """Training FLOPs per token of the whole model."""
        return self.n_layers * self.layer_flops + self.head_flops + self.mtp_flops


def attention_act(d: int, kv_dim: int) -> int:
    """Elements per token an attention sublayer (pre-norm included) keeps for the backward pass."""
    return 3 * d + 2 * (d + 2 * kv_dim)


def layer_activations(cfg: ModelConfig) -> int:
    """Elements per token one trunk layer keeps for the backward pass (no checkpointing)."""
    d = cfg.d_model
    attn = attention_act(d, cfg.kv_dim)
    if not cfg.transformerx:
        return attn + 2 * d + 4 * cfg.ffn_hidden
    per_scale = 4 * d + attn + 2 * d + 5 * cfg.scale_hidden  # conv, cross-attention, eSwish MLP
    return attn + 2 * d + cfg.n_scales * per_scale  # + the conv norm


def shape_of(spec: ArchSpec, cfg: ModelConfig, seq_len: int) -> Shape:
    """The :class:`Shape` of ``spec`` built from ``cfg`` at ``seq_len`` tokens."""
    shaped = spec.shape(cfg)
    flops = _flops_split(spec, cfg, seq_len)
    parts = shaped.param_breakdown()
    d, L = shaped.d_model, shaped.n_layers
    mtp = shaped.mtp_depth if spec.mtp else 0
    return Shape(
        d=d, n_layers=L, vocab=shaped.vocab_size, kv_dim=shaped.kv_dim, n_kv_heads=shaped.n_kv_heads,
        layer_params=parts["blocks"] // L, embed_params=parts["embedding"],
        head_params=parts["head"] + parts["final_norm"], mtp_params=parts["mtp"] if mtp else 0,
        dense_params=parts["dense_residual"], **flops,
        layer_act=layer_activations(shaped), mtp_act=mtp * (attention_act(d, shaped.kv_dim) + 3 * d),
        tail_act=3 * d, tp_regions=1 + 3 * shaped.n_scales if shaped.transformerx else 2,
        attention_ops=1 + shaped.n_scales, mtp_depth=mtp, dense_residual=shaped.dense_residual,
        fused_loss=spec.fused_loss, max_kernel=max(shaped.conv_kernel_sizes) if shaped.transformerx else 1,
    )


def _flops_split(spec: ArchSpec, cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """The spec's training FLOPs per token split into one layer, the MTP depths and the rest, and the attention
    scores' share: each part from the spec's own count at a changed depth, MTP depth or sequence length."""

    def count(seq: int = seq_len, **changes) -> float:
        return spec.training_flops(dataclasses.replace(cfg, **changes), seq)

    total, L = count(), cfg.n_layers
    layer = (count(n_layers=2 * L) - total) / L
    mtp = total - count(mtp_depth=0, mtp_loss_weights=None) if cfg.mtp_depth else 0.0
    # attention scores grow with the mean causal context (T + 1) / 2, the rest does not
    ctx = (seq_len + 1) / 2
    attention = (total - count(seq=1)) * ctx / (ctx - 1) if seq_len > 1 else 0.0
    return {"layer_flops": layer, "head_flops": total - L * layer - mtp, "mtp_flops": mtp,
            "attention_share": attention / total}
