"""The training metrics between two log records: losses, gradient norm, tokens/s and MFU."""

from __future__ import annotations

import time
from typing import Any

import torch

from .step import StepResult


class MetricsWindow:
    """Accumulates the steps since the last log record and turns them into the next one.

    Losses and gradient norms are averaged over the finite (not skipped) steps; tokens/s counts every step.
    MFU is tokens/s × training FLOPs per token over the peak FLOP/s of all ``world_size`` devices.
    """

    def __init__(self, n_terms: int, flops_per_token: float, peak_flops: float, world_size: int,
                 device: torch.device) -> None:
        self.n_terms = n_terms
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.sums = torch.zeros(self.n_terms)
        self.steps = 0
        self.gnorm = 0.0

    def add(self, result: StepResult, tokens: int) -> None:
        """Count one step that trained on ``tokens`` tokens (its losses only if it was finite)."""
        if result.finite:
            self.sums += result.losses.cpu()
            self.steps += 1
            self.gnorm += float(result.grad_norm)
        self.tokens += tokens

    def record(self, *, step: int, tokens: int, lr: float, batch_size: int, skipped: int) -> dict[str, Any]:
        """The log record of the window ending at ``step`` (``tokens`` trained so far, ``skipped`` steps so far)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        tps = self.tokens / (time.perf_counter() - self.t0)
        n = max(1, self.steps)
        avg = (self.sums / n).tolist()
        return {"step": step, "tokens": tokens, "loss": avg[0], "main_loss": avg[1],
                **{f"mtp_loss_{j}": v for j, v in enumerate(avg[2:], start=1)},
                "lr": lr, "batch_size": batch_size, "grad_norm": self.gnorm / n,
                "tokens_per_s": tps, "mfu": tps * self.flops_per_token / (self.peak_flops * self.world_size),
                "skipped_steps": skipped}
