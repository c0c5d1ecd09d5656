"""The end of a run: its summary (``summary.json``) and its plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .distributed import DistEnv
from .logging import METRICS, read_metrics
from .plots import plot_dense_weights, plot_losses


def write_summary(cfg: TrainConfig, env: DistEnv, dense: torch.Tensor | None, run_dir: Path, data_path: Path,
                  final_ckpt: Path | None, *, step: int, tokens: int, finished: bool, last_val: float,
                  validated: bool, skipped: int, n_params: int, steps_now: int,
                  interrupted: str | None) -> dict[str, Any]:
    """The run's summary (also written to summary.json) and its plots. ``steps_now``: steps this invocation trained;
    ``interrupted``: the signal that stopped it early, if one did; ``dense``: the dense-residual weights, if any."""
    summary = {"step": step, "tokens": tokens, "finished": finished, "steps_now": steps_now, "interrupted": interrupted,
               "val_loss": last_val if validated and math.isfinite(last_val) else None,
               "checkpoint": str(final_ckpt) if final_ckpt else None, "run_dir": str(run_dir),
               "skipped_steps": skipped, "params": n_params}
    if env.is_main:
        records = _dedupe(read_metrics(run_dir / METRICS))
        summary["loss_plot"] = str(plot_losses(records, run_dir / "loss_curve.png",
                                               f"{cfg.arch} {cfg.preset} on {data_path.name}"))
        if dense is not None:
            summary["dense_plot"] = str(plot_dense_weights(dense, run_dir / "dense_residual_weights.png"))
        vals = [r for r in records if "val_loss" in r]
        if vals and validated:
            summary["first_val_loss"] = vals[0]["val_loss"]
            if summary["val_loss"] is None:  # a finished run re-run: nothing evaluated now
                summary["val_loss"] = vals[-1]["val_loss"]
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the last record per (step, kind): a run killed without a checkpoint is replayed on resume."""
    seen: dict[tuple[int, str], dict[str, Any]] = {}
    for r in records:
        kind = "val" if "val_loss" in r else "train" if "loss" in r else "other"
        seen[(r["step"], kind)] = r
    return sorted(seen.values(), key=lambda r: (r["step"], "val_loss" in r))
