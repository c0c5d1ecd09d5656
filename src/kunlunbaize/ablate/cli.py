"""The ``kunlun ablate`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _names(raw: str) -> tuple[str, ...]:
    return tuple(x for x in raw.replace(",", " ").split() if x)


def cmd_ablate(args: argparse.Namespace) -> None:
    from ..cli import _parse_overrides
    from .plan import StudyConfig, plan
    from .run import StudyError, run_study

    try:
        seeds = tuple(int(s) for s in _names(args.seeds))
    except ValueError:
        raise SystemExit(f"kunlun ablate: --seeds {args.seeds!r}: give integers, e.g. --seeds 0,1,2") from None
    cfg = StudyConfig(out=args.out, data=args.data, preset=args.preset,
                      model_overrides=_parse_overrides(args.set, "kunlun ablate"), tokens=args.tokens, seeds=seeds,
                      variants=_names(args.variants), match=args.match, seq_len=args.seq_len,
                      batch_size=args.batch_size, lr=args.lr, dense_lr_mult=args.dense_lr_mult,
                      eval_every=args.eval_every,
                      eval_tasks=_names(args.eval), eval_limit=args.eval_limit, jobs=args.jobs, device=args.device,
                      dtype=args.dtype)
    try:
        runs = plan(cfg)
        if args.dry_run:
            from .run import is_done

            for r in runs:
                print(f"{r.name:<28} {r.variant:<16} seed {r.seed}  {r.tokens:>12,} tokens  "
                      f"{r.flops_per_token / 1e9:.3f} GFLOPs/token ({r.match} match)"
                      + ("  done" if is_done(cfg, r) else ""))
            return
        if args.report_only:
            from .report import write_report

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


def add_ablate_parser(sub) -> None:
    from ..cli import int_at_least
    from ..config import PRESETS
    from .plan import MATCHES, VARIANTS, StudyConfig

    d = StudyConfig()
    a = sub.add_parser("ablate", help="the ablation study (paper Table 4): the full model, each component removed "
                                      "and a matched Llama, several seeds, equal tokens and equal FLOPs; resumable")
    a.add_argument("--out", default=d.out, help=f"study folder (default {d.out})")
    a.add_argument("--data", default=d.data, help="a `kunlun prepare` folder shared by every run (default: the "
                                                  "embedded corpus, prepared on first use)")
    a.add_argument("--preset", default=d.preset, choices=list(PRESETS))
    a.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model overrides applied to every variant (before its switch)")
    a.add_argument("--tokens", type=int_at_least(1), default=d.tokens, help=f"equal-token budget (default "
                                                                           f"{d.tokens:,})")
    a.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="comma-separated (default 0,1,2)")
    a.add_argument("--variants", default=",".join(d.variants), help=f"comma-separated from {', '.join(VARIANTS)}")
    a.add_argument("--match", default=d.match, choices=MATCHES, help="compare at equal tokens, equal training "
                                                                     "FLOPs, or both (default)")
    a.add_argument("--seq-len", type=int_at_least(2), default=d.seq_len)
    a.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size)
    a.add_argument("--lr", type=float, default=d.lr)
    a.add_argument("--dense-lr-mult", type=float, default=d.dense_lr_mult,
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
    a.set_defaults(func=cmd_ablate)
