"""Throughput of the ``kunlun prepare`` pack step vs. a plain ``tokenizers`` ``encode_batch`` on the same documents.

The documents are read and cleaned once, as ``kunlun prepare`` does (default: the Python standard library), and one
tokenizer is trained on them (or loaded with --tokenizer). Then, in interleaved rounds (median reported):

* pack, N workers  -- ``encode_store`` in N worker processes + validation split + shard writing (the real step);
* pack, 1 worker   -- the same in this process, tokenization by the tokenizers library's own thread pool;
* encode_batch     -- ``Tokenizer.encode_batch`` over the same texts already in memory (Rust, multi-threaded), with
  the same tokenizer and the same setting (special-token strings encoded as text); nothing written. The ratio
  "vs encode_batch" is relative to this row;
* encode_batch_fast -- the same without computing offsets (what the pack step calls inside each worker).

Both count the same tokens (document tokens + one end-of-text per document; checked).

    python benchmarks/prepare_throughput.py                          # stdlib corpus, ~30 MB
    python benchmarks/prepare_throughput.py --max-bytes 5_000_000 --rounds 1
    python benchmarks/prepare_throughput.py my_corpus/ --tokenizer data/stdlib
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tokenizers

from kunlunbaize.data.clean import CleanReport, clean_documents
from kunlunbaize.data.format import choose_dtype
from kunlunbaize.data.pack import default_workers, encode_store, plan_split, write_split
from kunlunbaize.data.sources import discover, read_documents, stdlib_files
from kunlunbaize.data.store import DocumentStore
from kunlunbaize.data.tokenizer import load_tokenizer, train_tokenizer


def cpu_name() -> str:
    """CPU model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="*", help="input sources as for `kunlun prepare` (default: Python stdlib)")
    ap.add_argument("--max-bytes", type=lambda s: int(s.replace("_", "")), default=None)
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json or folder (default: train one on the input)")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kunlun-bench-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    files = discover(args.sources) if args.sources else stdlib_files()
    report = CleanReport()
    store = DocumentStore(work / "documents.txt")
    docs = read_documents(files, text_field=args.text_field, report=report)
    for doc in clean_documents(docs, report, max_bytes=args.max_bytes):
        store.add(doc)
    store.close()
    texts = list(store.iter_texts())
    print(f"input: {len(texts):,} documents, {store.nbytes / 1e6:.1f} MB from {report.files_read:,} files "
          f"({'stdlib' if not args.sources else ', '.join(args.sources)})")

    t0 = time.perf_counter()
    if args.tokenizer:
        tok, eot = load_tokenizer(args.tokenizer)
    else:
        tok, eot = train_tokenizer(texts, args.vocab_size, length=len(texts)), "<|endoftext|>"
    print(f"tokenizer: {tok.get_vocab_size():,} tokens ({'loaded' if args.tokenizer else 'trained'} in "
          f"{time.perf_counter() - t0:.1f}s); tokenizers {tokenizers.__version__}, {cpu_name()}, "
          f"{default_workers()} CPUs, Python {platform.python_version()}")
    tokenizer_json = tok.to_str()
    eot_id = int(tok.token_to_id(eot))
    dtype = choose_dtype(tok.get_vocab_size())
    baseline_tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    baseline_tok.encode_special_tokens = True  # as in the pack step: special-token strings in documents are text

    def pack(workers: int) -> int:
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        lengths = encode_store(store, tokenizer_json, eot_id, dtype, out / "tokens.bin", workers=workers,
                               progress=False)
        train, val, _, _ = plan_split(store.digests, lengths, 0.005)
        tokens = np.memmap(out / "tokens.bin", dtype=dtype, mode="r", shape=(int(lengths.sum()),))
        write_split(tokens, train, out, "train", dtype, 100_000_000)
        write_split(tokens, val, out, "val", dtype, 100_000_000)
        del tokens
        return int(lengths.sum())

    def encode_batch(fast: bool = False) -> int:
        encode = baseline_tok.encode_batch_fast if fast else baseline_tok.encode_batch
        encodings = encode(texts, add_special_tokens=False)
        return sum(len(e.ids) for e in encodings) + len(encodings)

    variants: dict[str, Callable[[], int]] = {f"pack, {args.workers} worker processes": lambda: pack(args.workers),
                                              "pack, 1 worker (in-process, Rust threads)": lambda: pack(1),
                                              "tokenizers encode_batch (Rust threads)": encode_batch,
                                              "tokenizers encode_batch_fast (Rust threads)": lambda: encode_batch(True)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    counts: dict[str, int] = {}
    for r in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            counts[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{s[-1]:.2f}s" for s in seconds.values()))
    if len(set(counts.values())) != 1:
        raise SystemExit(f"token counts differ between variants: {counts}")

    n = next(iter(counts.values()))
    base = n / statistics.median(seconds["tokenizers encode_batch (Rust threads)"])
    print(f"\n{n:,} tokens per run, median of {args.rounds} round(s)\n")
    print("| variant | seconds | tokens/s | vs encode_batch |")
    print("|---|---:|---:|---:|")
    for name, times in seconds.items():
        rate = n / statistics.median(times)
        print(f"| {name} | {statistics.median(times):.2f} | {rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
