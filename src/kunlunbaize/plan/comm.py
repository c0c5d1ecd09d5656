"""Communication per GPU per optimiser step, by mesh dimension: bytes each GPU sends with ring collectives (an
all-gather or reduce-scatter of a tensor of X bytes over n ranks sends X·(n−1)/n; an all-reduce twice that), and
the dense residual's traffic across each pipeline stage boundary."""

from __future__ import annotations

from dataclasses import dataclass

from .boundary import boundary_tensors
from .layout import Job, Layout
from .memory import act_bytes, layers_per_rank, rank_params
from .shape import Shape

DIMENSIONS = ("fsdp", "dp_replicate", "tp", "pp", "cp")


@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU sends per optimiser step in each mesh dimension."""

    fsdp: float  # parameter all-gathers and gradient reduce-scatters over dp_shard × cp
    dp_replicate: float  # gradient all-reduce across HSDP replicas
    tp: float  # sequence-parallel all-gathers and reduce-scatters of the layers (forward, backward, recompute)
    pp: float  # activations and their gradients across stage boundaries (all earlier outputs with a dense residual)
    cp: float  # keys and values all-gathered from the other sequence shards, their gradients reduce-scattered

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in DIMENSIONS}


def ring(n: int) -> float:
    """The share of a collective's tensor each of ``n`` ranks sends in a ring all-gather or reduce-scatter."""
    return (n - 1) / n


def traffic(job: Job, shape: Shape, layout: Layout) -> Traffic:
    """The :class:`Traffic` of the busiest GPU of ``layout`` (the pipeline's: every send as large as the largest
    boundary's)."""
    t, c, p, m = layout.tp, layout.cp, layout.pp, layout.micro_batches(job.batch)
    a = act_bytes(job)
    params = max(rank_params(shape, layout, r) for r in {0, p - 1}) / t
    shard = layout.dp_shard * layout.cp
    weight_bytes = 4 if job.precision == "fp32" else 2
    gathers, scatters = (2 * m, m) if p == 1 else (1, 1)  # FSDP2 reshards after each forward without a pipeline
    fsdp = (gathers * weight_bytes + scatters * 4) * params * ring(shard) if shard > 1 else 0.0
    r = layout.dp_replicate
    replicate = 2 * ring(r) * 4 * params / shard if r > 1 else 0.0

    tokens = layout.micro_batch * job.seq_len / c  # per micro-batch on one cp rank
    layers = layers_per_rank(shape, layout)
    collectives = 6 if layout.ac == "full" else 4  # forward AG + RS, backward RS + AG, the recomputed forward's
    regions = layers * shape.tp_regions + (1 + shape.mtp_depth) + 1  # + head and MTP depths, embedding
    tp = m * regions * collectives * tokens * shape.d * a * ring(t) if t > 1 else 0.0

    carried = max(boundary_tensors(after, shape.n_layers, shape.dense_residual)
                  for after in _boundaries(shape, layout)) if p > 1 else 0
    pp = m * layout.virtual * 2 * carried * tokens * shape.d * a / t if p > 1 else 0.0

    kv_local = 2 * shape.kv_dim / min(t, shape.n_kv_heads)  # keys and values (KV heads split, or replicated)
    ops = layers * shape.attention_ops + shape.mtp_depth
    passes = 3 if layout.ac == "full" else 2  # forward all-gather, backward reduce-scatter, recomputed forward
    cp = m * ops * passes * layout.micro_batch * job.seq_len * kv_local * a * ring(c) if c > 1 else 0.0
    return Traffic(fsdp=fsdp, dp_replicate=replicate, tp=tp, pp=pp, cp=cp)


def _boundaries(shape: Shape, layout: Layout) -> list[int]:
    """Layers done before each stage boundary of ``layout``."""
    stages = layout.pp * layout.virtual
    per_stage = -(-shape.n_layers // stages)
    return [min(shape.n_layers, s * per_stage) for s in range(1, stages)]
