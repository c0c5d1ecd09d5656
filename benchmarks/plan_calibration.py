"""The planner (`kunlun plan`) against published runs and against this project's own measured memory, and the
communication it predicts: the tables of docs/reports/BENCHMARKS.md, "Planning a run on N GPUs".

    python benchmarks/plan_calibration.py                  # the arithmetic tables (instant)
    python benchmarks/plan_calibration.py --measure        # + measured CPU peak memory (minutes: training steps)

Measured memory is ``benchmarks/train_memory.py``'s: the peak resident set size of a child process running
``kunlun train``'s step, minus its size before the first step (so: gradients, AdamW states, activations, loss
buffers). The children run with ``MALLOC_MMAP_THRESHOLD_`` fixed so that glibc gives freed tensors back to the
system (with its default, adaptive threshold the resident size also holds freed heap memory); the planner predicts
the live peak, fp32, one process, for the same config, batch and checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from kunlunbaize.arch import BASELINE, DEFAULT
from kunlunbaize.config import ModelConfig
from kunlunbaize.plan import Job, Layout, boundary_tensors, estimate, get_gpu, plan, shape_of
from kunlunbaize.plan.calibration import REFERENCES, TOLERANCE, predict

GiB, MiB = 2**30, 2**20
TRAIN_MEMORY = Path(__file__).with_name("train_memory.py")


def calibration_table() -> list[str]:
    """Predicted ÷ published throughput (and MFU, memory where published) of every reference run."""
    out = ["| run | GPUs | layout | published tokens/s/GPU | predicted | predicted ÷ published | published MFU | "
           "predicted MFU | published GiB/GPU | predicted GiB/GPU |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for ref in REFERENCES:
        e = predict(ref)
        pub_mfu = f"{ref.published_mfu:.0%}" if ref.published_mfu else "—"
        pub_mem = f"{ref.memory_gib:.1f}" if ref.memory_gib else "—"
        out.append(f"| {ref.name} | {ref.layout.world:,} | {ref.layout.describe()} | {ref.tokens_per_gpu:,.0f} | "
                   f"{e.tokens_per_gpu:,.0f} | {e.tokens_per_gpu / ref.tokens_per_gpu:.2f} | {pub_mfu} | "
                   f"{e.mfu:.0%} | {pub_mem} | {e.memory.total / GiB:.1f} |")
    out.append(f"\nAll within ±{TOLERANCE:.0%} (tests/test_plan.py::test_calibration_against_published_runs_is_within_"
               "30_percent).")
    return out


def traffic_table(preset: str, gpus: int, seq: int, batch: int, layouts: list[Layout]) -> list[str]:
    """Bytes per GPU per step by dimension for ``layouts`` of ``preset`` on H100s."""
    cfg = ModelConfig.preset(preset)
    job = Job(cfg=cfg, spec=DEFAULT, gpu=get_gpu("H100"), n_gpus=gpus, seq_len=seq, batch=batch)
    shape = shape_of(DEFAULT, cfg, seq)
    best = plan(job, fixed={"tp": 8}).best if preset == "paper" else None  # the planner's pick (TP in a node)
    layouts = layouts + ([best.layout] if best else [])
    out = [f"`{preset}`, {gpus} H100, batch {batch:,} × {seq:,} tokens, bf16 (GiB per GPU per step):\n",
           "| layout | FSDP | DP replicate | TP | PP | CP | step (s) | exposed comm (s) | GiB/GPU | fits |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for lay in layouts:
        e = estimate(job, shape, lay)
        t = e.traffic
        pick = " (the planner's best with tp 8)" if best and lay == best.layout else ""
        out.append(f"| {lay.describe()}{pick} | {t.fsdp / GiB:,.2f} | {t.dp_replicate / GiB:,.2f} | "
                   f"{t.tp / GiB:,.2f} | {t.pp / GiB:,.2f} | {t.cp / GiB:,.2f} | {e.step_seconds:,.2f} | "
                   f"{sum(e.exposed_seconds.values()):,.2f} | {e.memory.total / GiB:,.1f} | "
                   f"{'yes' if e.fits else 'no'} |")
    return out


def dense_traffic_table(preset: str, pp: int, seq: int, micro_batch: int = 1) -> list[str]:
    """Bytes one micro-batch sends across each stage boundary forward (the same again backward): the dense
    residual's earlier outputs, what the pipeline sends (those, or H_l and the partial sums when fewer), and a plain
    residual's one stream."""
    cfg = ModelConfig.preset(preset)
    per_stage = -(-cfg.n_layers // pp)
    tensor = micro_batch * seq * cfg.d_model * 2  # one bf16 [b, T, d]
    out = [f"`{preset}` ({cfg.n_layers} layers, d = {cfg.d_model}), pp = {pp}, micro-batch {micro_batch} × {seq} "
           "tokens, bf16, MiB per boundary per micro-batch (forward; the backward sends as much again):\n",
           "| boundary after layer | plain residual | dense: outputs H_0 … H_l | dense: as the pipeline sends it | "
           "dense ÷ plain |", "|---:|---:|---:|---:|---:|"]
    for s in range(1, pp):
        k = min(cfg.n_layers, s * per_stage)
        dense, sums = k + 1, boundary_tensors(k, cfg.n_layers)
        out.append(f"| {k} | {tensor / MiB:,.2f} | {dense * tensor / MiB:,.2f} | {sums * tensor / MiB:,.2f} | "
                   f"{dense:,}× ({sums:,}× sent) |")
    return out


def measured_memory(batch: int, seq: int) -> list[str]:
    """Measured step peak memory (CPU, fp32, one process) against the planner's, per architecture and
    checkpointing."""
    out = [f"`small`, batch {batch} × {seq}, fp32, one process, {platform.machine()}:\n",
           "| architecture | activation checkpointing | loss | measured MiB | predicted MiB | predicted ÷ measured |",
           "|---|---|---|---:|---:|---:|"]
    cfg = ModelConfig.preset("small")
    for spec in (DEFAULT, BASELINE):
        loss = "chunked" if spec.fused_loss else "logits"
        for ac in (0, 1):
            measured = _measure(spec.name, ac, loss, batch, seq)
            job = Job(cfg=cfg, spec=spec, gpu=get_gpu("H100"), n_gpus=1, seq_len=seq, batch=batch, precision="fp32")
            e = estimate(job, shape_of(spec, cfg, seq), Layout(micro_batch=batch, ac="full" if ac else "off"))
            predicted = e.memory.total - e.memory.parameters  # the weights exist before the step starts
            out.append(f"| {spec.title} | {'full' if ac else 'off'} | {loss} | {measured / MiB:,.0f} | "
                       f"{predicted / MiB:,.0f} | {predicted / measured:.2f} |")
    return out


def _measure(arch: str, ac: int, loss: str, batch: int, seq: int) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, str(TRAIN_MEMORY), "--child", "--arch", arch, "--ac", str(ac), "--loss", loss,
           "--preset", "small", "--batch-size", str(batch), "--seq-len", str(seq), "--steps", "1", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="also measure CPU peak memory (training steps)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    sections = [("Calibration against published runs", calibration_table())]
    small = [Layout(dp_shard=8, micro_batch=8), Layout(dp_shard=4, tp=2, micro_batch=16),
             Layout(dp_shard=4, pp=2, schedule="1f1b", micro_batch=4), Layout(dp_shard=4, cp=2, micro_batch=16),
             Layout(dp_shard=2, tp=2, pp=2, schedule="1f1b", micro_batch=8)]
    paper = [Layout(dp_shard=256, tp=8, micro_batch=1, ac="full"),
             Layout(dp_shard=32, tp=8, pp=8, schedule="1f1b", micro_batch=1, ac="full"),
             Layout(dp_shard=32, tp=8, pp=8, schedule="interleaved", micro_batch=1, ac="full")]
    sections.append(("Communication per step by dimension", [
        *traffic_table("small", 8, 256, 256, small), "", *traffic_table("paper", 2048, 4096, 3072, paper)]))
    sections.append(("The dense residual across pipeline stage boundaries", [
        *dense_traffic_table("small", 2, 256), "", *dense_traffic_table("paper", 8, 4096)]))
    if args.measure:
        sections.append(("Memory model against measured peak memory (CPU)", measured_memory(args.batch_size,
                                                                                            args.seq_len)))
    for title, lines in sections:
        print(f"#### {title}\n")
        print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
