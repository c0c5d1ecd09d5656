"""A plan as text (the table ``kunlun plan`` prints) and as plain dicts (its ``--json``)."""

from __future__ import annotations

from typing import Any

from .comm import DIMENSIONS
from .estimate import PAPER_TOKENS, Estimate
from .layout import Job
from .search import Plan
from .shape import Shape

GiB = 2**30
MEMORY_PARTS = ("parameters", "gradients", "optimizer", "activations", "dense_outputs", "pipeline_buffers", "other",
                "transient")


def job_dict(job: Job, shape: Shape) -> dict[str, Any]:
    """The job's settings and the model's size."""
    return {"arch": job.spec.name, "gpu": job.gpu.name, "gpus": job.n_gpus, "seq_len": job.seq_len,
            "batch": job.batch, "batch_tokens": job.tokens, "precision": job.precision, "efficiency": job.efficiency,
            "tp_overlap": job.tp_overlap, "params": shape.params, "training_flops_per_token": shape.flops,
            "memory_limit_bytes": job.memory_headroom * job.gpu.memory}


def estimate_dict(e: Estimate) -> dict[str, Any]:
    """One layout's figures: memory per GPU by part, traffic and exposed time per dimension, timing."""
    lay = e.layout
    return {
        "layout": {"dp_replicate": lay.dp_replicate, "dp_shard": lay.dp_shard, "tp": lay.tp, "pp": lay.pp,
                   "cp": lay.cp, "schedule": lay.schedule, "stages_per_rank": lay.virtual,
                   "micro_batch": lay.micro_batch, "micro_batches": lay.micro_batches(e.job.batch),
                   "activation_checkpointing": lay.ac},
        "memory_bytes": {**{k: getattr(e.memory, k) for k in MEMORY_PARTS},
                         "activations_no_ac": e.memory.activations_no_ac,
                         "activations_full_ac": e.memory.activations_full_ac, "total": e.memory.total},
        "traffic_bytes_per_step": e.traffic.as_dict(),
        "comm_seconds": e.comm_seconds, "exposed_comm_seconds": e.exposed_seconds,
        "compute_seconds": e.compute_seconds, "bubble": e.bubble, "step_seconds": e.step_seconds,
        "tokens_per_second_per_gpu": e.tokens_per_gpu, "tokens_per_day": e.tokens_per_day, "mfu": e.mfu,
        "days_for_paper_tokens": e.days_for_paper,
    }


def _row(e: Estimate) -> str:
    lay = e.layout
    schedule = f"{lay.schedule}×{lay.virtual}" if lay.schedule == "interleaved" else lay.schedule
    return (f"{lay.dp_replicate:>4} {lay.dp_shard:>5} {lay.tp:>3} {lay.pp:>3} {lay.cp:>3}  {schedule:<13} "
            f"{lay.micro_batch:>3} {lay.ac:<9} {e.memory.total / GiB:>8.1f} {e.bubble:>6.1%} "
            f"{e.step_seconds:>8.2f} {e.tokens_per_gpu:>10,.0f} {e.mfu:>6.1%} {e.days_for_paper:>9,.0f}")


def layout_table(estimates: list[Estimate]) -> list[str]:
    """The layouts, one a line, under a header."""
    head = (f"{'rep':>4} {'shard':>5} {'tp':>3} {'pp':>3} {'cp':>3}  {'schedule':<13} {'mb':>3} {'ac':<9} "
            f"{'GiB/GPU':>8} {'bubble':>6} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>6} {'days*':>9}")
    return [head, *(_row(e) for e in estimates)]


def breakdown(e: Estimate) -> list[str]:
    """Memory by part, traffic and exposed time by dimension, and the totals, of one layout."""
    mem = e.memory
    lines = [f"memory per GPU (fullest pipeline rank): {mem.total / GiB:,.2f} GiB"]
    lines += [f"  {k.replace('_', ' '):<22} {getattr(mem, k) / GiB:>10,.2f} GiB" for k in MEMORY_PARTS]
    lines.append(f"  (activations without checkpointing {mem.activations_no_ac / GiB:,.2f} GiB, with full "
                 f"checkpointing {mem.activations_full_ac / GiB:,.2f} GiB)")
    lines.append("communication per GPU per step:")
    lines += [f"  {dim:<13} {getattr(e.traffic, dim) / GiB:>10,.2f} GiB  {e.comm_seconds[dim]:>8.3f} s "
              f"({e.exposed_seconds[dim]:.3f} s exposed)" for dim in DIMENSIONS]
    lines.append(f"compute {e.compute_seconds:.3f} s a step (pipeline bubble {e.bubble:.1%}), step "
                 f"{e.step_seconds:.3f} s, {e.tokens_per_gpu:,.0f} tokens/s/GPU, MFU {e.mfu:.1%}")
    lines.append(f"{e.tokens_per_day / 1e9:,.2f}B tokens a day: {e.days_for_paper:,.1f} days for the paper's "
                 f"{PAPER_TOKENS / 1e12:.1f}T tokens")
    return lines


def print_plan(result: Plan, top: int, verbose: bool) -> None:
    """Print the job, the ``top`` fastest fitting layouts, the best one's breakdown and (``verbose``) every mesh
    left out with the reason."""
    job, shape = result.job, result.shape
    print(f"{job.spec.title}: {shape.params / 1e9:,.2f}B parameters, {shape.flops / 1e9:,.1f} GFLOP/token "
          f"(training, T={job.seq_len}); {job.n_gpus} × {job.gpu.name} ({job.precision}, matmuls at "
          f"{job.efficiency:.0%} of peak); batch {job.batch:,} × {job.seq_len:,} = {job.tokens:,} tokens")
    if verbose and result.excluded:
        print("\nleft out (dp_replicate×dp_shard×tp×pp×cp: why):")
        for mesh, why in result.excluded:
            print(f"  {mesh}: {why}")
    if result.best is None:
        return
    print(f"\n{len(result.fitting):,} layouts fit; the fastest {min(top, len(result.fitting))}:")
    print("\n".join(layout_table(result.fitting[:top])))
    print(f"  * days for the paper's {PAPER_TOKENS / 1e12:.1f}T tokens")
    print(f"\nbest: {result.best.layout.describe()}")
    print("\n".join(breakdown(result.best)))
