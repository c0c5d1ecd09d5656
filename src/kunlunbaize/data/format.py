"""On-disk format of a prepared token dataset (``kunlun prepare`` output) and its reader.

A prepared dataset is a folder::

    <out>/
      meta.json                          # written last; its presence with the right "format" marks completion
      tokenizer.json, tokenizer_config.json, special_tokens_map.json
      train_00000.bin, train_00001.bin, ...
      val_00000.bin, ...
      train_documents.bin, val_documents.bin   # the document index (datasets prepared since it was added)

Each ``.bin`` shard is a flat, raw little-endian array of token ids (``meta["dtype"]``, no header). Every document's
tokens are followed by the end-of-text id ``meta["eot_id"]``; documents may continue from one shard into the next.

The document index of a split is a flat, raw little-endian int64 array of ``documents + 1`` offsets into the split's
token stream (its shards back to back): document ``i`` is tokens ``[offsets[i], offsets[i + 1])``, its end-of-text
id included; the first offset is 0 and the last the split's token count. ``meta["splits"][split]["index"]`` names
it (``{"file": ..., "documents": n}``); a dataset prepared before the index existed has no such entry and still
loads -- only the features that need the index (:func:`load_index`) ask for it to be prepared again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "kunlunbaize-tokens-v1"
META_FILE = "meta.json"
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")
PREPARE_HINT = "run `kunlun prepare` to create it"
INDEX_DTYPE = np.dtype("<i8")


class DataError(ValueError):
    """Input data or a prepared dataset is missing, empty, malformed or incompatible; the message says what to do."""


def choose_dtype(vocab_size: int) -> np.dtype:
    """Smallest shard dtype for token ids of a vocabulary of ``vocab_size`` entries (little-endian uint16 or uint32)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 65535:
        return np.dtype("<u2")
    if vocab_size <= 2**32 - 1:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``, e.g. ``train_00000.bin``."""
    return f"{split}_{index:05d}.bin"


def index_name(split: str) -> str:
    """File name of the document index of ``split``, e.g. ``train_documents.bin``."""
    return f"{split}_documents.bin"


def _dtype_of(meta: dict[str, Any], where: Path) -> np.dtype:
    name = meta.get("dtype")
    if name not in DTYPES:
        raise DataError(f"{where}: unsupported token dtype {name!r} (expected one of {', '.join(DTYPES)}); "
                        f"the dataset is corrupt or from another tool, {PREPARE_HINT} again")
    return np.dtype(name).newbyteorder("<")


def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated ``meta.json`` of the prepared dataset in folder ``path``.

    Raises DataError when the folder or meta.json is missing, meta.json is not this format, or a listed shard is
    missing or its size differs from ``tokens * itemsize``.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"no prepared dataset at {root}: the folder does not exist; {PREPARE_HINT} "
                        f"(e.g. `kunlun prepare --out {root}`)")
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{root} is not a prepared dataset: {META_FILE} is missing (an interrupted run leaves no "
                        f"{META_FILE}); {PREPARE_HINT} (e.g. `kunlun prepare --out {root}`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path} cannot be read ({e}); {PREPARE_HINT} again with --overwrite") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{meta_path} has format {found!r}, expected {FORMAT!r}; {PREPARE_HINT} again with this "
                        f"version of kunlunbaize")
    dtype = _dtype_of(meta, meta_path)
    splits = meta.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        raise DataError(f"{meta_path} lists no 'train' split; the dataset is corrupt, {PREPARE_HINT} again")
    for split, info in splits.items():
        total = 0
        for shard in info.get("shards", []):
            file = root / shard["file"]
            expected = int(shard["tokens"]) * dtype.itemsize
            if not file.is_file():
                raise DataError(f"shard {file} listed in {META_FILE} is missing; the dataset is incomplete, "
                                f"{PREPARE_HINT} again with --overwrite")
            size = file.stat().st_size
            if size != expected:
                raise DataError(f"shard {file} has {size:,} bytes but {META_FILE} says {shard['tokens']:,} "
                                f"{dtype.name} tokens ({expected:,} bytes); the file is truncated or corrupt, "
                                f"{PREPARE_HINT} again with --overwrite")
            total += int(shard["tokens"])
        if total != int(info.get("tokens", -1)):
            raise DataError(f"{meta_path}: split {split!r} shards hold {total:,} tokens but the split says "
                            f"{info.get('tokens')}; the dataset is corrupt, {PREPARE_HINT} again with --overwrite")
        if "index" in info:
            _check_index_file(root, info["index"])
    return meta


def _check_index_file(root: Path, index: dict[str, Any]) -> None:
    """DataError unless the document index file ``index`` names exists with ``documents + 1`` offsets."""
    file = root / index["file"]
    expected = (int(index["documents"]) + 1) * INDEX_DTYPE.itemsize
    if not file.is_file():
        raise DataError(f"document index {file} listed in {META_FILE} is missing; the dataset is incomplete, "
                        f"{PREPARE_HINT} again with --overwrite")
    if file.stat().st_size != expected:
        raise DataError(f"document index {file} has {file.stat().st_size:,} bytes but {META_FILE} says "
                        f"{index['documents']:,} documents ({expected:,} bytes); the file is truncated or corrupt, "
                        f"{PREPARE_HINT} again with --overwrite")


def load_index(path: str | os.PathLike[str], split: str) -> np.ndarray:
    """Document offsets (int64, ``documents + 1``) into the token stream of ``split`` of the dataset in ``path``.

    Raises DataError when the dataset was prepared without a document index (prepare it again) or the index does
    not fit the split (not increasing, not from 0 to the split's token count).
    """
    root = Path(path)
    meta = load_meta(root)
    if split not in meta["splits"]:
        raise DataError(f"dataset {root} has no split {split!r} (it has: {', '.join(meta['splits'])})")
    info = meta["splits"][split]
    if "index" not in info:
        raise DataError(f"dataset {root} has no document index (it was prepared by an older kunlunbaize); re-run "
                        f"`kunlun prepare` with its sources and --out {root} --overwrite to add one")
    offsets = np.fromfile(root / info["index"]["file"], dtype=INDEX_DTYPE)
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != int(info["tokens"]) or np.any(np.diff(offsets) <= 0):
        raise DataError(f"document index {root / info['index']['file']} does not fit the {split} split's "
                        f"{info['tokens']:,} tokens; the dataset is corrupt, {PREPARE_HINT} again with --overwrite")
    return offsets


def open_split(path: str | os.PathLike[str], split: str) -> list[np.memmap]:
    """Read-only memory maps of the shards of ``split`` ("train" or "val") of the dataset in ``path``, in order.

    A split with no tokens (e.g. prepared with ``--val-fraction 0``) gives an empty list.
    """
    root = Path(path)
    meta = load_meta(root)
    if split not in meta["splits"]:
        raise DataError(f"dataset {root} has no split {split!r} (it has: {', '.join(meta['splits'])})")
    dtype = _dtype_of(meta, root / META_FILE)
    return [np.memmap(root / s["file"], dtype=dtype, mode="r", shape=(int(s["tokens"]),))
            for s in meta["splits"][split]["shards"] if int(s["tokens"]) > 0]


def token_counts(path: str | os.PathLike[str], vocab_size: int, split: str = "train") -> np.ndarray:
    """How often each token id in [0, ``vocab_size``) occurs in ``split`` of the dataset in ``path`` (int64 [V])."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in open_split(path, split):
        found = np.bincount(shard, minlength=vocab_size)
        if len(found) > vocab_size:
            raise DataError(f"dataset {path} holds token ids up to {len(found) - 1}, beyond the model's vocabulary "
                            f"of {vocab_size}: it was prepared with another tokenizer")
        counts += found
    return counts


def is_prepared(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a complete prepared dataset (meta.json of this format, all shards present and sized)."""
    try:
        load_meta(path)
    except DataError:
        return False
    return True
