"""``kunlun ablate``: the ablation study (paper Table 4); the work is in :mod:`kunlunbaize.ablate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..ablate.plan import MATCHES, VARIANTS, StudyConfig
from ..config import PRESETS
from .args import float_in, int_at_least, model_config, new_command, override


def _names(raw: str) -> tuple[str, ...]:
    return tuple(x for x in raw.replace(",", " ").split() if x)


def seed_list(raw: str) -> tuple[int, ...]:
    """An argparse ``type`` for ``--seeds``: comma-separated integers."""
    try:
        return tuple(int(s) for s in _names(raw))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r}: give integers, e.g. --seeds 0,1,2") from None


def variant_list(raw: str) -> tuple[str, ...]:
    """An argparse ``type`` for ``--variants``: comma-separated names of :data:`VARIANTS`."""
    names = _names(raw)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    return names


def run(args: argparse.Namespace) -> None:
    """Plan the study; print the plan (``--dry-run``), or train what is missing and print the report."""
    from ..ablate.plan import plan
    from ..ablate.run import StudyError, run_study

    model_config(args.preset, args.set)
    cfg = StudyConfig(out=args.out, data=args.data, preset=args.preset,
                      model_overrides=dict(args.set), tokens=args.tokens, seeds=args.seeds,
                      variants=args.variants, match=args.match, seq_len=args.seq_len,
                      batch_size=args.batch_size, lr=args.lr, dense_lr_mult=args.dense_lr_mult,
                      eval_every=args.eval_every,
                      eval_tasks=_names(args.eval), eval_limit=args.eval_limit, jobs=args.jobs, device=args.device,
                      dtype=args.dtype)
    try:
        runs = plan(cfg)
        if args.dry_run:
            from ..ablate.run import is_done

            for r in runs:
                print(f"{r.name:<28} {r.variant:<16} seed {r.seed}  {r.tokens:>12,} tokens  "
                      f"{r.flops_per_token / 1e9:.3f} GFLOPs/token ({r.match} match)"
                      + ("  done" if is_done(cfg, r) else ""))
            return
        if args.report_only:
            from ..ablate.report import write_report

            files = write_report(cfg)
        else:
            files = run_study(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))["report"]
    except (ValueError, StudyError) as e:
        raise SystemExit(f"kunlun ablate: {e}") from None
    except KeyboardInterrupt:
        print("kunlun ablate: stopped; finished runs are kept and an interrupted run resumes from its last "
              "checkpoint: run the same command to continue", file=sys.stderr)
        raise
    print(Path(files["markdown"]).read_text(encoding="utf-8"))
    print(f"{files['done']} of {len(runs)} runs done; report: {files['markdown']}, {files['json']}"
          + (f", plots: {', '.join(files['plots'])}" if files.get("plots") else ""), file=sys.stderr)


def add_parser(sub: Any) -> None:
    """Add ``ablate`` to ``sub`` (from ``ArgumentParser.add_subparsers``)."""
    d = StudyConfig()
    a = new_command(sub, "ablate", help="the ablation study (paper Table 4): the full model, each component removed "
                                        "and a matched Llama, several seeds, equal tokens and equal FLOPs; resumable")
    a.add_argument("--out", default=d.out, help=f"study folder (default {d.out})")
    a.add_argument("--data", default=d.data, help="a `kunlun prepare` folder shared by every run (default: the "
                                                  "embedded corpus, prepared on first use)")
    a.add_argument("--preset", default=d.preset, choices=list(PRESETS))
    a.add_argument("--set", nargs="*", type=override, default=[], metavar="KEY=VALUE",
                   help="model overrides applied to every variant (before its switch)")
    a.add_argument("--tokens", type=int_at_least(1), default=d.tokens, help=f"equal-token budget (default "
                                                                           f"{d.tokens:,})")
    a.add_argument("--seeds", type=seed_list, default=d.seeds, help="comma-separated (default 0,1,2)")
    a.add_argument("--variants", type=variant_list, default=d.variants,
                   help=f"comma-separated from {', '.join(VARIANTS)}")
    a.add_argument("--match", default=d.match, choices=MATCHES, help="compare at equal tokens, equal training "
                                                                     "FLOPs, or both (default)")
    a.add_argument("--seq-len", type=int_at_least(2), default=d.seq_len)
    a.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size)
    a.add_argument("--lr", type=float_in(0, low_open=True), default=d.lr)
    a.add_argument("--dense-lr-mult", type=float_in(0, low_open=True), default=d.dense_lr_mult,
                   help="learning rate of the dense-residual logits / --lr (default 1: the shared LR, the paper)")
    a.add_argument("--eval-every", type=int_at_least(1), default=d.eval_every, help="validation every N steps")
    a.add_argument("--eval", default=",".join(d.eval_tasks), help="kunlun eval tasks run on every final "
                                                                  "checkpoint (default bpb,arith)")
    a.add_argument("--eval-limit", type=int_at_least(1), default=None, help="problems per eval task")
    a.add_argument("--jobs", type=int_at_least(1), default=d.jobs, help="runs trained at once (each gets "
                                                                       "CPU cores / jobs threads)")
    a.add_argument("--device", default=d.device, help="auto, cpu, cuda")
    a.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16"])
    a.add_argument("--dry-run", action="store_true", help="print the planned runs (and which are done) and stop")
    a.add_argument("--report-only", action="store_true", help="write the report from the runs done so far")
