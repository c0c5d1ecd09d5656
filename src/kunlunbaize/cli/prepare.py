"""``kunlun prepare``: text into a token dataset; the work is done by :func:`kunlunbaize.data.prepare.prepare`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..defaults import DECODE_ERRORS, DEFAULT_DATA
from .args import UsageError, float_in, int_at_least, new_command

DESCRIPTION = """\
Turn text into a token dataset for `kunlun train`: read sources, clean them (decode errors, binary files,
exact duplicates, length filters), train a byte-level BPE tokenizer (or load one), tokenize in parallel and
write train/val token shards plus meta.json and the tokenizer into --out.

Sources are text files, JSONL (.jsonl, .jsonl.gz), Parquet files, folders of them (recursive), globs, or
Hugging Face datasets saved with `save_to_disk`. Without sources, the .py files of the Python standard
library are used (about 30 MB of code and docstrings).

examples:
  kunlun prepare                                   # the Python standard library -> data/stdlib
  kunlun prepare books/ --out data/books --vocab-size 16384
  kunlun prepare 'crawl/*.jsonl.gz' --text-field content --min-chars 200 --out data/crawl
  kunlun prepare corpus.parquet --tokenizer path/to/tokenizer.json --out data/corpus
"""


POSITIVE = int_at_least(1)


def add_parser(sub: Any) -> None:
    """Add ``prepare`` to ``sub`` (from ``ArgumentParser.add_subparsers``)."""
    p = new_command(sub, "prepare", help="build a tokenized dataset (tokenizer + token shards) from text",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="files, folders, globs or saved HF datasets (default: the Python standard library)")
    p.add_argument("--out", default=DEFAULT_DATA, help="output folder (default: %(default)s)")
    p.add_argument("--text-field", default="text",
                   help="text field of JSONL records / column of Parquet files and datasets (default: %(default)s)")
    p.add_argument("--decode-errors", choices=DECODE_ERRORS, default="replace",
                   help="non-UTF-8 text: replace bad bytes with U+FFFD, or skip the file (default: %(default)s)")
    p.add_argument("--min-chars", type=int_at_least(0), default=1,
                   help="drop documents shorter than this, in characters after stripping whitespace (default: 1)")
    p.add_argument("--max-chars", type=POSITIVE, default=None,
                   help="drop documents longer than this, in characters after stripping whitespace (default: none)")
    p.add_argument("--vocab-size", type=POSITIVE, default=8192,
                   help="vocabulary size of the trained tokenizer, special tokens included (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="use this tokenizer.json (or folder containing one) instead of training a tokenizer")
    p.add_argument("--chat-tokens", action="store_true",
                   help="add the chat role tokens (<|system|>, <|user|>, <|assistant|>, <|end|>) to a --tokenizer that "
                        "lacks them; a trained tokenizer always reserves them")
    p.add_argument("--val-fraction", type=float_in(0, 0.5), default=0.005,
                   help="share of tokens held out for validation, as whole documents chosen by content hash; "
                        "at least one document and 1024 tokens when the corpus allows it; 0 = none "
                        "(default: %(default)s)")
    p.add_argument("--shard-tokens", type=POSITIVE, default=100_000_000,
                   help="maximum tokens per shard file (default: 100_000_000)")
    p.add_argument("--workers", type=POSITIVE, default=None,
                   help="tokenizer processes (default: number of CPUs); 1 = this process, using the tokenizers "
                        "library's own threads; never changes the output")
    p.add_argument("--max-docs", type=POSITIVE, default=None, help="stop reading after this many kept documents")
    p.add_argument("--max-bytes", type=POSITIVE, default=None,
                   help="stop reading once kept documents reach this many UTF-8 bytes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")


def run(args: argparse.Namespace) -> None:
    """Run :func:`kunlunbaize.data.prepare.prepare`; on a DataError print it and exit with status 1."""
    if args.max_chars is not None and args.max_chars < args.min_chars:
        raise UsageError(f"--max-chars {args.max_chars} must be >= --min-chars {args.min_chars}")
    from ..data.format import DataError
    from ..data.prepare import prepare

    try:
        prepare(args.sources, args.out, text_field=args.text_field, decode_errors=args.decode_errors,
                min_chars=args.min_chars, max_chars=args.max_chars, vocab_size=args.vocab_size,
                tokenizer=args.tokenizer, val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                workers=args.workers, max_docs=args.max_docs, max_bytes=args.max_bytes, overwrite=args.overwrite,
                chat_tokens=args.chat_tokens)
    except DataError as e:
        print(f"kunlun prepare: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:  # --out not writable, disk full …: the temporary folder is already removed
        where = f" {e.filename}" if e.filename else ""
        print(f"kunlun prepare: error: cannot write{where}: {e.strerror or e} — choose a writable --out folder "
              "(and check the free space); nothing was written", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("kunlun prepare: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
