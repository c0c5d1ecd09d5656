"""Deterministic, resumable batches from the token shards written by ``kunlun prepare``.

The training stream is cut into non-overlapping windows of ``seq_len`` tokens. Global sample ``k``
is window ``perm_e[k mod n]`` of epoch ``e = k div n`` (a seeded permutation per epoch), so the
whole data position is one integer — the number of samples consumed — which makes resume exact and
independent of the number of ranks.

:class:`LongDocWindows` (``kunlun train --long-docs``) has the windows lie inside documents of at least ``seq_len``
tokens only, read from the dataset's document index; the sampler is the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.format import DataError, load_index, open_split


class TokenWindows:
    """Windows of ``seq_len`` tokens over one split's shards (a window may span two shards)."""

    def __init__(self, path: str | Path, split: str, seq_len: int) -> None:
        self.shards = open_split(path, split)  # validates meta.json and the shard sizes
        self.seq_len = seq_len
        sizes = [len(s) for s in self.shards]
        self.offsets = np.cumsum([0, *sizes])
        self.total = int(self.offsets[-1])
        self.n = self.total // seq_len
        if self.n == 0:
            raise DataError(
                f"the {split} split of {path} has {self.total} tokens, fewer than one sequence of {seq_len}; "
                "prepare more data or train with a smaller --seq-len"
            )

    def start(self, i: int) -> int:
        """Offset of window ``i`` in the split's token stream."""
        return i * self.seq_len

    def window(self, i: int) -> np.ndarray:
        start = self.start(i)
        end = start + self.seq_len
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < end:
            lo = start - int(self.offsets[shard])
            take = min(end - start, len(self.shards[shard]) - lo)
            parts.append(np.asarray(self.shards[shard][lo:lo + take]))
            start += take
            shard += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def batch(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.window(i) for i in indices]).astype(np.int64))


class LongDocWindows(TokenWindows):
    """Windows of ``seq_len`` tokens inside documents of at least ``seq_len`` tokens: each such document of ``L``
    tokens gives its ``L // seq_len`` non-overlapping windows from its start, in document order."""

    def __init__(self, path: str | Path, split: str, seq_len: int) -> None:
        self.shards = open_split(path, split)
        self.seq_len, self.split = seq_len, split
        self.offsets = np.cumsum([0, *(len(s) for s in self.shards)])
        self.total = int(self.offsets[-1])
        docs = load_index(path, split)  # DataError (prepare again) for a dataset without an index
        starts, lengths = docs[:-1], np.diff(docs)
        self.documents = len(lengths)
        long = lengths >= seq_len
        self.long_documents = int(long.sum())
        self.long_tokens = int(lengths[long].sum())
        if self.long_documents == 0:
            longest = int(lengths.max()) if len(lengths) else 0
            raise DataError(f"no {split} document of {path} has {seq_len:,} tokens or more (the longest has "
                            f"{longest:,}): prepare longer documents, train with a smaller --seq-len, or train "
                            "without --long-docs")
        per_doc = lengths[long] // seq_len
        self.starts = (np.repeat(starts[long], per_doc)
                       + seq_len * (np.arange(int(per_doc.sum())) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)))
        self.n = len(self.starts)

    def start(self, i: int) -> int:
        return int(self.starts[i])

    def describe(self) -> str:
        """How much of the split the windows draw from, e.g. for the run's first lines."""
        return (f"long documents: {self.long_documents:,} of {self.documents:,} {self.split} documents have >= "
                f"{self.seq_len:,} tokens ({self.long_tokens:,} of {self.total:,} tokens, "
                f"{self.long_tokens / max(self.total, 1):.1%}); {self.n:,} windows of {self.seq_len:,} tokens "
                f"({self.n * self.seq_len:,} tokens per epoch)")


class TrainSampler:
    """Maps global sample numbers to windows: an independent seeded permutation per epoch."""

    def __init__(self, windows: TokenWindows, seed: int) -> None:
        self.windows = windows
        self.seed = seed
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.windows.n, generator=g)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def indices(self, first: int, count: int) -> list[int]:
        n = self.windows.n
        return [int(self._permutation(k // n)[k % n]) for k in range(first, first + count)]

    def batch(self, first: int, count: int) -> torch.Tensor:
        """Samples ``first … first+count−1`` as a [count, seq_len] int64 tensor."""
        return self.windows.batch(self.indices(first, count))


def validation_batches(windows: TokenWindows, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """The first windows of the validation split, in order: the same every evaluation."""
    count = min(windows.n, batch_size * max_batches)
    idx = list(range(count))
    return [windows.batch(idx[i:i + batch_size]) for i in range(0, count, batch_size)]
