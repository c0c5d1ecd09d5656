"""The paper's learning-rate and batch-size schedules (§5.3), as fractions of the run's token budget.

Paper (12.3T tokens, peak 2.2e-4): linear warm-up over 2,000 steps; constant until 10T; cosine down
to 2.2e-5 over the next 1.8T; constant 2.2e-5 for 333B; then 7.3e-6 for the last 167B. Batch size
ramps from 3,072 to 15,360 sequences over the first 469B tokens. Dividing every breakpoint by 12.3T
keeps the paper's shape for a run of any length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PAPER_TOKENS = 12.3e12


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of the fraction of the token budget consumed."""

    peak: float = 2.2e-4
    warmup_steps: int = 2000
    decay_start: float = 10.0e12 / PAPER_TOKENS  # end of the constant phase
    decay_end: float = 11.8e12 / PAPER_TOKENS  # end of the cosine
    final_start: float = (11.8e12 + 333e9) / PAPER_TOKENS  # start of the last constant phase
    cosine_floor: float = 2.2e-5 / 2.2e-4  # cosine ends at 10% of peak
    final_ratio: float = 7.3e-6 / 2.2e-4  # last phase: 3.3% of peak

    def __post_init__(self) -> None:
        if not 0 <= self.decay_start <= self.decay_end <= self.final_start <= 1:
            raise ValueError("LRSchedule: need 0 <= decay_start <= decay_end <= final_start <= 1")
        if self.peak <= 0 or self.warmup_steps < 0:
            raise ValueError("LRSchedule: peak must be > 0 and warmup_steps >= 0")

    def __call__(self, step: int, fraction: float) -> float:
        """LR for optimiser step ``step`` (0-based) once ``fraction`` of the budget has been consumed."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if fraction < self.decay_start:
            return self.peak
        if fraction < self.decay_end:
            t = (fraction - self.decay_start) / (self.decay_end - self.decay_start)
            floor = self.cosine_floor
            return self.peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
        if fraction < self.final_start:
            return self.peak * self.cosine_floor
        return self.peak * self.final_ratio


@dataclass(frozen=True)
class BatchRamp:
    """Global batch size in sequences: linear from ``start`` to ``end`` over the first ``ramp`` of the budget.

    Sizes are rounded down to a multiple of ``granularity`` (micro-batch × data-parallel ranks), so
    every step is a whole number of micro-batches on every rank.
    """

    start: int = 3072
    end: int = 15360
    ramp: float = 469e9 / PAPER_TOKENS
    granularity: int = 1

    def __post_init__(self) -> None:
        if self.granularity < 1 or self.end < self.granularity or self.start < 1:
            raise ValueError(f"BatchRamp: batch sizes must be >= the micro-batch granularity {self.granularity}")
        if not 0 <= self.ramp <= 1:
            raise ValueError("BatchRamp: ramp must be a fraction in [0, 1]")

    def __call__(self, fraction: float) -> int:
        if self.ramp <= 0 or fraction >= self.ramp:
            size = self.end
        else:
            size = self.start + (self.end - self.start) * fraction / self.ramp
        return max(self.granularity, int(size) // self.granularity * self.granularity)
