"""Step time, throughput and MFU of one layout: compute at an achievable share of the peak, the pipeline bubble of
its schedule, and the communication that compute does not hide."""

from __future__ import annotations

from dataclasses import dataclass

from .comm import DIMENSIONS, Traffic, traffic
from .layout import Job, Layout
from .memory import RECOMPUTE, Memory, layers_per_rank, peak_ranks, rank_memory
from .shape import Shape

LINK_EFFICIENCY = 0.8
"""The share of a link's bandwidth a collective reaches (NCCL's bus bandwidth on NVLink and InfiniBand)."""
MESH_ORDER = ("tp", "cp", "fsdp", "dp_replicate", "pp")
"""Mesh dimensions innermost first (torchtitan's order): tensor parallelism within a node, pipeline across nodes."""
PAPER_TOKENS = 12.3e12
"""The paper's pre-training tokens."""


@dataclass(frozen=True)
class Estimate:
    """What one layout costs: memory on its fullest GPU, traffic and time per step, throughput."""

    job: Job
    layout: Layout
    memory: Memory
    traffic: Traffic
    comm_seconds: dict[str, float]  # time of each dimension's traffic
    exposed_seconds: dict[str, float]  # … of it that compute does not hide
    compute_seconds: float  # the pipeline's compute, bubble included
    bubble: float  # the share of the compute time a GPU idles in the pipeline's fill and drain

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.job.memory_headroom * self.job.gpu.memory

    @property
    def step_seconds(self) -> float:
        return self.compute_seconds + sum(self.exposed_seconds.values())

    @property
    def tokens_per_gpu(self) -> float:
        """Tokens per second per GPU."""
        return self.job.tokens / self.step_seconds / self.job.n_gpus

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_gpu * self.job.n_gpus * 86400

    @property
    def days_for_paper(self) -> float:
        """Days to train on the paper's 12.3T tokens."""
        return PAPER_TOKENS / self.tokens_per_day

    @property
    def mfu(self) -> float:
        """Model FLOPs (the spec's training FLOPs, no recomputation) ÷ the dense bf16 peak."""
        flops = self.job.spec.training_flops(self.job.cfg, self.job.seq_len)
        return flops * self.tokens_per_gpu / self.job.gpu.bf16_flops


def estimate(job: Job, shape: Shape, layout: Layout) -> Estimate:
    """The :class:`Estimate` of ``layout`` for ``job`` (the layout is assumed valid: see ``layout_problems``)."""
    memory = max((rank_memory(job, shape, layout, r) for r in peak_ranks(layout)), key=lambda mem: mem.total)
    m = layout.micro_batches(job.batch)
    per_micro = max(_rank_compute(job, shape, layout, r) for r in {0, layout.pp - 1})
    p, v = layout.pp, layout.virtual
    slots = m + p - 1 if layout.schedule in ("gpipe", "1f1b") else (m * v + p - 1) / v if p > 1 else m
    compute = slots * per_micro
    moved = traffic(job, shape, layout)
    seconds = {dim: getattr(moved, dim) / (_bandwidth(job, layout, dim) * LINK_EFFICIENCY) for dim in DIMENSIONS}
    units = max(1, layers_per_rank(shape, layout))
    busy = m * per_micro
    exposed = {
        # FSDP prefetches the next layer's weights: the first gather and the last scatter wait, the rest overlaps
        "fsdp": max(0.0, seconds["fsdp"] - busy) + seconds["fsdp"] / units,
        # the gradient all-reduce starts as the backward pass (two thirds of the compute) produces gradients
        "dp_replicate": max(0.0, seconds["dp_replicate"] - 2 * busy / 3) + seconds["dp_replicate"] / units,
        "tp": (1 - job.tp_overlap) * seconds["tp"],
        "pp": seconds["pp"],
        # ring attention overlaps the next shard's keys and values with this shard's attention
        "cp": max(0.0, seconds["cp"] - busy * shape.attention_share),
    }
    return Estimate(job=job, layout=layout, memory=memory, traffic=moved, comm_seconds=seconds,
                    exposed_seconds=exposed, compute_seconds=compute, bubble=1 - busy / compute)


def _rank_compute(job: Job, shape: Shape, layout: Layout, rank: int) -> float:
    """Seconds of compute for one micro-batch on pipeline rank ``rank``."""
    tokens = layout.micro_batch * job.seq_len
    flops = layers_per_rank(shape, layout) * shape.layer_flops * RECOMPUTE[layout.ac]
    if rank == layout.pp - 1:
        flops += shape.head_flops + shape.mtp_flops
    per_flop = ((1 - shape.attention_share) / job.gpu.peak(job.precision)
                + shape.attention_share / job.gpu.bf16_flops)
    return tokens * flops * per_flop / (layout.tp * layout.cp * job.efficiency)


def _bandwidth(job: Job, layout: Layout, dim: str) -> float:
    """Per-GPU bandwidth of the links a dimension's collectives use: NVLink while its group (and every dimension
    inside it) fits in a node, the network otherwise."""
    sizes = {"tp": layout.tp, "cp": layout.cp, "fsdp": layout.dp_shard * layout.cp, "dp_replicate":
             layout.dp_replicate, "pp": layout.pp}
    span = 1
    for name in MESH_ORDER:
        span *= sizes[name] if name != "fsdp" else layout.dp_shard
        if name == dim:
            break
    return job.gpu.nvlink if span <= job.node else job.gpu.network
