"""The causal convolutions' input history, kept in vLLM's paged KV cache.

A TransformerX block's depthwise convolutions read the last ``k − 1`` inputs ``c`` (the block's ``conv_norm``
output) before each token. :class:`ConvHistory` stores every token's ``c`` in KV-cache pages of its own: one or more
storage ``Attention`` layers with the model's KV-cache spec (same KV heads and head size, so they join the model's
one KV-cache group and vLLM budgets their memory), whose pages are written and read here by slot (block table ×
block size + offset) and never attended over. A token's window is then gathered by position from its request's block
table, so prefill, decoding, chunked prefill, continuous batching and prefix caching all see exactly the values the
tokens before them produced: ``c`` at position p depends only on tokens ≤ p, so a page reused by prefix caching holds
the right history too. (vLLM's own short-conv state — ``MambaBase``/``short_conv`` — keeps one rolling state per
request instead, which cannot be shared by prefix caching; see docs/guide-serve.md.)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention


class ConvHistory(nn.Module):
    """Every token's conv input ``c`` [d] in paged storage; :meth:`windows` gives each new token its last ``width``
    inputs (oldest first, the token itself last; zeros before a sequence start)."""

    def __init__(self, d_model: int, width: int, n_heads: int, n_kv_heads: int, head_dim: int, cache_config,
                 prefix: str) -> None:
        """Storage layers ``{prefix}0``, ``{prefix}1`` …, as many as ``d_model`` needs."""
        super().__init__()
        self.d_model = d_model
        self.width = width
        self.per_store = 2 * n_kv_heads * head_dim  # the K and V halves of one storage layer's token slot
        self.stores = nn.ModuleList(
            Attention(n_heads, head_dim, head_dim ** -0.5, num_kv_heads=n_kv_heads, cache_config=cache_config,
                      prefix=f"{prefix}{i}")
            for i in range(math.ceil(d_model / self.per_store)))

    def _metadata(self):
        """This step's attention metadata of the storage layers, or None (a profiling or warm-up run)."""
        md = get_forward_context().attn_metadata
        if md is None:
            return None
        if isinstance(md, list):
            md = md[0]
        md = md.get(self.stores[0].layer_name) if isinstance(md, dict) else md
        if md is None or any(s.kv_cache.numel() == 0 for s in self.stores):
            return None
        return md

    def _pages(self, store: Attention) -> torch.Tensor:
        """The storage layer's KV-cache tensor as [blocks, block_size, …] token slots: a view of vLLM's CPU layout
        [blocks, kv_heads, block_size, 2·head_dim], or of the [2, blocks, block_size, kv_heads, head_dim] layout of
        the GPU backends."""
        kv = store.kv_cache
        if kv.dim() == 4:
            return kv.permute(0, 2, 1, 3)
        if kv.dim() == 5 and kv.shape[0] == 2:
            return kv.permute(1, 2, 0, 3, 4)
        raise NotImplementedError(f"KunlunBaize's conv history does not know the KV-cache layout {tuple(kv.shape)} "
                                  f"of the {type(store.impl).__name__} attention backend")

    def windows(self, c: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[N, width, d] for the N tokens of ``c`` [N, d] at ``positions`` [N]: writes ``c`` to the tokens' slots,
        then reads each token's window back from its request's pages."""
        n_tokens = c.shape[0]
        out = c.new_zeros(n_tokens, self.width, self.d_model)
        out[:, -1] = c
        md = self._metadata()
        if md is None:
            return out
        n = md.num_actual_tokens
        qsl = md.query_start_loc.to(torch.long)
        request = torch.repeat_interleave(torch.arange(qsl.numel() - 1, device=c.device), qsl[1:] - qsl[:-1])
        pos = positions[:n].to(torch.long)
        want = pos[:, None] - torch.arange(self.width - 1, -1, -1, device=c.device)[None, :]  # [n, width]
        valid = want >= 0
        want = want.clamp_min(0)
        block_size = self._pages(self.stores[0]).shape[1]
        block_table = md.block_table.to(torch.long)
        blocks = block_table[request[:, None], want // block_size]
        offsets = want % block_size
        padded = torch.nn.functional.pad(c[:n], (0, self.per_store * len(self.stores) - self.d_model))
        gathered = []
        for i, store in enumerate(self.stores):
            pages = self._pages(store)
            pages[blocks[:, -1], offsets[:, -1]] = padded[:, i * self.per_store:(i + 1) * self.per_store].view(
                n, *pages.shape[2:]).to(pages.dtype)
            gathered.append(pages[blocks, offsets].reshape(n, self.width, -1))
        history = torch.cat(gathered, dim=-1)[..., :self.d_model].to(c.dtype)
        out[:n] = history * valid[..., None].to(c.dtype)
        return out
