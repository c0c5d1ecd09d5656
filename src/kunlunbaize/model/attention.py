"""Grouped-query attention through ``F.scaled_dot_product_attention``, for self- and cross-attention.

One module serves all three uses in the model: causal self-attention, the TransformerX
cross-attention from the token stream to a convolution scale's features (eq. 9–12), and the MTP
cross-attention from a depth's hidden states to the shifted token embeddings (eq. 18–20). In
every case a query at position ``i`` may attend to key slots ``s <= i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVBuffer
from .layers import Linear, apply_rotary


def causal_mask(q_start: int, n_q: int, n_k: int, device: torch.device) -> torch.Tensor | bool:
    """Boolean mask [n_q, n_k], True where key slot s <= query position q_start + i; or, where no mask tensor is
    needed, whether the attention is plain (square) causal: True, or False when every query sees every key
    (one query at the last slot, as in decoding)."""
    if q_start == 0 and n_q == n_k:
        return True
    if q_start >= n_k - 1:
        return False
    q_pos = torch.arange(q_start, q_start + n_q, device=device)
    return torch.arange(n_k, device=device)[None, :] <= q_pos[:, None]


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads and rotary positions on queries and keys."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.wq = Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = Linear(n_heads * self.head_dim, d_model, bias=False)

    def project_kv(
        self, kv_input: torch.Tensor, rope_k: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, Hkv, m, hd] of ``kv_input`` [B, m, d], keys rotated by ``rope_k``."""
        B, m, _ = kv_input.shape
        k = self.wk(kv_input).view(B, m, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(kv_input).view(B, m, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(k, *rope_k), v

    def forward(
        self,
        x: torch.Tensor,
        kv_input: torch.Tensor,
        rope_q: tuple[torch.Tensor, torch.Tensor],
        rope_k: tuple[torch.Tensor, torch.Tensor],
        q_start: int = 0,
        kv_start: int = 0,
        cache: KVBuffer | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` [B, n, d] (positions q_start…) to ``kv_input`` [B, m, d] (key slots kv_start…).

        With a ``cache`` the new keys/values are written at slot ``kv_start`` and the query attends to
        every slot before ``kv_start + m``; without one it attends to the new keys only (kv_start = 0).
        ``mask`` [B, 1, n, ≥ kv_start + m] (True = may attend) replaces the causal mask, e.g. for padding.
        """
        B, n, _ = x.shape
        q = self.wq(x).view(B, n, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, *rope_q)
        k, v = self.project_kv(kv_input, rope_k)
        if cache is not None:
            k, v = cache.write(kv_start, k, v)
        elif kv_start != 0:
            raise ValueError("kv_start > 0 needs a cache holding the earlier keys")
        if k.shape[2] == 0:  # nothing to attend to yet (an MTP depth before its first token): no update
            return torch.zeros_like(x)
        n_k = k.shape[2]
        mask = causal_mask(q_start, n, n_k, x.device) if mask is None else mask[..., :n_k]
        causal = mask is True
        if isinstance(mask, bool):
            mask = None
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(B, n, self.n_heads * self.head_dim))
