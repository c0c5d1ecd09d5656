"""Inference cache: preallocated per-slot buffers for every stateful part of the model.

Every buffer is indexed by absolute slot, so writing is idempotent and cropping back to a shorter
length (speculative decoding's rollback) only moves ``length``: later writes overwrite stale slots.

What is held, per trunk layer:
  * self-attention keys/values;
  * TransformerX: the conv input history (the causal convolutions read the k−1 previous inputs)
    and, per conv scale, the keys/values of the conv features used by that scale's cross-attention;
and per MTP depth j the keys/values of the shifted token embeddings, where slot s holds token s + j.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import ModelConfig


class CacheOverflowError(ValueError):
    """A write would go past the cache's capacity."""


class KVBuffer:
    """Keys and values [B, H_kv, capacity, head_dim] written by slot."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.k = torch.zeros(batch, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def write(self, start: int | torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` at slots start…start+m−1; return all slots before start+m.

        A tensor ``start`` (a compiled static step: shapes must not depend on it) returns every slot; the caller
        masks those at or past start+m, and checks the capacity beforehand."""
        if isinstance(start, torch.Tensor):
            slots = start + torch.arange(k.shape[2], device=start.device)
            self.k.index_copy_(2, slots, k.to(self.k.dtype))
            self.v.index_copy_(2, slots, v.to(self.v.dtype))
            return self.k, self.v
        end = start + k.shape[2]
        if end > self.capacity:
            raise CacheOverflowError(
                f"cache holds {self.capacity} positions but slot {end - 1} was written; "
                "create the cache with a larger max_len (at most the model's max_seq_len)"
            )
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class HistoryBuffer:
    """Past inputs [B, capacity, d] of the causal convolutions, written by position."""

    def __init__(self, batch: int, capacity: int, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.x = torch.zeros(batch, capacity, dim, device=device, dtype=dtype)

    def read(self, start: int | torch.Tensor, window: int) -> torch.Tensor:
        """The inputs at positions max(0, start−window) … start−1; for a tensor ``start``, always ``window``
        positions, zeros before position 0 (what the causal convolution pads with)."""
        if isinstance(start, torch.Tensor):
            idx = start - window + torch.arange(window, device=start.device)
            past = self.x.index_select(1, idx.clamp_min(0))
            return past * (idx >= 0)[None, :, None].to(past.dtype)
        return self.x[:, max(0, start - window):start]

    def write(self, start: int | torch.Tensor, x: torch.Tensor) -> None:
        if isinstance(start, torch.Tensor):
            self.x.index_copy_(1, start + torch.arange(x.shape[1], device=start.device), x.to(self.x.dtype))
            return
        end = start + x.shape[1]
        if end > self.x.shape[1]:
            raise CacheOverflowError(
                f"cache holds {self.x.shape[1]} positions but position {end - 1} was written; "
                "create the cache with a larger max_len (at most the model's max_seq_len)"
            )
        self.x[:, start:end] = x


@dataclass
class LayerCache:
    self_attn: KVBuffer
    conv_history: HistoryBuffer | None = None
    cross_attn: list[KVBuffer] = field(default_factory=list)


@dataclass
class InferenceCache:
    """All decoding state of one model for a batch; ``length`` tokens have been processed."""

    layers: list[LayerCache]
    mtp: list[KVBuffer]
    max_len: int
    valid: torch.Tensor
    """[B, max_len] bool: which slots hold real tokens (False: left padding)."""
    length: int = 0
    padded: bool = False
    """Whether any token was fed with an attention mask (then every later forward uses the masked path)."""

    is_compileable = False
    """Read by Hugging Face ``generate`` (not a dataclass field): this cache is not a static ``Cache``."""
    is_linear = (False,)
    """Read by Hugging Face ``generate`` when continuing a cache: it holds attention K/V, so prompts are sliced by
    :meth:`get_seq_length` (not a dataclass field, like the two below)."""
    is_croppable = True
    """Read by Hugging Face ``generate``: :meth:`crop` rolls back (assisted decoding)."""

    @property
    def batch_size(self) -> int:
        return self.layers[0].self_attn.k.shape[0]

    def get_seq_length(self) -> int:
        """Number of cached tokens (the name Hugging Face ``generate`` uses)."""
        return self.length

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor indexed by batch row."""
        return [t for t, _ in self.slot_tensors()]

    def slot_tensors(self) -> list[tuple[torch.Tensor, int]]:
        """Every tensor indexed by (batch row, slot), with the dimension that holds the slots."""
        out = [(self.valid, 1)]
        for kv in [*(lc.self_attn for lc in self.layers), *(c for lc in self.layers for c in lc.cross_attn),
                   *self.mtp]:
            out += [(kv.k, 2), (kv.v, 2)]
        out += [(lc.conv_history.x, 1) for lc in self.layers if lc.conv_history is not None]
        return out

    def rows(self, n: int) -> InferenceCache:
        """A cache of the first ``n`` rows that shares this one's storage (same length, slots and padding):
        what a forward writes through it lands here."""
        return self.view(n, self.max_len)

    def view(self, rows: int, slots: int) -> InferenceCache:
        """A cache of the first ``rows`` rows and their first ``slots`` slots that shares this one's storage (same
        length and padding): what a forward of tokens ending within those slots writes through it lands here."""

        def kv(b: KVBuffer) -> KVBuffer:
            view = KVBuffer.__new__(KVBuffer)
            view.k, view.v = b.k[:rows, :, :slots], b.v[:rows, :, :slots]
            return view

        def history(h: HistoryBuffer | None) -> HistoryBuffer | None:
            if h is None:
                return None
            view = HistoryBuffer.__new__(HistoryBuffer)
            view.x = h.x[:rows, :slots]
            return view

        layers = [LayerCache(kv(lc.self_attn), history(lc.conv_history), [kv(c) for c in lc.cross_attn])
                  for lc in self.layers]
        return InferenceCache(layers=layers, mtp=[kv(b) for b in self.mtp], max_len=slots,
                              valid=self.valid[:rows, :slots], length=self.length, padded=self.padded)

    def place_row(self, row: int, source: InferenceCache, source_row: int = 0) -> None:
        """Copy the ``source.length`` slots of ``source``'s row into row ``row`` so that they end at this cache's
        ``length`` (left padding before them: zeros, not valid). Both caches must hold the same parts."""
        n, end = source.length, self.length
        if n > end:
            raise ValueError(f"a row of {n} tokens does not fit before slot {end}: shift the cache first")
        pairs = zip(self.slot_tensors(), source.slot_tensors(), strict=True)
        for (dst, dim), (src, _) in pairs:
            target = dst[row]
            target.narrow(dim - 1, 0, end - n).zero_()
            target.narrow(dim - 1, end - n, n).copy_(src[source_row].narrow(dim - 1, 0, n))
        self.valid[row, end - n:end] = True
        self.padded = True

    def copy_row(self, dst: int, src: int) -> None:
        """Row ``src``'s slots before ``length`` into row ``dst`` (e.g. to fill the place of a finished row)."""
        for t, dim in self.slot_tensors():
            t[dst].narrow(dim - 1, 0, self.length).copy_(t[src].narrow(dim - 1, 0, self.length))

    def shift(self, offset: int, rows: int | None = None) -> None:
        """Move the first ``rows`` rows' slots by ``offset`` (> 0: right, the freed slots become left padding;
        < 0: left, dropping slots that must be padding in every row) and ``length`` with them."""
        rows = self.batch_size if rows is None else rows
        if offset == 0 or rows == 0:
            self.length = max(0, self.length + offset)
            return
        n = self.length
        if offset > 0 and n + offset > self.max_len:
            raise CacheOverflowError(f"cannot shift {n} slots right by {offset} in a cache of {self.max_len}")
        if offset < 0 and bool(self.valid[:rows, :-offset].any()):
            raise ValueError(f"cannot shift left by {-offset}: a row has tokens in its first {-offset} slots")
        for t, dim in self.slot_tensors():
            part = t[:rows]
            if offset > 0:
                moved = part.narrow(dim, 0, n).clone()
                part.narrow(dim, offset, n).copy_(moved)
                part.narrow(dim, 0, offset).zero_()
            else:
                moved = part.narrow(dim, -offset, n + offset).clone()
                part.narrow(dim, 0, n + offset).copy_(moved)
        self.length = n + offset
        self.padded = True

    def reorder_cache(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (in that order), e.g. the surviving beams of beam search."""
        for t in self.buffers():
            t.copy_(t.index_select(0, rows.to(t.device)))

    def crop(self, length: int) -> None:
        """Roll back to the first ``length`` tokens (slots past it are ignored and later overwritten)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length

    @classmethod
    def allocate(cls, config: ModelConfig, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype, mtp: bool = True) -> InferenceCache:
        """Zero buffers for ``config`` holding ``max_len`` positions (``mtp=False``: none for the MTP depths)."""
        if max_len > config.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len}")
        device = torch.device(device)
        hkv, hd = config.n_kv_heads, config.head_dim

        def kv() -> KVBuffer:
            return KVBuffer(batch_size, hkv, max_len, hd, device, dtype)

        layers = []
        for _ in range(config.n_layers):
            lc = LayerCache(self_attn=kv())
            if config.transformerx:
                lc.conv_history = HistoryBuffer(batch_size, max_len, config.d_model, device, dtype)
                lc.cross_attn = [kv() for _ in range(config.n_scales)]
            layers.append(lc)
        valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        depths = [kv() for _ in range(config.mtp_depth if mtp else 0)]
        return cls(layers=layers, mtp=depths, max_len=max_len, valid=valid)
