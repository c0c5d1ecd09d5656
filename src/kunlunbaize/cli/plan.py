"""``kunlun plan``: the layouts of a model on N GPUs, with memory, communication, bubble, step time and MFU (the work
is :mod:`kunlunbaize.plan`; pure arithmetic, no torch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .args import UsageError, add_model_args, float_in, int_at_least, model_config, new_command

POSITIVE = int_at_least(1)
GiB = 2**30
PAPER_BATCH = 15360  # sequences per step after the paper's batch ramp (train/schedule.py)
DIMS = {"dp_replicate": "--dp-replicate", "dp_shard": "--dp-shard", "tp": "--tp", "pp": "--pp", "cp": "--cp"}


def add_parser(sub: Any) -> None:
    """Add ``plan`` to ``sub`` (from ``ArgumentParser.add_subparsers``)."""
    from ..plan import AC_MODES, GPUS, PRECISIONS, SCHEDULES

    p = new_command(sub, "plan", help="how to lay a training run out on N GPUs: memory, communication, bubble, "
                                      "step time, MFU, days to the paper's 12.3T tokens")
    add_model_args(p, "paper", "config overrides, e.g. --set n_layers=64")
    p.add_argument("--config", help="a config.json (a ModelConfig, e.g. a checkpoint's) instead of --preset")
    p.add_argument("--arch", choices=["kunlunbaize", "llama"], default="kunlunbaize",
                   help="llama: the matched plain decoder (with --set transformerx=false … any Llama shape)")
    p.add_argument("--gpus", type=POSITIVE, default=8, help="number of GPUs (default 8: one node)")
    p.add_argument("--gpu", default="H100", help=f"GPU type: {', '.join(GPUS)} (default H100)")
    p.add_argument("--seq-len", dest="seq_len", type=int_at_least(2), default=None,
                   help="default: the config's max_seq_len")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch", type=POSITIVE, help=f"global batch in sequences (default {PAPER_BATCH:,}, the "
                                                     "paper's after its ramp)")
    size.add_argument("--batch-tokens", dest="batch_tokens", type=POSITIVE, help="global batch in tokens")
    for dim, flag in DIMS.items():
        p.add_argument(flag, dest=dim, type=POSITIVE, help=f"keep {dim} at this size")
    p.add_argument("--schedule", choices=SCHEDULES, help="only this pipeline schedule")
    p.add_argument("--micro-batch", dest="micro_batch", type=POSITIVE, help="only this micro-batch size")
    p.add_argument("--ac", choices=AC_MODES, help="only this activation checkpointing")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16")
    p.add_argument("--efficiency", type=float_in(0, 1, low_open=True), default=None,
                   help="share of the dense peak the matmuls reach (default 0.44, calibrated)")
    p.add_argument("--tp-overlap", dest="tp_overlap", type=float_in(0, 1), default=0.0,
                   help="share of TP traffic hidden by async TP (default 0)")
    p.add_argument("--top", type=POSITIVE, default=10, help="layouts shown (default 10)")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="also every mesh left out, with the reason")


def _config(args: argparse.Namespace):
    from ..config import ModelConfig

    if not args.config:
        return model_config(args.preset, args.set)
    try:
        data = json.loads(Path(args.config).read_text(encoding="utf-8"))
        fields = {k: v for k, v in data.items() if k in ModelConfig.__dataclass_fields__}
        fields.update(dict(args.set))
        return ModelConfig.from_dict(fields)
    except OSError as e:
        raise UsageError(f"--config {args.config}: cannot read it ({e.strerror})") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"--config {args.config}: not a model config ({e})") from None


def _job(args: argparse.Namespace):
    from ..arch import get_arch
    from ..plan import Job, get_gpu

    cfg = _config(args)
    try:
        gpu = get_gpu(args.gpu)
    except ValueError as e:
        raise UsageError(f"--gpu: {e}") from None
    seq = args.seq_len or cfg.max_seq_len
    if args.batch_tokens is not None and args.batch_tokens % seq:
        raise UsageError(f"--batch-tokens {args.batch_tokens:,} is not a whole number of {seq}-token sequences")
    batch = args.batch or (args.batch_tokens // seq if args.batch_tokens else PAPER_BATCH)
    node = gpu.gpus_per_node
    if args.gpus > node and args.gpus % node:
        raise UsageError(f"--gpus {args.gpus} is not a whole number of {node}-GPU nodes (use a multiple of {node}, "
                         f"or at most {node})")
    kw = {"efficiency": args.efficiency} if args.efficiency is not None else {}
    return Job(cfg=cfg, spec=get_arch(args.arch), gpu=gpu, n_gpus=args.gpus, seq_len=seq, batch=batch,
               precision=args.precision, tp_overlap=args.tp_overlap, **kw)


def run(args: argparse.Namespace) -> None:
    """Print the fitting layouts (fastest first) with the best one's breakdown, or the plan as JSON."""
    from ..plan import AC_MODES, SCHEDULES, plan

    job = _job(args)
    fixed = {dim: getattr(args, dim) for dim in DIMS if getattr(args, dim) is not None}
    result = plan(job, fixed, schedules=[args.schedule] if args.schedule else SCHEDULES,
                  micro_batches=[args.micro_batch] if args.micro_batch else None,
                  ac_modes=[args.ac] if args.ac else AC_MODES)
    if args.json:
        print(json.dumps(_as_json(result, args.top), indent=2))
        return
    from ..plan.report import print_plan

    print_plan(result, args.top, args.verbose)
    if result.best is None:
        raise SystemExit(f"kunlun plan: no layout of {args.gpus} GPUs fits this job"
                         + ("" if args.verbose else " (-v says why each mesh was left out)"))


def _as_json(result, top: int) -> dict[str, Any]:
    from ..plan.report import estimate_dict, job_dict

    return {"job": job_dict(result.job, result.shape), "best": estimate_dict(result.best) if result.best else None,
            "fitting": [estimate_dict(e) for e in result.fitting[:top]], "fitting_count": len(result.fitting),
            "excluded": [{"mesh": mesh, "reason": why} for mesh, why in result.excluded]}
