"""The ``kunlun prepare`` pipeline: read sources, clean, train or load a tokenizer, tokenize, write token shards.

The dataset is built in a temporary sibling folder ``<out>.tmp-<pid>`` and renamed to ``<out>`` only when complete
(meta.json is written last), so an interrupted run never leaves something that looks like a dataset.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..defaults import DECODE_ERRORS, DEFAULT_DATA
from ..progress import Progress
from . import pack
from .clean import CleanReport, clean_documents
from .format import FORMAT, META_FILE, DataError, choose_dtype, is_prepared, load_meta
from .pack import default_workers, encode_store, plan_split, split_documents, write_index, write_split
from .sources import SourceFile, discover, read_documents, stdlib_files, stdlib_root
from .store import DocumentStore
from .tokenizer import CHAT_TOKENS, load_tokenizer, save_tokenizer, special_tokens, train_tokenizer

DEFAULT_OUT = Path(DEFAULT_DATA)
WORK_DIR = ".work"


def _check_settings(*, decode_errors: str, min_chars: int, max_chars: int | None, val_fraction: float,
                    shard_tokens: int, workers: int | None, max_docs: int | None, max_bytes: int | None) -> None:
    if decode_errors not in DECODE_ERRORS:
        raise DataError(f"--decode-errors must be one of {', '.join(DECODE_ERRORS)}, got {decode_errors!r}")
    if min_chars < 0:
        raise DataError(f"--min-chars must be >= 0, got {min_chars}")
    if max_chars is not None and max_chars < max(min_chars, 1):
        raise DataError(f"--max-chars {max_chars} must be >= --min-chars {min_chars} and >= 1")
    if not 0 <= val_fraction <= 0.5:
        raise DataError(f"--val-fraction must be between 0 and 0.5, got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    for name, value in (("--max-docs", max_docs), ("--max-bytes", max_bytes)):
        if value is not None and value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")


def _meta_format(folder: Path) -> object:
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


def _check_destination(out: Path, overwrite: bool) -> None:
    """Refuse to replace a finished dataset without ``overwrite``, and anything that is not a dataset at all."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise DataError(f"output path {out} exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    if is_prepared(out):
        if overwrite:
            return
        tokens = load_meta(out)["splits"]["train"]["tokens"]
        raise DataError(f"{out} already holds a prepared dataset ({tokens:,} training tokens); pass --overwrite to "
                        f"replace it, or choose another --out")
    ours = _meta_format(out) == FORMAT
    if ours and overwrite:
        return
    if ours:
        raise DataError(f"{out} holds an incomplete or damaged prepared dataset; pass --overwrite to replace it")
    raise DataError(f"{out} exists, is not empty and is not a prepared dataset (no {META_FILE} with format "
                    f"{FORMAT!r}); refusing to replace it -- remove it yourself or choose another --out")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out``, swapping out an existing dataset atomically when allowed."""
    _check_destination(out, overwrite)
    if out.is_dir() and not out.is_symlink():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.is_symlink():
            out.unlink()
        os.replace(tmp, out)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _empty_error(files: list[SourceFile], described: list[str], report: CleanReport) -> DataError:
    if not files:
        return DataError(f"no input files found in {', '.join(described)}; give files, folders or globs of text, "
                         f"JSONL or Parquet files, or a saved Hugging Face dataset (or no source at all to use the "
                         f"Python standard library)")
    return DataError(f"no documents left after reading and cleaning {len(files)} input file(s) from "
                     f"{', '.join(described)}:\n{report.format()}\nfix or add inputs, or relax the filters "
                     f"(--min-chars, --max-chars, --decode-errors replace)")


def prepare(sources: Sequence[str | os.PathLike[str]] = (), out: str | os.PathLike[str] = DEFAULT_OUT, *,
            text_field: str = "text", decode_errors: str = "replace", min_chars: int = 1,
            max_chars: int | None = None, vocab_size: int = 8192, tokenizer: str | os.PathLike[str] | None = None,
            val_fraction: float = 0.005, shard_tokens: int = 100_000_000, workers: int | None = None,
            max_docs: int | None = None, max_bytes: int | None = None, overwrite: bool = False,
            chat_tokens: bool = False, dedup: bool = True, progress: bool = True,
            log: Callable[[str], None] | None = print) -> Path:
    """Prepare a token dataset from ``sources`` into the folder ``out`` and return ``out``.

    ``sources`` are text files, JSONL(.gz), Parquet files, saved Hugging Face datasets, folders (recursive) and globs;
    none means the ``.py`` files of the Python standard library. Documents are cleaned (decode errors, binary files,
    exact duplicates, length filters), a byte-level BPE of ``vocab_size`` is trained (or ``tokenizer`` is loaded),
    and the tokens are written as train/val shards with meta.json (see :mod:`kunlunbaize.data.format`).
    ``workers`` (default: all CPUs) only changes speed, never the output. A trained tokenizer always reserves the
    chat role tokens (:data:`~kunlunbaize.data.tokenizer.CHAT_TOKENS`); ``chat_tokens`` adds the missing ones to a
    loaded ``tokenizer`` as special tokens, so a model trained on the data can be post-trained as a chat model.
    Raises DataError with a message saying what to do when the input is empty or a setting is invalid, or ``out``
    holds a dataset and not ``overwrite``.
    """
    say = log or (lambda _msg: None)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    _check_settings(decode_errors=decode_errors, min_chars=min_chars, max_chars=max_chars, val_fraction=val_fraction,
                    shard_tokens=shard_tokens, workers=workers, max_docs=max_docs, max_bytes=max_bytes)
    out = Path(out)
    _check_destination(out, overwrite)
    workers = workers or default_workers()
    started = time.perf_counter()
    files, described, resolved = _find_sources(sources, say)
    report = CleanReport()
    if not files:
        raise _empty_error(files, described, report)
    loaded = load_tokenizer(tokenizer) if tokenizer is not None else None  # fail fast on a bad --tokenizer
    tmp = _fresh_temporary(out, say)
    store: DocumentStore | None = None
    try:
        work = tmp / WORK_DIR
        work.mkdir()
        store = DocumentStore(work / "documents.txt")
        _read_corpus(files, store, report, text_field=text_field, decode_errors=decode_errors, min_chars=min_chars,
                     max_chars=max_chars, max_docs=max_docs, max_bytes=max_bytes, dedup=dedup, progress=progress)
        if not len(store):
            raise _empty_error(files, described, report)
        say(f"read {report.files_read:,} files: {report.kept:,} documents kept, {report.bytes_kept:,} bytes "
            f"({time.perf_counter() - started:.1f}s)")
        tok, eot_token, tok_info = _tokenizer_for(store, loaded, tokenizer, vocab_size, chat_tokens, progress, say)
        save_tokenizer(tok, tmp, eot_token)
        splits, dtype, n_vocab, eot_id = _tokenize_and_split(store, tok, eot_token, tmp, work, workers=workers,
                                                             val_fraction=val_fraction, shard_tokens=shard_tokens,
                                                             progress=progress, say=say)
        meta = {
            "format": FORMAT,
            "dtype": dtype,
            "vocab_size": n_vocab,
            "eot_id": eot_id,
            "splits": splits,
            "tokenizer": {**tok_info, "eot_token": eot_token, "special_tokens": special_tokens(tok)},
            "sources": resolved,
            "report": report.to_dict(),
            "settings": {"sources": described, "text_field": text_field, "decode_errors": decode_errors,
                         "min_chars": min_chars, "max_chars": max_chars, "vocab_size": vocab_size,
                         "tokenizer": None if tokenizer is None else str(tokenizer), "val_fraction": val_fraction,
                         "shard_tokens": shard_tokens, "max_docs": max_docs, "max_bytes": max_bytes,
                         "chat_tokens": chat_tokens, "dedup": dedup},
        }
        _write_json(tmp / META_FILE, meta)  # last file: its presence marks the folder complete
        _publish(tmp, out, overwrite)
    except BaseException:
        if store is not None:
            store.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    say(summary(out, meta, time.perf_counter() - started))
    return out


def _find_sources(sources: Sequence[str | os.PathLike[str]], say: Callable[[str], None]
                  ) -> tuple[list[Path], list[str], list[str]]:
    """The files to read, the sources as given and as resolved (the standard library when none are given)."""
    if not sources:
        files = stdlib_files()
        say(f"no sources given: using the {len(files):,} .py files of the Python standard library in {stdlib_root()}")
        return files, [f"python-stdlib:{stdlib_root()}"], [f"python-stdlib:{stdlib_root()}"]
    skipped: list[Path] = []
    files = discover(sources, skipped)
    if skipped:
        listed = ", ".join(map(str, skipped[:5])) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        say(f"note: skipped {len(skipped)} folder(s) written by kunlun (datasets, training runs, checkpoints, "
            f"exports): {listed}")
    resolved = [str(Path(s).resolve()) if Path(s).exists() else str(s) for s in sources]
    return files, [str(s) for s in sources], resolved


def _fresh_temporary(out: Path, say: Callable[[str], None]) -> Path:
    """An empty ``out.tmp-<pid>`` folder beside ``out`` (noting other runs' leftovers)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    leftovers = sorted(p.name for p in out.parent.glob(f"{glob.escape(out.name)}.tmp-*") if p != tmp)
    if leftovers:
        say(f"note: leftover temporary folder(s) from interrupted runs in {out.parent}: {', '.join(leftovers)} "
            f"(not datasets; safe to delete)")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _read_corpus(files: list[Path], store: DocumentStore, report: CleanReport, *, text_field: str,
                 decode_errors: str, min_chars: int, max_chars: int | None, max_docs: int | None,
                 max_bytes: int | None, dedup: bool, progress: bool) -> None:
    """Read, clean and (with ``dedup``) deduplicate the documents of ``files`` into ``store`` (closed afterwards)."""
    bar = Progress(len(files), desc="reading", unit="file", enabled=progress)
    docs = read_documents(bar.wrap(files), text_field=text_field, decode_errors=decode_errors, report=report)
    for doc in clean_documents(docs, report, min_chars=min_chars, max_chars=max_chars, max_docs=max_docs,
                               max_bytes=max_bytes, dedup=dedup):
        store.add(doc)
    bar.close()
    store.close()


def _tokenizer_for(store: DocumentStore, loaded: tuple[Any, str] | None, tokenizer: str | os.PathLike[str] | None,
                   vocab_size: int, chat_tokens: bool, progress: bool, say: Callable[[str], None]
                   ) -> tuple[Any, str, dict[str, Any]]:
    """The dataset's tokenizer, its end-of-text token and how it was made: trained on ``store``, or the loaded one
    (with the chat role tokens added when ``chat_tokens``)."""
    t0 = time.perf_counter()
    if loaded is None:
        # tokenizers' own bars write blank lines to stdout when not on a terminal: only show them on one
        interactive = progress and sys.stderr.isatty()
        tok = train_tokenizer(store.iter_texts(), vocab_size, length=len(store), show_progress=interactive)
        say(f"trained a byte-level BPE tokenizer: {tok.get_vocab_size():,} tokens ({time.perf_counter() - t0:.1f}s)")
        return tok, "<|endoftext|>", {"type": "trained-bpe", "source": "trained on this corpus"}
    tok, eot_token = loaded
    tok_info: dict[str, Any] = {"type": "loaded", "source": str(Path(tokenizer).resolve())}
    say(f"loaded tokenizer {tokenizer}: {tok.get_vocab_size():,} tokens, end-of-text {eot_token!r}")
    missing = [t for t in CHAT_TOKENS if tok.token_to_id(t) is None] if chat_tokens else []
    if missing:
        tok.add_special_tokens(missing)
        tok_info["added_chat_tokens"] = missing
        say(f"added the chat role tokens {', '.join(missing)}: {tok.get_vocab_size():,} tokens")
    return tok, eot_token, tok_info


def _tokenize_and_split(store: DocumentStore, tok: Any, eot_token: str, tmp: Path, work: Path, *, workers: int,
                        val_fraction: float, shard_tokens: int, progress: bool, say: Callable[[str], None]
                        ) -> tuple[dict[str, Any], str, int, int]:
    """Encode every document, split train/val by document and write the shards into ``tmp``; return the splits,
    the token dtype's name, the vocabulary size and the end-of-text id."""
    tokenizer_json = (tmp / "tokenizer.json").read_text(encoding="utf-8")
    eot_id = int(tok.token_to_id(eot_token))
    n_vocab = tok.get_vocab_size()
    dtype = choose_dtype(max(n_vocab, max(tok.get_vocab().values()) + 1))
    t0 = time.perf_counter()
    tokens_path = work / "tokens.bin"
    lengths = encode_store(store, tokenizer_json, eot_id, dtype, tokens_path, workers=workers, progress=progress)
    total = int(lengths.sum())
    used = min(workers, len(store.chunks(pack.CHUNK_BYTES)))
    say(f"tokenized {total:,} tokens with {used} worker(s) ({time.perf_counter() - t0:.1f}s, "
        f"{total / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s)")
    train_ranges, val_ranges, train_docs, val_docs = plan_split(store.digests, lengths, val_fraction)
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(total,))
    splits: dict[str, Any] = {}
    for split, ranges, n_docs in (("train", train_ranges, train_docs), ("val", val_ranges, val_docs)):
        shards = write_split(tokens, ranges, tmp, split, dtype, shard_tokens)
        index = write_index(tmp, split, split_documents(lengths, ranges))
        splits[split] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards), "documents": n_docs,
                         "index": index}
    del tokens
    shutil.rmtree(work)
    return splits, dtype.name, n_vocab, eot_id


def summary(out: Path, meta: dict[str, Any], seconds: float | None = None) -> str:
    """Human-readable description of the prepared dataset ``meta`` in ``out``, with its cleaning report."""
    lines = [f"dataset ready in {out}" + (f" ({seconds:.1f}s)" if seconds is not None else "")]
    for split, info in meta["splits"].items():
        lines.append(f"  {split:<5} {info['tokens']:>14,} tokens  {info['documents']:>9,} documents  "
                     f"{len(info['shards'])} shard(s)")
    lines.append(f"  vocabulary {meta['vocab_size']:,} ({meta['tokenizer']['type']}), dtype {meta['dtype']}, "
                 f"end-of-text id {meta['eot_id']}")
    report = CleanReport(**meta["report"])
    lines.append("cleaning report:")
    lines.append(report.format())
    return "\n".join(lines)
