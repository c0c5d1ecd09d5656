"""How a run's token budget becomes optimiser steps: the batch-size ramp, micro-batches per rank, gradient
accumulation, the number of steps and the LR warm-up and schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig
from .schedule import BatchRamp, LRSchedule


@dataclass(frozen=True)
class BatchPlan:
    """The batch layout of a run: every step is ``accumulation(global batch)`` micro-batches of ``micro``
    sequences on each of ``world_size`` data-parallel ranks (the ranks of a tensor-parallel group count once)."""

    micro: int
    """Sequences per micro-batch on one rank."""
    world_size: int
    start: int
    """Global batch (sequences) at the start of the ramp."""
    ramp: BatchRamp
    total_steps: int
    """Optimiser steps the token budget takes."""
    warmup: int
    """LR warm-up steps."""

    @property
    def granularity(self) -> int:
        """Sequences of one micro-step over all ranks: every global batch is a multiple of it."""
        return self.micro * self.world_size

    def global_batch(self, tokens: int, budget: int) -> int:
        """Global batch (sequences) of the step that starts after ``tokens`` of a ``budget``."""
        return self.ramp(tokens / budget)

    def accumulation(self, global_batch: int) -> int:
        """Micro-batches per rank that make up ``global_batch``."""
        return global_batch // self.granularity

    def first_sample(self, consumed: int, micro_step: int, rank: int) -> int:
        """Global sample number of the first sequence of micro-step ``micro_step`` on data-parallel ``rank``."""
        return consumed + (micro_step * self.world_size + rank) * self.micro


def plan_steps(cfg: TrainConfig, ramp: BatchRamp) -> int:
    """Number of optimiser steps the token budget takes under the batch ramp."""
    tokens, steps = 0, 0
    while tokens < cfg.tokens:
        tokens += ramp(tokens / cfg.tokens) * cfg.seq_len
        steps += 1
    return steps


def default_micro_batch(per_rank: int, start_per_rank: int) -> int:
    """The largest divisor of the per-rank batch not above the ramp's starting per-rank batch."""
    return max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= max(1, start_per_rank))


def default_warmup(total_steps: int) -> int:
    """2% of the steps, at least 10, at most a tenth of the run (and at least 1)."""
    return max(1, min(total_steps // 10, max(10, round(0.02 * total_steps))))


def plan_batches(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """The batch layout of ``cfg`` on ``world_size`` data-parallel ranks; ValueError when the batch does not split
    evenly."""
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the number of data-parallel ranks "
                         f"{world_size}")
    start = cfg.batch_size_start or max(world_size, round(cfg.batch_size * 3072 / 15360))
    micro = cfg.micro_batch_size or default_micro_batch(cfg.batch_size // world_size, max(1, start // world_size))
    granularity = micro * world_size
    if cfg.batch_size % granularity:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of micro_batch_size × data-parallel ranks = "
                         f"{micro} × {world_size}")
    start = max(start, granularity)
    ramp = BatchRamp(start=start, end=cfg.batch_size, ramp=cfg.batch_ramp, granularity=granularity)
    total_steps = plan_steps(cfg, ramp)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(total_steps)
    return BatchPlan(micro=micro, world_size=world_size, start=start, ramp=ramp, total_steps=total_steps,
                     warmup=warmup)


def lr_schedule(cfg: TrainConfig, warmup: int) -> LRSchedule:
    """The paper's LR schedule with the run's peak, warm-up and breakpoints."""
    return LRSchedule(peak=cfg.lr, warmup_steps=warmup, decay_start=cfg.decay_start, decay_end=cfg.decay_end,
                      final_start=cfg.final_start)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group the learning rate ``lr`` times its ``lr_mult`` (1 when it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
