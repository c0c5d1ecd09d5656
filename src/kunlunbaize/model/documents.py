"""Documents packed into one window (``kunlun train --doc-mask``): what each token may read so that every document
is computed as if it were alone.

A training window is a slice of a stream of documents, each ending with the end-of-text token, so it usually holds
the tail of one document, some whole ones and the head of another. By default every token attends to every earlier
token of the window, whichever document it belongs to. :class:`Documents`, made from per-token document ids, gives
the trunk and the MTP depths what restricts each token to its own document:

* rotary positions that restart at 0 at every document start (:attr:`Documents.positions`);
* a block-diagonal causal mask for self-attention and every per-scale cross-attention (:attr:`Documents.mask`);
* the causal convolutions' taps that reach before the document start read zeros, as at a sequence start (the
  convolution reads :attr:`Documents.positions`);
* MTP depth j's mask (:meth:`Documents.mtp_mask`): key slot s holds token s+j, so both must be in the query's
  document;
* loss targets in another document are ignored (:meth:`Documents.labels`).

With all of these a document's logits in a packed window equal those of the document run alone.
"""

from __future__ import annotations

import functools

import torch


def document_ids(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Per-token document number [B, T] of a window of ``tokens`` [B, T]: it grows by one after each end-of-text
    token (which belongs to the document it ends)."""
    ends = (tokens == eot_id).to(torch.int32)
    return ends.cumsum(-1) - ends


class Documents:
    """The masks and positions implied by per-token document ids ``ids`` [B, T] (a new document starts wherever the
    id changes from one token to the next)."""

    def __init__(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"document_ids must be an integer tensor [batch, seq], got {tuple(ids.shape)} "
                             f"{ids.dtype}")
        T = ids.shape[1]
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        self.segments = starts.long().cumsum(-1)
        """[B, T] the number of the document each token is in (1, 2, … along a row)."""
        index = torch.arange(T, device=ids.device).expand_as(ids)
        self.positions = index - torch.where(starts, index, 0).cummax(-1).values
        """[B, T] each token's position within its document (0 at a document start)."""

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[B, 1, T, T] query i may attend to key i' iff i' ≤ i in the same document (True = may attend)."""
        return self.rows_mask()

    def rows_mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """:attr:`mask`'s rows [B, 1, n, T] of the queries at positions ``rows`` [n] (None: every position; a
        context-parallel rank's tokens: their global positions)."""
        seg = self.segments
        keys = torch.arange(seg.shape[1], device=seg.device)
        rows = keys if rows is None else rows
        same = seg[:, rows, None] == seg[:, None, :]
        return (same & (keys[None, :] <= rows[:, None]))[:, None]

    def rope_length(self, rope: torch.nn.Module) -> torch.Tensor | None:
        """The rotary length of a packed-document forward (largest position within a document + 1): only dynamic NTK
        scaling (``rope.dynamic``) reads it."""
        return self.positions.max() + 1 if rope.dynamic else None

    @property
    def shape(self) -> torch.Size:
        return self.segments.shape

    def mtp_mask(self, depth: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP depth ``depth``'s mask [B, 1, T, T−depth] over its key slots (slot s holds token s+depth: both must
        lie in the query's document) and which queries [B, T, 1] have any key at all. A query with none (in a
        document of at most ``depth`` tokens) reads slot 0 to stay finite; its update must be dropped. ``rows``
        [n]: only the queries at those positions (n rows instead of T, as :meth:`rows_mask`)."""
        seg, T = self.segments, self.shape[1]
        query = seg if rows is None else seg[:, rows]
        full = self.mask if rows is None else self.rows_mask(rows)
        if depth >= T:
            return full[..., :0], torch.zeros(*query.shape, 1, dtype=torch.bool, device=seg.device)
        mask = full[..., :T - depth] & (seg[:, None, depth:] == query[:, :, None])[:, None]
        has_key = mask.any(-1)
        mask = mask.clone()
        mask[..., 0] |= ~has_key
        return mask, has_key.transpose(1, 2)

    def labels(self, labels: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
        """``labels`` [B, T] with the targets at distance ``shift`` in another document set to ``ignore_index``:
        for the head at position i predicting ``labels[:, i + shift]``."""
        if shift >= self.shape[1]:
            return labels
        out = labels.clone()
        out[:, shift:] = labels[:, shift:].masked_fill(self.segments[:, shift:] != self.segments[:, :-shift],
                                                       ignore_index)
        return out
