"""What the planner plans: the job (:class:`Job`: model, GPUs, sequence length, batch) and one way to lay it out
(:class:`Layout`: the five mesh dimensions, the pipeline schedule, the micro-batch, activation checkpointing), with
the reasons a layout cannot run (:func:`layout_problems`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..arch import ArchSpec
from ..config import ModelConfig
from .hardware import GPU

SCHEDULES = ("none", "gpipe", "1f1b", "interleaved")
"""Pipeline schedules: ``none`` without pipelining; GPipe, 1F1B and interleaved 1F1B with several stages per rank
(:data:`INTERLEAVE` unless the layout says; PyTorch's ``ScheduleGPipe``, ``Schedule1F1B``,
``ScheduleInterleaved1F1B``)."""
INTERLEAVE = 2
AC_MODES = ("off", "selective", "full")
"""Activation checkpointing: none; selective (the matmul outputs kept, the rest recomputed: about half the
activations and a sixth more compute, torchtitan's ``op`` policy); full (each block's input kept, the block recomputed
in the backward pass: a third more block compute)."""
PRECISIONS = ("bf16", "fp8", "fp32")
"""bf16 mixed precision (fp32 master weights and optimiser states); fp8 linear layers on top of that (torchao's
Float8Linear: the linears' matmuls at the fp8 peak); fp32 (no mixed precision, as on a CPU)."""


@dataclass(frozen=True)
class Job:
    """A training job to lay out: the model, the GPUs, the sequence length and the global batch."""

    cfg: ModelConfig
    spec: ArchSpec
    gpu: GPU
    n_gpus: int
    seq_len: int
    batch: int  # global batch, sequences per optimiser step
    precision: str = "bf16"
    efficiency: float = 0.44  # the share of the dense peak that the matmuls reach when nothing waits
    tp_overlap: float = 0.0  # the share of tensor-parallel traffic hidden behind compute (async TP: ~0.75)
    memory_headroom: float = 0.9  # the share of HBM a layout may plan for (the allocator, the CUDA context)
    gpus_per_node: int = 0  # 0: the GPU's node size

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: one of {', '.join(PRECISIONS)}")

    @property
    def node(self) -> int:
        """GPUs per node (the NVLink domain)."""
        return self.gpus_per_node or self.gpu.gpus_per_node

    @property
    def tokens(self) -> int:
        """Tokens per optimiser step."""
        return self.batch * self.seq_len


@dataclass(frozen=True)
class Layout:
    """dp_replicate × dp_shard × tp × pp × cp GPUs, a pipeline schedule, a micro-batch and activation
    checkpointing. ``dp_shard`` (with ``cp``) is FSDP's sharding group, ``dp_replicate`` HSDP's replicas."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    schedule: str = "none"
    micro_batch: int = 1  # sequences per micro-batch on one data-parallel rank
    ac: str = "off"
    stages_per_rank: int = 0  # interleaved 1F1B's virtual stages per rank (0: INTERLEAVE)

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def virtual(self) -> int:
        """Pipeline stages per rank."""
        return (self.stages_per_rank or INTERLEAVE) if self.schedule == "interleaved" else 1

    def micro_batches(self, batch: int) -> int:
        """Micro-batches per step on one data-parallel rank (pipeline micro-batches or accumulation steps)."""
        return max(1, batch // (self.dp * self.micro_batch))

    def mesh(self) -> str:
        """``dp_replicate×dp_shard×tp×pp×cp``, e.g. ``1×8×8×8×1``."""
        return "×".join(str(n) for n in (self.dp_replicate, self.dp_shard, self.tp, self.pp, self.cp))

    def describe(self) -> str:
        """One line: the mesh, the schedule, the micro-batch and checkpointing."""
        schedule = f"interleaved×{self.virtual}" if self.schedule == "interleaved" else self.schedule
        return f"{self.mesh()} {schedule} mb{self.micro_batch} ac-{self.ac}"


def mesh_problems(job: Job, layout: Layout) -> list[str]:
    """Why the mesh of ``layout`` cannot hold ``job``'s model (empty when it can): sizes against the world, heads,
    widths, layers, sequence and batch."""
    cfg, t = job.cfg, layout.tp
    out = []
    if layout.world != job.n_gpus:
        out.append(f"the mesh has {layout.world} GPUs, not {job.n_gpus}")
    if t > job.node:
        out.append(f"tp={t} spans more than a node of {job.node} GPUs")
    if cfg.n_heads % t:
        out.append(f"n_heads={cfg.n_heads} not divisible by tp={t}")
    if cfg.n_kv_heads % t and t % cfg.n_kv_heads:
        out.append(f"n_kv_heads={cfg.n_kv_heads} neither divisible by tp={t} nor dividing it (to replicate)")
    widths = [("ffn_hidden", cfg.ffn_hidden)] if not cfg.transformerx else [("scale_ffn_hidden", cfg.scale_hidden)]
    out += [f"{name}={w} not divisible by tp={t}" for name, w in widths if w % t]
    stages = layout.pp * layout.virtual
    if cfg.n_layers < stages:
        out.append(f"n_layers={cfg.n_layers} fewer than the {stages} pipeline stages")
    if job.seq_len % (2 * layout.cp) and layout.cp > 1:
        out.append(f"seq_len={job.seq_len} not divisible by 2·cp={2 * layout.cp} (load-balanced causal shards)")
    if job.seq_len % t and t > 1:
        out.append(f"seq_len={job.seq_len} not divisible by tp={t} (sequence parallelism)")
    if job.batch % layout.dp:
        out.append(f"global batch {job.batch} not divisible by dp={layout.dp}")
    if (layout.pp > 1) != (layout.schedule != "none"):
        out.append(f"schedule {layout.schedule} with pp={layout.pp}")
    return out


def layout_problems(job: Job, layout: Layout) -> list[str]:
    """:func:`mesh_problems` and the micro-batch's: it divides the per-rank batch, and a 1F1B pipeline has at least
    as many micro-batches as stages (interleaved: a multiple of pp)."""
    out = mesh_problems(job, layout)
    if job.batch % layout.dp == 0:
        per_rank = job.batch // layout.dp
        m = per_rank // layout.micro_batch
        if per_rank % layout.micro_batch:
            out.append(f"micro-batch {layout.micro_batch} does not divide the {per_rank} sequences per rank")
        elif layout.schedule in ("1f1b", "interleaved") and m < layout.pp:
            out.append(f"{m} micro-batches for {layout.pp} stages ({layout.schedule} needs at least pp)")
        elif layout.schedule == "interleaved" and m % layout.pp:
            out.append(f"{m} micro-batches not a multiple of pp={layout.pp} (interleaved 1F1B)")
    return out


def factorizations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every ordered way to write ``n`` as a product of ``parts`` positive integers."""
    if parts == 1:
        return [(n,)]
    return [(d, *rest) for d in divisors(n) for rest in factorizations(n // d, parts - 1)]


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))
