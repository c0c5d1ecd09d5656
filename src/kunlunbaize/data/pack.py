"""Tokenization of a document store in worker processes, validation hold-out, and shard writing.

Tokens of each document are followed by the end-of-text id. Tokenization results are independent of the number of
workers: the corpus is cut into fixed chunks of documents, and results are consumed in chunk order.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.pool
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer

from ..progress import Progress
from .format import INDEX_DTYPE, index_name, shard_name
from .store import DocumentStore, read_texts

CHUNK_BYTES = 1 << 19
MIN_VAL_TOKENS = 2 * 512
COPY_TOKENS = 1 << 24


def default_workers() -> int:
    """Number of CPUs this process may run on."""
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


class ChunkEncoder:
    """Encodes chunks of a document store into flat token arrays (each document followed by the EOT id)."""

    def __init__(self, tokenizer_json: str, store_path: str, eot_id: int, dtype: str) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # Special-token strings inside documents are text, never control tokens: "<|endoftext|>" written in a
        # document must not become a document boundary.
        self.tokenizer.encode_special_tokens = True
        self.file: BinaryIO = open(store_path, "rb")  # noqa: SIM115 - lives as long as the encoder
        self.eot_id = eot_id
        self.dtype = np.dtype(dtype)

    def __call__(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of the documents delimited by byte ``offsets``, and each document's token count (EOT included)."""
        texts = read_texts(self.file, offsets)
        ids = [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for x in ids:
            n = len(x)
            tokens[pos:pos + n] = x
            tokens[pos + n] = self.eot_id
            pos += n + 1
        return tokens, lengths

    def close(self) -> None:
        """Release the store file."""
        self.file.close()


_worker_encoder: ChunkEncoder | None = None


def _init_worker(tokenizer_json: str, store_path: str, eot_id: int, dtype: str) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested thread pool
    _worker_encoder = ChunkEncoder(tokenizer_json, store_path, eot_id, dtype)


def _encode_in_worker(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_encoder is not None, "worker not initialised"
    return _worker_encoder(offsets)


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _pool(workers: int, initargs: tuple[Any, ...]) -> multiprocessing.pool.Pool:
    # fork: workers start instantly without re-importing the package (which imports torch). Workers never use the
    # tokenizers thread pool (TOKENIZERS_PARALLELISM=false is inherited), so forking after the parent used it
    # (tokenizer training) is safe; the environment variable also silences the tokenizers fork warning.
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    with _env("TOKENIZERS_PARALLELISM", "false"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks.*")
        return ctx.Pool(workers, initializer=_init_worker, initargs=initargs)


def encode_store(store: DocumentStore, tokenizer_json: str, eot_id: int, dtype: np.dtype, tokens_path: Path, *,
                 workers: int = 1, progress: bool = True, chunk_bytes: int | None = None) -> np.ndarray:
    """Tokenize every document of ``store`` into the flat file ``tokens_path``; return per-document token counts.

    With ``workers > 1`` chunks are encoded in that many processes; with 1, in this process using the tokenizers
    library's own thread pool. The output is identical either way. Chunks hold about ``chunk_bytes`` (default
    :data:`CHUNK_BYTES`) of text.
    """
    store.close()
    offsets = store.offsets
    tasks = [offsets[lo:hi + 1] for lo, hi in store.chunks(chunk_bytes or CHUNK_BYTES)]
    initargs = (tokenizer_json, str(store.path), eot_id, np.dtype(dtype).str)
    lengths: list[np.ndarray] = []
    bar = Progress(store.nbytes, desc="tokenizing", unit="B", unit_scale=True, enabled=progress)
    workers = max(1, min(workers, len(tasks)))
    with open(tokens_path, "wb") as out:
        if workers == 1:
            encoder = ChunkEncoder(*initargs)
            try:
                results = map(encoder, tasks)
                _consume(results, tasks, out, lengths, bar)
            finally:
                encoder.close()
        else:
            pool = _pool(workers, initargs)
            try:
                _consume(pool.imap(_encode_in_worker, tasks), tasks, out, lengths, bar)
                pool.close()
            finally:
                pool.terminate()
                pool.join()
    bar.close()
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


def _consume(results: Iterator[tuple[np.ndarray, np.ndarray]], tasks: list[np.ndarray], out: BinaryIO,
             lengths: list[np.ndarray], bar: Progress) -> None:
    for task, (tokens, counts) in zip(tasks, results, strict=True):
        out.write(tokens.tobytes())
        lengths.append(counts)
        bar.update(int(task[-1] - task[0]))


def select_validation(digests: list[bytes], lengths: np.ndarray, val_fraction: float,
                      min_tokens: int = MIN_VAL_TOKENS) -> np.ndarray:
    """Boolean mask of the documents held out for validation.

    Documents are taken in order of their content digest (deterministic, independent of position) until the held-out
    tokens reach ``val_fraction`` of all tokens and at least ``min_tokens`` -- but never more than half of all
    tokens, so the floor only applies when the corpus allows it. At least one document is held out when
    ``val_fraction > 0`` and there are two or more documents; none otherwise.
    """
    n = len(lengths)
    mask = np.zeros(n, dtype=bool)
    if val_fraction <= 0 or n < 2:
        return mask
    total = int(lengths.sum())
    target = max(math.ceil(val_fraction * total), min(min_tokens, total // 2), 1)
    cap = max(target, total // 2)
    held = count = 0
    for i in sorted(range(n), key=lambda k: (digests[k], k)):
        if held >= target or count == n - 1:
            break
        size = int(lengths[i])
        if held + size <= cap:
            mask[i] = True
            held += size
            count += 1
    if not mask.any():  # unreachable for n >= 2 (the smallest document fits under the cap); kept as a guard
        mask[int(np.argmin(lengths))] = True
    return mask


def split_ranges(lengths: np.ndarray, mask: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Token ranges ``[start, end)`` of the train (``~mask``) and val (``mask``) documents, adjacent ones merged."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
    for start, end, is_val in zip(starts.tolist(), ends.tolist(), mask.tolist(), strict=True):
        ranges = out[1] if is_val else out[0]
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return out


def plan_split(digests: list[bytes], lengths: np.ndarray, val_fraction: float,
               min_tokens: int = MIN_VAL_TOKENS) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int, int]:
    """Token ranges of the train and val splits, and the number of documents with tokens in each.

    Whole documents are held out (:func:`select_validation`). A corpus of a single document cannot be split by
    document; then the validation split is the document's last ``max(val_fraction * tokens, min(min_tokens,
    tokens // 2))`` tokens and both splits count that one document.
    """
    n, total = len(lengths), int(lengths.sum())
    if n == 1 and val_fraction > 0:
        held = max(math.ceil(val_fraction * total), min(min_tokens, total // 2), 1)
        held = min(held, total - 1)
        return [(0, total - held)], [(total - held, total)], 1, 1
    mask = select_validation(digests, lengths, val_fraction, min_tokens)
    train, val = split_ranges(lengths, mask)
    return train, val, int(n - mask.sum()), int(mask.sum())


class ShardWriter:
    """Writes a token stream to ``<split>_00000.bin``, ``<split>_00001.bin``, ... of at most ``shard_tokens`` each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: BinaryIO | None = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        """Append ``tokens`` to the stream."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._roll()
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            assert self._file is not None
            self._file.write(tokens[:take].tobytes())
            self._in_shard += take
            self.shards[-1]["tokens"] = self._in_shard
            tokens = tokens[take:]

    def _roll(self) -> None:
        self._close_file()
        name = shard_name(self.split, len(self.shards))
        self._file = open(self.out_dir / name, "wb")  # noqa: SIM115 - closed on roll-over or close()
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; return the shard list for meta.json."""
        self._close_file()
        return self.shards


def split_documents(lengths: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Lengths of the documents (or document parts) of a split made of the token ``ranges``, in order.

    ``lengths`` are the corpus's document token counts; a range is cut at every document boundary inside it, so a
    range that is the tail of a single document (the one-document corpus's validation split) is one document.
    """
    bounds = np.cumsum(lengths)
    out: list[np.ndarray] = []
    for start, end in ranges:
        cuts = bounds[(bounds > start) & (bounds < end)]
        out.append(np.diff(np.concatenate(([start], cuts, [end]))))
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def write_index(out_dir: Path, split: str, doc_lengths: np.ndarray) -> dict[str, Any]:
    """Write the document index of ``split`` (:func:`~kunlunbaize.data.format.load_index`); return its meta.json
    entry."""
    offsets = np.concatenate(([0], np.cumsum(doc_lengths))).astype(INDEX_DTYPE)
    name = index_name(split)
    with open(out_dir / name, "wb") as f:
        f.write(offsets.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return {"file": name, "documents": len(doc_lengths)}


def write_split(tokens: np.ndarray, ranges: list[tuple[int, int]], out_dir: Path, split: str, dtype: np.dtype,
                shard_tokens: int) -> list[dict[str, Any]]:
    """Write the ``ranges`` of ``tokens`` as the shards of ``split``; return the shard list for meta.json."""
    writer = ShardWriter(out_dir, split, dtype, shard_tokens)
    for start, end in ranges:
        for lo in range(start, end, COPY_TOKENS):
            writer.write(tokens[lo:min(end, lo + COPY_TOKENS)])
    return writer.close()
