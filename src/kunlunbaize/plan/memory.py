"""Memory per GPU of one layout: parameters, gradients, optimiser states, activations, the dense residual's stored
outputs and the pipeline's buffers, on every pipeline rank (the planner keeps the largest)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .boundary import boundary_tensors
from .layout import Job, Layout
from .shape import Shape

CHUNK_ROWS = 1024  # rows of logits the chunked loss makes at a time (model/fused_loss.py's CHUNK_ROWS)
RECOMPUTE = {"off": 1.0, "selective": 7 / 6, "full": 4 / 3}
"""Layer compute with checkpointing ÷ without: selective recomputes every second forward matmul (a sixth of the
layer's forward + backward), full recomputes the whole forward (a third)."""


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU of one pipeline rank."""

    parameters: float  # fp32 master shard and the bf16 working copies
    gradients: float
    optimizer: float  # AdamW's two fp32 moments
    activations: float  # of the layers, under the layout's checkpointing
    activations_no_ac: float  # … without checkpointing
    activations_full_ac: float  # … with full checkpointing
    dense_outputs: float  # the dense residual's stored outputs H_0 … H_l of the micro-batches in flight
    pipeline_buffers: float  # send/receive buffers of the stage boundaries
    other: float  # the MTP depths' and the loss's activations, each head's weight gradient in the chunked loss
    transient: float  # the larger of two buffers never alive together: the chunked loss's logits (forward) and
    # the layer recomputed under full checkpointing (backward)

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer + self.activations + self.dense_outputs
                + self.pipeline_buffers + self.other + self.transient)


def act_bytes(job: Job) -> int:
    """Bytes of one stored activation element."""
    return 4 if job.precision == "fp32" else 2


def layers_per_rank(shape: Shape, layout: Layout) -> int:
    """Layers on the most loaded pipeline rank (the stages split the layers as evenly as they can)."""
    return math.ceil(shape.n_layers / (layout.pp * layout.virtual)) * layout.virtual


def rank_params(shape: Shape, layout: Layout, rank: int) -> float:
    """Parameters on pipeline rank ``rank`` (all of them without tensor or data sharding)."""
    p = layers_per_rank(shape, layout) * shape.layer_params + shape.dense_params
    if rank == 0:
        p += shape.embed_params
    if rank == layout.pp - 1:
        p += shape.head_params + shape.mtp_params
    return p


def in_flight(layout: Layout, m: int, rank: int) -> float:
    """Micro-batches whose activations pipeline rank ``rank`` holds at its peak, in units of all its layers."""
    p = layout.pp
    if layout.schedule == "none":
        return 1.0
    if layout.schedule == "gpipe":
        return float(m)
    if layout.schedule == "1f1b":
        return float(min(m, p - rank))
    v = layout.virtual  # torch's ScheduleInterleaved1F1B: warm-up forwards of chunks of 1/v of the rank's layers
    warmup = 2 * (p - rank - 1) + (v - 1) * p + 1
    return min(m * v, warmup) / v


def peak_ranks(layout: Layout) -> list[int]:
    """The pipeline ranks whose memory can be the largest: the first (most micro-batches in flight, the embedding),
    the last (the head, the MTP depths, the loss) and the middle ones, where the dense residual's stored outputs
    (micro-batches in flight × outputs up to the rank) peak."""
    p = layout.pp
    middle = (p - 1) // 2
    return sorted({r for r in (0, middle - 1, middle, middle + 1, p - 1) if 0 <= r < p})


def rank_memory(job: Job, shape: Shape, layout: Layout, rank: int) -> Memory:
    """The :class:`Memory` of pipeline rank ``rank`` of ``layout``."""
    t, c, m = layout.tp, layout.cp, layout.micro_batches(job.batch)
    a = act_bytes(job)
    tokens = layout.micro_batch * job.seq_len / c  # one micro-batch's tokens on this rank (sequence / cp)
    n_layers, flying = layers_per_rank(shape, layout), in_flight(layout, m, rank)
    per_token = {"off": shape.layer_act, "selective": shape.layer_act / 2, "full": shape.d}

    def layers(ac: str) -> float:
        return flying * n_layers * per_token[ac] * tokens * a / t

    stored, carried = _dense_states(shape, layout, rank)
    dense = flying * stored * shape.d * tokens * a / t if shape.dense_residual else 0.0
    buffers = 4 * carried * shape.d * tokens * a / t if layout.pp > 1 else 0.0  # send + receive, forward + backward
    other, chunk = _loss_memory(job, shape, tokens, t) if rank == layout.pp - 1 else (0.0, 0.0)
    recomputed = shape.layer_act * tokens * a / t if layout.ac == "full" else 0.0
    weights, grads, optim = _state_memory(job, shape, layout, rank)
    return Memory(parameters=weights, gradients=grads, optimizer=optim, activations=layers(layout.ac),
                  activations_no_ac=layers("off"), activations_full_ac=layers("full"), dense_outputs=dense,
                  pipeline_buffers=buffers, other=other, transient=max(chunk, recomputed))


def _dense_states(shape: Shape, layout: Layout, rank: int) -> tuple[int, int]:
    """Width-d tensors per token rank ``rank`` keeps for its stages' mixes (what each stage received — H_0 … H_s or
    the partial sums, :func:`boundary_tensors` — plus its own layers' outputs) and the most any of its stages
    receives."""
    stages = layout.pp * layout.virtual
    per_stage = math.ceil(shape.n_layers / stages)
    stored, carried = 0, 1
    for stage in range(rank, stages, layout.pp):
        start = min(shape.n_layers, stage * per_stage)
        received = boundary_tensors(start, shape.n_layers, shape.dense_residual)
        stored += received + min(shape.n_layers, start + per_stage) - start
        carried = max(carried, received)
    return stored, carried


def _loss_memory(job: Job, shape: Shape, tokens: float, t: int) -> tuple[float, float]:
    """The last stage's activations outside the layers (final norm, MTP depths, the loss of each head) and the
    chunked loss's short-lived logits."""
    a, heads = act_bytes(job), 1 + shape.mtp_depth
    per_token = (shape.tail_act + shape.mtp_act) * a / t
    if shape.fused_loss:  # each head's fp32 weight gradient; one chunk's fp32 logits, softmax and gradient at a time
        rows = min(CHUNK_ROWS, tokens * t)
        return per_token * tokens + heads * shape.vocab * shape.d / t * 4, rows * shape.vocab / t * 4 * 3
    # [tokens, vocabulary] logits, their fp32 log-softmax and its gradient, per head
    return per_token * tokens + heads * tokens * shape.vocab / t * (a + 8), 0.0


def _state_memory(job: Job, shape: Shape, layout: Layout, rank: int) -> tuple[float, float, float]:
    """Parameters, gradients and AdamW states of rank ``rank``: fp32 shards over FSDP's dp_shard × cp group, and
    the unsharded working copies. Under FSDP without a pipeline: the bf16 weights and gradients of two layers in
    flight (gathered and scattered layer by layer, every micro-batch); with a pipeline: the stage's bf16 weights and
    fp32 gradients, gathered once and reduced once a step (as the comm model counts). Without FSDP: every weight's
    bf16 copy and its fp32 gradient."""
    t, shard = layout.tp, layout.dp_shard * layout.cp
    params = rank_params(shape, layout, rank) / t
    mixed = job.precision != "fp32"
    low = 2 if mixed else 4
    if shard == 1:
        return 4 * params + (2 * params if mixed else 0.0), 4 * params, 8 * params
    if layout.pp > 1:
        weights, grads = 4 * params / shard + low * params, 4 * params / shard + 4 * params
    else:
        working = 2 * shape.layer_params / t
        weights, grads = 4 * params / shard + low * working, 4 * params / shard + low * working
    return weights, grads, 8 * params / shard
