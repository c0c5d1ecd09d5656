"""Multi-token prediction interaction module (MTPIM, §3.3).

Depth j = 1 … D reads the previous depth's hidden states g^{j−1} (g^0 = final trunk hidden state)
and the shared embedding of the sequence shifted by j:

    g^j_i      = g^{j−1}_i + C_j(RMSNorm(g^{j−1})_i, RMSNorm(E(t_{s+j}))_{s ≤ i})     (eq. 15–20)
    logits^j_i = O_j(RMSNorm(g^j_i))       — predicts token t_{i+j+1}                  (eq. 21)

The causal mask lets position i see shifted tokens up to t_{i+j} and no further. Near the end of a
sequence (i + j ≥ T) a position sees every shifted token there is. The residual ``g^{j−1} +`` is our
addition: without it the depth's output would be a convex mix of token embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .cache import KVBuffer
from .documents import Documents
from .layers import Linear, RotaryEmbedding, linear


class MTPDepth(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.hidden_norm = nn.RMSNorm(d, eps=cfg.norm_eps)  # eq. 16
        self.embed_norm = nn.RMSNorm(d, eps=cfg.norm_eps)  # eq. 17
        self.cross_attn = Attention(d, cfg.n_heads, cfg.n_kv_heads)  # C_j, eq. 18–19
        self.out_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.head = None if cfg.mtp_share_head else Linear(d, cfg.vocab_size, bias=False)  # O_j, eq. 21


class MultiTokenPrediction(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.depths = nn.ModuleList(MTPDepth(cfg) for _ in range(cfg.mtp_depth))

    def depth_step(
        self,
        j: int,
        g: torch.Tensor,
        emb: torch.Tensor,
        rope: RotaryEmbedding,
        q_start: int,
        kv_start: int,
        cache: KVBuffer | None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One depth (1-based ``j``): g^j from g^{j−1} [B, n, d] at positions q_start…, and the embeddings
        ``emb`` [B, m, d] of the tokens that fill depth j's key slots kv_start… (slot s holds t_{s+j}).

        With padding, ``positions`` [B, ≥ q_start+n] are the per-row rotary positions of every slot and
        ``mask`` the trunk's [B, 1, n, ·] mask (key slot s is usable iff token s is real). ``keep`` [B, n, 1]
        (packed documents) drops the update of the queries that have no key."""
        depth = self.depths[j - 1]
        n, m = g.shape[1], emb.shape[1]
        if positions is None:
            rope_q = rope(torch.arange(q_start, q_start + n, device=g.device))
            rope_k = rope(torch.arange(kv_start, kv_start + m, device=g.device))
        else:
            rope_q = rope(positions[:, q_start:q_start + n])
            rope_k = rope(positions[:, kv_start:kv_start + m])
        update = depth.cross_attn(
            depth.hidden_norm(g), depth.embed_norm(emb), rope_q, rope_k, q_start, kv_start, cache, mask
        )
        return g + (update if keep is None else update * keep.to(update.dtype))

    def write_keys(self, token_emb: torch.Tensor, rope: RotaryEmbedding, start: int, caches: list[KVBuffer],
                   positions: torch.Tensor | None = None) -> None:
        """Store every depth's keys/values for a chunk at positions start… without computing any logits
        (a verification pass of speculative decoding needs the keys, not the depths' predictions)."""
        for j, depth in enumerate(self.depths, start=1):
            skip, kv_start = max(0, j - start), max(0, start - j)
            emb = token_emb[:, skip:]
            if emb.shape[1] == 0:
                continue
            pos = (torch.arange(kv_start, kv_start + emb.shape[1], device=emb.device) if positions is None
                   else positions[:, kv_start:kv_start + emb.shape[1]])
            k, v = depth.cross_attn.project_kv(depth.embed_norm(emb), rope(pos))
            caches[j - 1].write(kv_start, k, v)

    def head_weight(self, j: int, main_head_weight: torch.Tensor) -> torch.Tensor:
        """O_j's weight [V, d] (eq. 21): the depth's own, or the trunk head's when shared."""
        head = self.depths[j - 1].head
        return head.weight if head is not None else main_head_weight

    def head_input(self, j: int, g: torch.Tensor, main_head_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth j's output head (eq. 21) as (its input, its weight): the logits are ``input @ weight.T``."""
        return self.depths[j - 1].out_norm(g), self.head_weight(j, main_head_weight)

    def forward(
        self,
        hidden: torch.Tensor,
        token_emb: torch.Tensor,
        rope: RotaryEmbedding,
        main_head_weight: torch.Tensor,
        start: int = 0,
        caches: list[KVBuffer] | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        documents: Documents | None = None,
    ) -> list[torch.Tensor]:
        """Logits of every depth for a chunk of tokens at positions start … start+n−1.

        ``hidden`` is the trunk's final hidden state and ``token_emb`` the shared embedding E(t) of the
        same chunk [B, n, d]. Depth j's key slot s holds t_{s+j}, so this chunk fills slots
        max(0, start−j) … start+n−1−j. With ``documents`` (packed documents, no cache) each depth reads only
        its query's document (:meth:`.documents.Documents.mtp_mask`), at ``positions`` within it.
        """
        return [linear(h, w) for h, w in self.head_inputs(hidden, token_emb, rope, main_head_weight, start, caches,
                                                          positions, mask, documents)]

    def head_inputs(
        self,
        hidden: torch.Tensor,
        token_emb: torch.Tensor,
        rope: RotaryEmbedding,
        main_head_weight: torch.Tensor,
        start: int = 0,
        caches: list[KVBuffer] | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        documents: Documents | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What :meth:`forward` computes, stopped before the output heads: per depth (head input, head weight)."""
        out = []
        g = hidden
        for j in range(1, len(self.depths) + 1):
            skip = max(0, j - start)  # chunk tokens with index < j have no slot in depth j
            kv_start = max(0, start - j)
            depth_mask, keep = documents.mtp_mask(j) if documents is not None else (mask, None)
            g = self.depth_step(j, g, token_emb[:, skip:], rope, start, kv_start,
                                caches[j - 1] if caches is not None else None, positions, depth_mask, keep)
            out.append(self.head_input(j, g, main_head_weight))
        return out
