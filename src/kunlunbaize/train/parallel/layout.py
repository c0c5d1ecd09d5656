"""The parallel layout of a run: how its ranks split into pipeline stages, data-parallel replicas, data-parallel
shards, context-parallel and tensor-parallel groups (torch-free, so the command line checks it before importing
torch).

The ranks form one device mesh ``pp × dp_replicate × dp_shard × cp × tp`` (dimension names as given, row-major: the
ranks of one tensor-parallel group are consecutive, so on one node they share the fastest links; the pipeline
dimension is outermost, so its point-to-point sends may cross nodes). Data parallelism: a rank's data-parallel rank
is ``(rank // (cp · tp)) mod dp``, and every rank of a context- or tensor-parallel group, and every stage of a
pipeline, trains on the same batch (each context-parallel rank on its part of every sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b")
"""``--pp-schedule`` names (torch.distributed.pipelining's GPipe, 1F1B and interleaved 1F1B)."""


class LayoutError(ValueError):
    """A layout that does not fit the world size or the model; the message says which size and what to do."""


@dataclass(frozen=True)
class Layout:
    """Sizes of the mesh dimensions and how the data-parallel dimensions are wrapped."""

    dp_replicate: int = 1
    """Data-parallel replicas: gradients all-reduced (DDP; with ``dp_shard`` or ``tp``, FSDP2's HSDP)."""
    dp_shard: int = 1
    """Data-parallel shards: parameters, gradients and optimiser states sharded (FSDP2)."""
    tp: int = 1
    """Tensor (+ sequence) parallel ranks: each layer's heads, channels and vocabulary split over them."""
    wrap: str = "none"
    """How the data-parallel dimensions are wrapped: ``none``, ``ddp`` or ``fsdp`` (FSDP2 over ``dp_shard``,
    HSDP when ``dp_replicate`` > 1 too; with ``cp`` > 1 over ``dp_shard × cp``)."""
    cp: int = 1
    """Context-parallel ranks: each sequence split over them (:mod:`.context`), load-balanced for the causal mask."""
    pp: int = 1
    """Pipeline ranks: the trunk cut into ``pp × stages_per_rank`` stages (the outermost mesh dimension)."""

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: how many different batches one step trains on."""
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of global ``rank`` (the ranks of one context- or tensor-parallel group, and the
        stages of one pipeline, share it)."""
        return (rank // (self.cp * self.tp)) % self.dp

    def cp_rank(self, rank: int) -> int:
        """The context-parallel rank of global ``rank``: which part of each sequence it holds."""
        return rank // self.tp % self.cp

    @property
    def shape(self) -> tuple[int, ...]:
        """The device mesh's shape, in :data:`MESH_DIMS` order."""
        return self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp

    def describe(self) -> str:
        """E.g. ``dp_replicate 1 x dp_shard 2 x tp 2 (fsdp)`` (``pp`` and ``cp`` named when above 1); a layout of one
        data-parallel dimension is its wrapper's name (``none``, ``ddp``, ``fsdp``), as ``--parallel`` says it."""
        if self.tp == self.cp == self.pp == 1 and min(self.dp_replicate, self.dp_shard) == 1:
            return self.wrap
        return " x ".join(f"{n} {s}" for n, s in zip(MESH_DIMS, self.shape, strict=True)
                          if n not in ("cp", "pp") or s > 1) + f" ({self.wrap})"


def resolve_layout(world_size: int, parallel: str = "auto", dp_replicate: int | None = None,
                   dp_shard: int | None = None, tp: int = 1, cp: int = 1, pp: int = 1) -> Layout:
    """The layout of ``world_size`` ranks from ``kunlun train``'s options; LayoutError when it does not fit.

    ``--parallel`` (none, ddp, fsdp; auto: ddp under torchrun) gives every rank to data parallelism, as before the
    mesh existed: ``ddp`` is ``--dp-replicate N``, ``fsdp`` is ``--dp-shard N``. With ``--dp-shard`` /
    ``--dp-replicate`` / ``--cp`` / ``--tp`` / ``--pp`` the sizes are given; an omitted ``--dp-shard`` takes the ranks
    left over and an omitted ``--dp-replicate`` is 1.
    """
    if parallel not in PARALLEL_MODES:
        raise LayoutError(f"--parallel {parallel!r} is not one of {', '.join(PARALLEL_MODES)}")
    for name, value in (("--dp-replicate", dp_replicate), ("--dp-shard", dp_shard), ("--tp", tp), ("--cp", cp),
                        ("--pp", pp)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise LayoutError(f"{name} must be a whole number >= 1, got {value!r}")
    explicit = dp_replicate is not None or dp_shard is not None or tp != 1 or cp != 1 or pp != 1
    if explicit and parallel in ("none", "ddp"):
        raise LayoutError(f"--parallel {parallel} gives every rank to data parallelism; drop it when giving "
                          "--dp-replicate/--dp-shard/--cp/--tp/--pp (or use --parallel fsdp or auto with them)")
    if not explicit:
        if parallel == "fsdp":
            return Layout(dp_shard=world_size, wrap="fsdp" if world_size > 1 else "none")
        mode = "none" if world_size == 1 or parallel == "none" else "ddp"
        return Layout(dp_replicate=world_size, wrap=mode)
    replicate = dp_replicate or 1
    fixed = pp * replicate * cp * tp
    named = (f"--pp {pp} x " if pp > 1 else "") + f"--dp-replicate {replicate}" + (f" x --cp {cp}" if cp > 1 else "")
    if world_size % fixed:
        raise LayoutError(f"{named} x --tp {tp} = {fixed} does not divide the {world_size} ranks (WORLD_SIZE); "
                          "launch a multiple of it with torchrun --nproc-per-node")
    shard = dp_shard if dp_shard is not None else world_size // fixed
    layout = Layout(dp_replicate=replicate, dp_shard=shard, tp=tp, wrap=_wrap(replicate, shard, tp, cp, pp, parallel),
                    cp=cp, pp=pp)
    if layout.world_size != world_size:
        sizes = (f"--pp {pp} x " if pp > 1 else "") + f"--dp-replicate {replicate} x --dp-shard {shard}" \
            + (f" x --cp {cp}" if cp > 1 else "")
        raise LayoutError(f"{sizes} x --tp {tp} = {layout.world_size} ranks, but {world_size} were launched "
                          "(WORLD_SIZE); make the sizes multiply to it")
    return layout


def _wrap(replicate: int, shard: int, tp: int, cp: int, pp: int, parallel: str) -> str:
    """DDP for pure replication without tensor, context or pipeline parallelism (as ``--parallel ddp``), else FSDP2
    (HSDP): context parallelism always takes FSDP2, its ranks folded into the sharding group (their gradients are
    summed); under pipeline parallelism each stage's modules are sharded over the data-parallel sub-mesh."""
    if replicate * shard * cp == 1:
        return "none"
    if shard == 1 and tp == 1 and cp == 1 and pp == 1 and parallel != "fsdp":
        return "ddp"
    return "fsdp"


def check_pipeline(layout: Layout, n_layers: int, schedule: str, stages_per_rank: int = 1,
                   layers_per_stage: list[int] | None = None) -> None:
    """LayoutError when the trunk of ``n_layers`` does not cut into ``layout.pp × stages_per_rank`` stages under
    ``schedule`` (one stage per rank except under interleaved 1F1B; even, or as ``layers_per_stage`` says)."""
    if schedule not in PP_SCHEDULES:
        raise LayoutError(f"--pp-schedule {schedule!r} is not one of {', '.join(PP_SCHEDULES)}")
    if stages_per_rank < 1:
        raise LayoutError(f"--pp-stages-per-rank must be a whole number >= 1, got {stages_per_rank!r}")
    if stages_per_rank > 1 and schedule != "interleaved1f1b":
        raise LayoutError(f"--pp-schedule {schedule} runs one stage per rank, not --pp-stages-per-rank "
                          f"{stages_per_rank}; use --pp-schedule interleaved1f1b for several")
    if layout.pp == 1:
        if layers_per_stage is not None or stages_per_rank > 1:
            raise LayoutError("--pp-layers/--pp-stages-per-rank need --pp 2 or more")
        return
    stages = layout.pp * stages_per_rank
    if layers_per_stage is not None:
        if len(layers_per_stage) != stages or sum(layers_per_stage) != n_layers or min(layers_per_stage) < 1:
            raise LayoutError(f"--pp-layers {','.join(map(str, layers_per_stage))} must give each of the {stages} "
                              f"stages (--pp x --pp-stages-per-rank) at least one layer and sum to n_layers = "
                              f"{n_layers}")
    elif n_layers % stages:
        raise LayoutError(f"n_layers = {n_layers} does not split evenly into {stages} pipeline stages (--pp {layout.pp}"
                          f" x --pp-stages-per-rank {stages_per_rank}); choose sizes whose product divides it, or "
                          "give --pp-layers")


def check_microbatches(schedule: str, pp: int, counts: list[int]) -> None:
    """LayoutError when a step's micro-batch count (one per gradient-accumulation micro-batch; ``counts``: every
    count the batch ramp reaches) does not suit ``schedule`` on ``pp`` ranks: 1F1B needs at least ``pp`` and
    interleaved 1F1B a multiple of its rounds (count // pp)."""
    for n in counts:
        if schedule == "1f1b" and n < pp:
            raise LayoutError(f"--pp-schedule 1f1b needs at least --pp {pp} micro-batches per step, but a step has "
                              f"{n} (global batch / (micro-batch size x data-parallel ranks)); lower "
                              "--micro-batch-size or raise --batch-size-start")
        if schedule == "interleaved1f1b" and n % max(1, n // pp):
            raise LayoutError(f"--pp-schedule interleaved1f1b needs a micro-batch count per step that is a multiple "
                              f"of count // --pp {pp}, but a step has {n}; choose batch sizes whose micro-batch "
                              "counts are multiples of --pp")


def check_model(layout: Layout, model: Any, seq_len: int) -> None:
    """LayoutError when the model (a :class:`~kunlunbaize.config.ModelConfig`) or the sequence length does not
    split over ``layout.tp`` and ``layout.cp``: heads, KV heads, widths and vocabulary must be divisible by tp (no
    uneven shards), and so must each cp rank's part of the sequence (sequence parallelism shards it); the sequence
    must split into 2·cp equal chunks (the load-balanced causal split)."""
    check_sequence(layout, seq_len)
    tp = layout.tp
    if tp == 1:
        return
    sizes = [("n_heads", model.n_heads, "attention heads"), ("n_kv_heads", model.n_kv_heads,
             "key/value heads (GQA KV heads are split, not replicated)"), ("d_model", model.d_model, "model width"),
             ("vocab_size", model.vocab_size, "vocabulary (the vocabulary-parallel embedding and heads)")]
    if model.transformerx:
        sizes += [("scale_hidden", model.scale_hidden, "eSwish MLP width")]
    else:
        sizes += [("ffn_hidden", model.ffn_hidden, "SwiGLU MLP width")]
    for name, value, what in sizes:
        if value % tp:
            raise LayoutError(f"--tp {tp} does not divide {name} = {value} ({what}); choose a --tp that divides it")
    part = seq_len // layout.cp  # each cp rank's part of the sequence, which sequence parallelism shards
    if part % tp:
        what = f"--seq-len {seq_len}" if layout.cp == 1 else f"--seq-len {seq_len} / --cp {layout.cp} = {part}"
        raise LayoutError(f"--tp {tp} does not divide {what} (sequence parallelism shards the sequence"
                          f"{'' if layout.cp == 1 else ' part of each cp rank'}); choose a --seq-len divisible by "
                          f"{tp * layout.cp}")


def check_sequence(layout: Layout, seq_len: int) -> None:
    """LayoutError when ``seq_len`` does not split into the 2·cp equal chunks of context parallelism."""
    cp = layout.cp
    if cp > 1 and seq_len % (2 * cp):
        raise LayoutError(f"--cp {cp} needs --seq-len divisible by 2 x {cp} = {2 * cp} (each rank holds 2 of "
                          f"{2 * cp} equal chunks), got {seq_len}; choose a --seq-len divisible by {2 * cp}")
