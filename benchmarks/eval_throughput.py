"""Evaluation throughput: batched (left-padded, cached) generation and scoring vs. one prompt at a time.

Side by side in one process, rounds interleaved: the same task, the same problems, through ``kunlun eval``'s own
runner (records written, answers scored), once per batch size. The greedy outputs of every batch size must be
identical (the script fails otherwise); the figure is problems per second and its ratio to batch size 1. A
multiple-choice "batch size" counts continuations: batch size 16 scores 4 four-choice problems per forward, batch
size 1 one problem (its 4 choices) per forward. "distinct outputs" counts the different outputs (generated texts,
or predicted choices) among the problems: a model that writes the same text for every prompt checks little.

    python benchmarks/eval_throughput.py                                  # runs/small, arith (gen) + arith-mc
    python benchmarks/eval_throughput.py --checkpoint runs/small --limit 64 --batch-sizes 1,8,16,32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kunlunbaize.eval.model import EvalModel
from kunlunbaize.eval.runner import TaskRunner
from kunlunbaize.eval.tasks import make_task


def run(model: EvalModel, spec: str, limit: int, batch_size: int) -> tuple[float, list]:
    """Seconds for ``limit`` problems of ``spec`` at ``batch_size``, and what each problem produced."""
    with tempfile.TemporaryDirectory() as tmp:
        task = make_task(spec)
        runner = TaskRunner(model, task, Path(tmp), checkpoint_hash="bench", batch_size=batch_size, limit=limit,
                            progress=False, log=lambda m: None)
        t0 = time.perf_counter()
        runner.run()
        seconds = time.perf_counter() - t0
        lines = [json.loads(ln) for ln in (Path(tmp) / "records.jsonl").read_text().splitlines()]
    key = "output" if task.kind != "mc" else "pred"
    return seconds, [ln[key] for ln in lines]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/small")
    ap.add_argument("--tasks", default="arith,arith-mc", help="comma-separated task names")
    ap.add_argument("--limit", type=int, default=64, help="problems per task")
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = EvalModel(args.checkpoint)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; checkpoint {model.checkpoint} "
          f"({sum(p.numel() for p in model.model.parameters()):,} parameters, context {model.context}); "
          f"{args.limit} problems per task, {args.rounds} rounds (median)")
    print("| task | batch size | seconds | problems/s | vs batch 1 | outputs identical | distinct outputs |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for spec in args.tasks.split(","):
        run(model, spec, min(4, args.limit), sizes[-1])  # warm-up
        times: dict[int, list[float]] = {b: [] for b in sizes}
        outputs: dict[int, list] = {}
        for _ in range(args.rounds):
            for b in sizes:
                seconds, out = run(model, spec, args.limit, b)
                times[b].append(seconds)
                outputs[b] = out
        base = statistics.median(times[sizes[0]])
        for b in sizes:
            t = statistics.median(times[b])
            same = outputs[b] == outputs[sizes[0]]
            distinct = len({json.dumps(o) for o in outputs[b]})
            print(f"| {spec} | {b} | {t:.2f} | {args.limit / t:.1f} | {base / t:.2f}× | {'yes' if same else 'NO'} "
                  f"| {distinct} |")
            if not same:
                raise SystemExit(f"{spec}: batch size {b} changed the outputs")


if __name__ == "__main__":
    main()
