"""``kunlun demo``: train a small byte-level model on the Python standard library, evaluate it, generate."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .args import SEED, UsageError, add_model_args, float_in, int_at_least, model_config, new_command
from .info import SET_HELP


def add_parser(sub: Any) -> None:
    """Add ``demo`` to ``sub`` (from ``ArgumentParser.add_subparsers``)."""
    p = new_command(sub, "demo", help="train a small byte-level model on the Python standard library, "
                                      "evaluate it and generate from it (CPU, minutes)")
    add_model_args(p, "tiny", SET_HELP)
    p.add_argument("--steps", type=int_at_least(1), default=300)
    p.add_argument("--batch-size", type=int_at_least(1), default=16)
    p.add_argument("--seq-len", type=int_at_least(2), default=128)
    p.add_argument("--lr", type=float_in(0, low_open=True), default=3e-3)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=120)


def run(args: argparse.Namespace) -> None:
    """Run :func:`kunlunbaize.demo.run_demo` and say how long it took."""
    cfg = model_config(args.preset, args.set)
    if args.prompt == "":
        raise UsageError("--prompt is empty: give at least one character")
    if args.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len}: must be between 2 and the preset's max_seq_len "
                         f"{cfg.max_seq_len}")
    t0 = time.time()
    from ..demo import run_demo

    run_demo(cfg, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
             lr=args.lr, seed=args.seed, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)
