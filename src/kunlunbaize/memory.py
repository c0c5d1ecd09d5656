"""Memory a configuration needs at a sequence length, from the config alone (no torch): the inference state that
decoding keeps per token and per sequence, and the training activations a block keeps for its backward pass.

The inference state is what :meth:`kunlunbaize.model.cache.InferenceCache.allocate` allocates, tensor for tensor
(``tests/test_memory.py`` checks the bytes against the allocated cache). The activation count is the set of tensors
autograd saves in one block's forward, per token (the same test checks it against the tensors a tiny block saves).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of the dtypes the model runs in."""


@dataclass(frozen=True)
class StatePart:
    """One kind of per-token inference state, summed over the layers (or depths) that hold it."""

    name: str
    per_token: int
    """Bytes per token of one sequence."""
    tensors: int
    """Tensors of this kind in the cache (keys and values count as two)."""


def inference_state(cfg: ModelConfig, dtype_bytes: int = 2) -> list[StatePart]:
    """The decoding cache's parts for ``cfg`` in a dtype of ``dtype_bytes``; a sequence of N tokens needs N ×
    ``per_token`` bytes of each. Keys/values are [n_kv_heads × head_dim] per token; the conv history keeps each
    layer's normed conv input [d_model] for every token (the convolutions read its last k − 1 slots)."""
    L, kv, d = cfg.n_layers, cfg.kv_dim, cfg.d_model
    parts = [StatePart(f"self-attention K/V ({L} layers)", L * 2 * kv * dtype_bytes, 2 * L)]
    if cfg.transformerx:
        parts += [StatePart(f"cross-attention K/V of conv scale k={k} ({L} layers)", L * 2 * kv * dtype_bytes, 2 * L)
                  for k in cfg.conv_kernel_sizes]
        parts.append(StatePart(f"conv history ({L} layers)", L * d * dtype_bytes, L))
    parts += [StatePart(f"MTP depth {j} K/V of the shifted embeddings", 2 * kv * dtype_bytes, 2)
              for j in range(1, cfg.mtp_depth + 1)]
    parts.append(StatePart("padding mask (bool)", 1, 1))
    return parts


def block_activations(cfg: ModelConfig, seq_len: int) -> int:
    """Elements one block saves for its backward pass at ``seq_len`` tokens (batch 1), counted from its operations:

    * each attention (self, and one cross-attention per conv scale): rotated queries, keys, values and the
      log-sum-exp of the scores (2·kv_dim + d + n_heads per token);
    * each RMSNorm its 1/rms (1 per token);
    * plain block: the inputs of norms and projections (7·d) and the SwiGLU's gate, up, activation and products
      (4·ffn_hidden);
    * TransformerX: 5·d plus 11·d per scale (norm, projection and eSwish inputs and outputs), 5·scale_hidden per
      scale (the eSwish MLP), and each convolution's input padded with its k − 1 zeros (d·(T + k − 1)).
    """
    d, kv, T = cfg.d_model, cfg.kv_dim, seq_len
    attention = 2 * kv + d + cfg.n_heads
    if not cfg.transformerx:
        return T * (attention + 2 + 7 * d + 4 * cfg.ffn_hidden)
    n = cfg.n_scales
    per_token = (1 + n) * attention + (2 + 2 * n) + (5 + 11 * n) * d + 5 * n * cfg.scale_hidden
    return T * per_token + sum(d * (T + k - 1) for k in cfg.conv_kernel_sizes)


def checkpointed_block_activations(cfg: ModelConfig, seq_len: int) -> int:
    """Elements a block keeps with activation checkpointing: its input [T, d]; the rest is recomputed in the
    backward pass, one block at a time (that block's :func:`block_activations` exist only while it runs)."""
    return seq_len * cfg.d_model


def format_bytes(n: float) -> str:
    """``n`` bytes in B, KiB, MiB, GiB or TiB (three significant figures)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.3g} TiB" if n < 1000 else f"{n:,.0f} TiB"


def memory_report(cfg: ModelConfig, seq_len: int, dtype: str = "bfloat16") -> list[str]:
    """The lines ``kunlun info`` prints: inference state per token and per sequence of ``seq_len`` tokens, and the
    training activations per layer at that length, with and without activation checkpointing."""
    b = DTYPE_BYTES[dtype]
    parts = inference_state(cfg, b)
    width = max(len(p.name) for p in parts) + 2
    lines = [f"inference state in {dtype} (decoding cache of one sequence; per token, and at T={seq_len:,}):"]
    lines += [f"  {p.name:<{width}} {format_bytes(p.per_token):>11}/token {format_bytes(p.per_token * seq_len):>11}"
              for p in parts]
    total = sum(p.per_token for p in parts)
    lines.append(f"  {'total':<{width}} {format_bytes(total):>11}/token {format_bytes(total * seq_len):>11}")
    full, kept = block_activations(cfg, seq_len) * b, checkpointed_block_activations(cfg, seq_len) * b
    lines += [
        f"training activations per layer at T={seq_len:,}, batch 1, {dtype} (tensors a block saves for backward):",
        f"  without activation checkpointing  {format_bytes(full):>11} per layer, "
        f"{format_bytes(full * cfg.n_layers)} for {cfg.n_layers} layers",
        f"  with activation checkpointing     {format_bytes(kept):>11} per layer (its input), "
        f"{format_bytes(kept * cfg.n_layers + full)} for {cfg.n_layers} layers with one recomputed",
        "  not counted: embeddings, the output head and loss, the MTP depths, the dense-residual mix of the layer "
        "outputs, attention and matmul workspaces",
    ]
    return lines
