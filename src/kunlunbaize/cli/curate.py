"""``kunlun curate``: curate raw text into a token dataset; the work is done by
:func:`kunlunbaize.data.curate.curate` (datatrove)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..defaults import DECODE_ERRORS
from .args import UsageError, float_in, int_at_least, new_command

DESCRIPTION = """\
Curate raw text into a token dataset for `kunlun train --data`: read the sources, fix formatting (mojibake,
control characters, whitespace), identify languages (lingua; its models are in the wheel), drop low-quality
documents (Gopher, C4 and FineWeb rules for English prose; generated/minified/symbol-heavy rules for code),
remove near-duplicates (MinHash at --similarity), mix domains to exact token proportions (--mix), then
tokenize and shard like `kunlun prepare`. Writes curation_report.md/.json and curation_removals.png into --out.

A SOURCE is a file, folder, glob or saved dataset, optionally named NAME=PATH: its documents form the domain NAME
for --mix. Unnamed documents belong to the domain `code` (code files) or their language (en, zh, ...).
Intermediate files live in --work (default: <out>.curate); rerunning the same command resumes there.

examples:
  kunlun curate crawl/ --out data/web --languages en,zh
  kunlun curate code=src/ math=math.jsonl web=crawl/ --mix code=0.4,math=0.2,web=0.4 --out data/mix
  kunlun curate crawl/ --out data/web --executor slurm --slurm-partition cpu --tasks 512   # rerun when done
  RAY_ADDRESS=auto kunlun curate crawl/ --out data/web --executor ray --workers 16 --tasks 64
"""


def add_parser(sub: Any) -> None:
    """Add ``curate`` to ``sub`` (from ``ArgumentParser.add_subparsers``)."""
    p = new_command(sub, "curate", help="curate raw text (filters, near-dedup, mixing) into a tokenized dataset",
                    description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="files, folders, globs or saved datasets, or NAME=PATH")
    p.add_argument("--out", required=True, help="output dataset folder (what `kunlun train --data` reads)")
    p.add_argument("--work", default=None, help="folder for intermediate files (default: <out>.curate)")
    p.add_argument("--similarity", type=float_in(0, 1, low_open=True), default=0.7,
                   help="near-duplicate threshold: word 5-gram Jaccard similarity at which a pair is removed with "
                        ">= 95%% probability; MinHash buckets and hashes follow from it (default: %(default)s)")
    p.add_argument("--languages", default=None, metavar="CODES",
                   help="keep only prose in these ISO 639-1 languages, e.g. en,zh (default: every language)")
    p.add_argument("--mix", default=None, metavar="DOMAIN=FRACTION,...",
                   help="target share of tokens per domain, e.g. code=0.4,en=0.5,zh=0.1 (default: as found)")
    p.add_argument("--mix-tokens", type=int_at_least(1), default=None,
                   help="total tokens of the mixture (default: the tokens of the mixed domains as found)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="use this tokenizer.json (or folder) instead of training a BPE on the curated text")
    p.add_argument("--vocab-size", type=int_at_least(1), default=8192, help="trained tokenizer size (default: 8192)")
    p.add_argument("--text-field", default="text", help="text field of JSONL/Parquet/datasets (default: text)")
    p.add_argument("--decode-errors", choices=DECODE_ERRORS, default="replace",
                   help="non-UTF-8 text: replace bad bytes, or skip the file (default: %(default)s)")
    p.add_argument("--executor", choices=("local", "slurm", "ray"), default="local",
                   help="datatrove executor: local processes, Slurm jobs (submitted; rerun the same command when "
                        "they are done), or the Ray cluster RAY_ADDRESS names, else a local one (default: local)")
    p.add_argument("--workers", type=int_at_least(1), default=1, help="parallel local/Ray workers (default: 1)")
    p.add_argument("--tasks", type=int_at_least(1), default=None,
                   help="datatrove tasks (shards of the input) per stage (default: --workers)")
    p.add_argument("--slurm-partition", default=None, help="Slurm partition (with --executor slurm)")
    p.add_argument("--slurm-time", default="24:00:00", help="Slurm time limit per job (default: %(default)s)")
    p.add_argument("--val-fraction", type=float_in(0, 0.5), default=0.005, help="validation share (default: 0.005)")
    p.add_argument("--shard-tokens", type=int_at_least(1), default=100_000_000, help="tokens per shard file")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the mixture's sampling (default: 0)")
    p.add_argument("--restart", action="store_true", help="delete --work and start the curation over")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")


def run(args: argparse.Namespace) -> None:
    """Run :func:`kunlunbaize.data.curate.curate`; on a DataError print it and exit with status 1."""
    if args.executor == "slurm" and not args.slurm_partition:
        raise UsageError("--executor slurm needs --slurm-partition")
    try:
        from ..data.curate import ExecutorOptions, curate, parse_mix
    except ImportError as e:
        print(f"kunlun curate: error: {e.name or e} is not installed: pip install 'kunlunbaize[curate]'",
              file=sys.stderr)
        raise SystemExit(1) from None
    from ..data.format import DataError

    try:
        curate(args.sources, args.out, work=args.work, similarity=args.similarity,
               languages=[c.strip() for c in args.languages.split(",") if c.strip()] if args.languages else None,
               mix=parse_mix(args.mix) if args.mix else None, mix_tokens=args.mix_tokens, tokenizer=args.tokenizer,
               vocab_size=args.vocab_size, text_field=args.text_field, decode_errors=args.decode_errors,
               executor=ExecutorOptions(args.executor, args.workers, args.slurm_partition, args.slurm_time),
               tasks=args.tasks, val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, seed=args.seed,
               restart=args.restart, overwrite=args.overwrite)
    except DataError as e:
        print(f"kunlun curate: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
