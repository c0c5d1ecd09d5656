"""Cleaned documents spilled to disk, so that corpus size is not limited by memory.

The store is one file of UTF-8 texts back to back plus, in memory, their byte offsets and SHA-256 digests. It is
written once, then read several times (tokenizer training, tokenization in worker processes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .clean import CleanDocument


class DocumentStore:
    """Append-only file of documents with their offsets and content digests."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = open(self.path, "wb")  # noqa: SIM115 - kept open across add() calls, closed by close()
        self._ends: list[int] = []
        self._digests: list[bytes] = []
        self._size = 0
        self._offsets: np.ndarray | None = None

    def add(self, doc: CleanDocument) -> None:
        """Append one document."""
        self._offsets = None
        data = doc.text.encode("utf-8")
        self._file.write(data)
        self._size += len(data)
        self._ends.append(self._size)
        self._digests.append(doc.digest)

    def close(self) -> None:
        """Finish writing; the store becomes readable."""
        if not self._file.closed:
            self._file.close()

    def __len__(self) -> int:
        return len(self._ends)

    @property
    def nbytes(self) -> int:
        """Total UTF-8 bytes of all documents."""
        return self._size

    @property
    def offsets(self) -> np.ndarray:
        """Byte offsets, int64 of length ``len(self) + 1``: document i is ``[offsets[i], offsets[i + 1])``."""
        if self._offsets is None:
            self._offsets = np.asarray([0, *self._ends], dtype=np.int64)
        return self._offsets

    @property
    def digests(self) -> list[bytes]:
        """SHA-256 digest of each document's text, in order."""
        return self._digests

    def iter_texts(self, batch_bytes: int = 8 << 20) -> Iterator[str]:
        """All document texts in order, read in batches of about ``batch_bytes``."""
        self.close()
        offsets = self.offsets
        with open(self.path, "rb") as f:
            for lo, hi in self.chunks(batch_bytes):
                yield from read_texts(f, offsets[lo:hi + 1])

    def chunks(self, chunk_bytes: int) -> list[tuple[int, int]]:
        """Consecutive document index ranges ``[lo, hi)`` of about ``chunk_bytes`` each (at least one document)."""
        offsets = self.offsets
        out = []
        i = 0
        while i < len(self):
            j = int(np.searchsorted(offsets, offsets[i] + chunk_bytes, side="right")) - 1
            j = min(max(j, i + 1), len(self))
            out.append((i, j))
            i = j
        return out


def read_texts(f: BinaryIO, offsets: np.ndarray) -> list[str]:
    """Texts of the consecutive documents delimited by byte ``offsets`` (length n + 1) in the store file ``f``."""
    start = int(offsets[0])
    f.seek(start)
    data = f.read(int(offsets[-1]) - start)
    rel = (offsets - start).tolist()
    return [data[rel[k]:rel[k + 1]].decode("utf-8") for k in range(len(rel) - 1)]
