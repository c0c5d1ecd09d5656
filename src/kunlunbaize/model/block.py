"""Trunk blocks. Each returns the sum of its residual branches, F_l(H) = Block_l(H) − H (eq. 1's Layer)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .cache import LayerCache
from .layers import CausalDSConv, SwiGLU

Rope = tuple[torch.Tensor, torch.Tensor]


class PlainBlock(nn.Module):
    """LLaMA block: x + SelfAttn(norm x), then + SwiGLU(norm x) with fixed Swish (``transformerx=False``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden, eswish=False)

    def forward(self, x: torch.Tensor, rope: Rope, start: int = 0, cache: LayerCache | None = None,
                mask: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                doc_positions: torch.Tensor | None = None) -> torch.Tensor:
        u = self.attn_norm(x)
        a = self.attn(u, u, rope, rope, start, start, cache.self_attn if cache else None, mask)
        x = x + a
        return a + self.mlp(self.mlp_norm(x))


class TransformerXBlock(nn.Module):
    """Self-attention, multi-scale causal conv features, then per scale cross-attention + eSwish MLP.

    x ← x + SelfAttn(norm x)
    h_j = eSwish(PW_j(DW_j(norm x)))                 for every kernel size k_j        (eq. 6–8)
    x ← x + CrossAttn_j(norm x, h_j);  x ← x + MLP_j(norm x)   for j = 1 … n      (eq. 9–12)
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.attn_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.n_heads, cfg.n_kv_heads)
        self.conv_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.convs = nn.ModuleList(CausalDSConv(d, k, cfg.eswish_per_channel, cfg.eswish_beta_init,
                                                cfg.conv_init)
                                   for k in cfg.conv_kernel_sizes)
        self.cross_norms = nn.ModuleList(nn.RMSNorm(d, eps=cfg.norm_eps) for _ in cfg.conv_kernel_sizes)
        self.cross_attns = nn.ModuleList(Attention(d, cfg.n_heads, cfg.n_kv_heads) for _ in cfg.conv_kernel_sizes)
        self.mlp_norms = nn.ModuleList(nn.RMSNorm(d, eps=cfg.norm_eps) for _ in cfg.conv_kernel_sizes)
        self.mlps = nn.ModuleList(
            SwiGLU(d, cfg.scale_hidden, eswish=True, per_channel=cfg.eswish_per_channel, beta_init=cfg.eswish_beta_init)
            for _ in cfg.conv_kernel_sizes
        )
        self.history_window = max(cfg.conv_kernel_sizes) - 1

    def forward(self, x: torch.Tensor, rope: Rope, start: int = 0, cache: LayerCache | None = None,
                mask: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                doc_positions: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` [B, 1, n, start+n] replaces the causal mask; ``valid`` [B, n] marks real (non-pad) tokens;
        ``doc_positions`` [B, n] (packed documents): the convolutions read nothing before a token's document."""
        u = self.attn_norm(x)
        branches = self.attn(u, u, rope, rope, start, start, cache.self_attn if cache else None, mask)
        x = x + branches

        c = self.conv_norm(x)
        if valid is not None:  # pads read as zeros: with left padding, exactly a sequence start
            c = c * valid[..., None].to(c.dtype)
        history = None
        if cache is not None and cache.conv_history is not None:
            history = cache.conv_history.read(start, self.history_window)
            cache.conv_history.write(start, c)
        # a keyword, and only when given: the default call stays exactly as it was (a tensor-parallel plan counts
        # the positional arguments)
        extra = {} if doc_positions is None else {"doc_positions": doc_positions}
        features = [conv(c, history, **extra) for conv in self.convs]

        for j, h in enumerate(features):
            kv_cache = cache.cross_attn[j] if cache is not None else None
            a = self.cross_attns[j](self.cross_norms[j](x), h, rope, rope, start, start, kv_cache, mask)
            x = x + a
            m = self.mlps[j](self.mlp_norms[j](x))
            x = x + m
            branches = branches + a + m
        return branches


def make_block(cfg: ModelConfig) -> nn.Module:
    return TransformerXBlock(cfg) if cfg.transformerx else PlainBlock(cfg)
