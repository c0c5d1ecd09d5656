"""Per-token values kept in vLLM's paged KV cache, written and read by the model itself (not attended over).

:class:`PagedStore` gives every token a slot of ``width`` values in KV-cache pages of its own: one or more storage
``Attention`` layers with the model's KV-cache spec (same KV heads and head size, so they join the model's one
KV-cache group and vLLM budgets their memory). Their pages are addressed by slot (block table × block size + offset)
from this step's attention metadata, so prefill, decoding, chunked prefill, continuous batching and prefix caching
all see what the tokens before them wrote. The conv history (:mod:`.conv_history`) and the MTP depths' keys and
values (:mod:`.mtp`) live in such stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention


@dataclass
class Step:
    """This step's tokens as the store sees them: the attention metadata, each token's request row [n] and
    position [n], for the first ``n`` (unpadded) tokens."""

    metadata: object
    request: torch.Tensor
    positions: torch.Tensor
    n: int


class PagedStore(nn.Module):
    """``width`` values per token in the KV-cache pages of storage ``Attention`` layers ``{prefix}0``, ``{prefix}1``
    …, as many as ``width`` needs."""

    def __init__(self, width: int, n_heads: int, n_kv_heads: int, head_dim: int, cache_config, prefix: str) -> None:
        super().__init__()
        self.width = width
        self.per_store = 2 * n_kv_heads * head_dim  # the K and V halves of one storage layer's token slot
        self.stores = nn.ModuleList(
            Attention(n_heads, head_dim, head_dim ** -0.5, num_kv_heads=n_kv_heads, cache_config=cache_config,
                      prefix=f"{prefix}{i}")
            for i in range(math.ceil(width / self.per_store)))

    def step(self, positions: torch.Tensor) -> Step | None:
        """This step's tokens, or None in a profiling or warm-up run (no metadata, no pages yet)."""
        md = get_forward_context().attn_metadata
        if md is None:
            return None
        if isinstance(md, list):
            md = md[0]
        md = md.get(self.stores[0].layer_name) if isinstance(md, dict) else md
        if md is None or any(s.kv_cache.numel() == 0 for s in self.stores):
            return None
        n = md.num_actual_tokens
        qsl = md.query_start_loc.to(torch.long)
        request = torch.repeat_interleave(torch.arange(qsl.numel() - 1, device=positions.device), qsl[1:] - qsl[:-1])
        return Step(md, request[:n], positions[:n].to(torch.long), n)

    def _pages(self, store: Attention) -> torch.Tensor:
        """The storage layer's KV-cache tensor as [blocks, block_size, …] token slots: a view of vLLM's CPU layout
        [blocks, kv_heads, block_size, 2·head_dim], or of the [2, blocks, block_size, kv_heads, head_dim] layout of
        the GPU backends."""
        kv = store.kv_cache
        if kv.dim() == 4:
            return kv.permute(0, 2, 1, 3)
        if kv.dim() == 5 and kv.shape[0] == 2:
            return kv.permute(1, 2, 0, 3, 4)
        raise NotImplementedError(f"KunlunBaize's paged store does not know the KV-cache layout {tuple(kv.shape)} "
                                  f"of the {type(store.impl).__name__} attention backend")

    def _slots(self, step: Step, request: torch.Tensor, want: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of positions ``want`` (any shape, ≥ 0) of the requests ``request`` (same shape)."""
        block_size = self._pages(self.stores[0]).shape[1]
        block_table = step.metadata.block_table.to(torch.long)
        column = (want // block_size).clamp_max(block_table.shape[1] - 1)
        return block_table[request, column], want % block_size

    def write(self, step: Step, values: torch.Tensor) -> None:
        """Store ``values`` [≥ n, width] at the slots of the step's first n tokens."""
        blocks, offsets = self._slots(step, step.request, step.positions)
        padded = torch.nn.functional.pad(values[:step.n], (0, self.per_store * len(self.stores) - self.width))
        for i, store in enumerate(self.stores):
            pages = self._pages(store)
            pages[blocks, offsets] = padded[:, i * self.per_store:(i + 1) * self.per_store].view(
                step.n, *pages.shape[2:]).to(pages.dtype)

    def read(self, step: Step, want: torch.Tensor) -> torch.Tensor:
        """[n, W, width]: the values at positions ``want`` [n, W] (≥ 0) of each of the step's tokens' request."""
        blocks, offsets = self._slots(step, step.request[:, None].expand_as(want), want)
        gathered = [self._pages(store)[blocks, offsets].reshape(*want.shape, -1) for store in self.stores]
        return torch.cat(gathered, dim=-1)[..., :self.width]
