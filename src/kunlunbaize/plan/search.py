"""Every layout of a job: the meshes that can hold the model, each with its schedules, micro-batches and
checkpointing; which fit in memory, the fastest, and why the others were left out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .estimate import Estimate, estimate
from .layout import AC_MODES, SCHEDULES, Job, Layout, divisors, factorizations, layout_problems, mesh_problems
from .shape import Shape, shape_of

MESH_DIMS = ("dp_replicate", "dp_shard", "tp", "pp", "cp")
MAX_MICRO_BATCH = 64


@dataclass
class Plan:
    """The layouts that fit (fastest first) and those left out, with the reason."""

    job: Job
    shape: Shape
    fitting: list[Estimate] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (layout, why)

    @property
    def best(self) -> Estimate | None:
        return self.fitting[0] if self.fitting else None


def meshes(job: Job, fixed: dict[str, int] | None = None) -> Iterable[dict[str, int]]:
    """Every dp_replicate × dp_shard × tp × pp × cp whose product is the job's GPU count and that keeps the sizes
    in ``fixed``."""
    fixed = fixed or {}
    for sizes in factorizations(job.n_gpus, len(MESH_DIMS)):
        mesh = dict(zip(MESH_DIMS, sizes, strict=True))
        if all(mesh[k] == v for k, v in fixed.items()):
            yield mesh


def candidates(job: Job, mesh: dict[str, int], schedules: Iterable[str] = SCHEDULES,
               micro_batches: Iterable[int] | None = None, ac_modes: Iterable[str] = AC_MODES) -> Iterable[Layout]:
    """The layouts of one mesh: each schedule it can run, each micro-batch that divides a rank's batch, each
    checkpointing mode."""
    per_rank = max(1, job.batch // (mesh["dp_replicate"] * mesh["dp_shard"]))
    sizes = list(micro_batches) if micro_batches else [b for b in divisors(per_rank) if b <= MAX_MICRO_BATCH]
    for schedule in schedules:
        if (schedule == "none") != (mesh["pp"] == 1):
            continue
        for b in sizes:
            for ac in ac_modes:
                yield Layout(**mesh, schedule=schedule, micro_batch=b, ac=ac)


def plan(job: Job, fixed: dict[str, int] | None = None, schedules: Iterable[str] = SCHEDULES,
         micro_batches: Iterable[int] | None = None, ac_modes: Iterable[str] = AC_MODES) -> Plan:
    """Estimate every valid layout of ``job`` (mesh sizes in ``fixed`` kept); the fitting ones sorted fastest first
    (then the simplest), each mesh left out with its reason. A layout that fits without (or with less) checkpointing is
    not listed again with more: that is only slower."""
    schedules, ac_modes = tuple(schedules), tuple(ac_modes)
    result = Plan(job=job, shape=shape_of(job.spec, job.cfg, job.seq_len))
    for mesh in meshes(job, fixed):
        base = Layout(**mesh, schedule="none" if mesh["pp"] == 1 else "1f1b")
        problems = mesh_problems(job, base)
        if problems:
            result.excluded.append((base.mesh(), "; ".join(problems)))
            continue
        best_missing: Estimate | None = None
        before = len(result.fitting)
        fitted: set[tuple[str, int]] = set()  # (schedule, micro-batch) that fit with less checkpointing
        for layout in candidates(job, mesh, schedules, micro_batches, ac_modes):
            if (layout.schedule, layout.micro_batch) in fitted or layout_problems(job, layout):
                continue
            est = estimate(job, result.shape, layout)
            if est.fits:
                result.fitting.append(est)
                fitted.add((layout.schedule, layout.micro_batch))
            elif best_missing is None or est.memory.total < best_missing.memory.total:
                best_missing = est
        if len(result.fitting) == before:
            result.excluded.append((base.mesh(), _why_none(job, best_missing)))
    result.fitting.sort(key=_rank)
    return result


def _rank(e: Estimate) -> tuple:
    """Fastest first; among equally fast layouts (to 4 digits) the simpler one (less cp, pp, tp, replication),
    then the smaller."""
    lay = e.layout
    return (-float(f"{e.tokens_per_gpu:.4g}"), lay.cp, lay.pp, lay.tp, lay.dp_replicate, e.memory.total)


def _why_none(job: Job, closest: Estimate | None) -> str:
    if closest is None:
        return "no schedule and micro-batch fit the batch (see the micro-batch and schedule rules)"
    need, have = closest.memory.total / 2**30, job.memory_headroom * job.gpu.memory / 2**30
    return f"out of memory: the smallest layout ({closest.layout.describe()}) needs {need:,.1f} GiB > {have:,.1f} GiB"
