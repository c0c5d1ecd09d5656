"""Run logging: JSONL (always), TensorBoard (when installed) and the console progress (a bar on a terminal, plain
lines at a steady interval off one: :class:`kunlunbaize.progress.Progress`), on rank 0.

The logs of a run folder describe one run: resuming from step S first cuts ``metrics.jsonl`` and the
TensorBoard events back to step S (what comes after was not kept in any checkpoint and is trained again);
a fresh run in a folder with logs of an earlier run moves those logs to ``previous-N/`` first.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..progress import Progress

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PREVIOUS_LOGS = (METRICS, TENSORBOARD, "summary.json", "loss_curve.png", "dense_residual_weights.png")


def set_aside_logs(run_dir: Path) -> Path | None:
    """Move an earlier run's logs and plots out of ``run_dir`` into a new ``previous-N/``; return it (None: none)."""
    return move_into_new_folder([run_dir / n for n in PREVIOUS_LOGS if (run_dir / n).exists()], run_dir, "previous")


def move_into_new_folder(paths: list[Path], parent: Path, stem: str) -> Path | None:
    """Move ``paths`` into a new ``parent/<stem>-N/`` (the first free N); return it (None: nothing to move)."""
    if not paths:
        return None
    n = 1
    while (parent / f"{stem}-{n}").exists():
        n += 1
    dest = parent / f"{stem}-{n}"
    dest.mkdir()
    for path in paths:
        os.replace(path, dest / path.name)
    return dest


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of ``path`` up to ``step`` (and drop lines a killed run left half-written); return how
    many records were dropped. The file is replaced atomically."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        record = _parse(line)
        if record is not None and record["step"] <= step:
            kept.append(line)
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class RunLogger:
    """Writes ``metrics.jsonl`` (one record per log or eval step) and TensorBoard events under ``run_dir``.

    ``initial_step`` > 0 continues the logs of a run resumed at that step: later TensorBoard events are purged
    (the caller cuts ``metrics.jsonl`` with :func:`truncate_metrics`).
    """

    def __init__(self, run_dir: Path, total_steps: int, initial_step: int, enabled: bool = True,
                 progress: bool = True) -> None:
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = (run_dir / METRICS).open("a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the earlier events of steps >= it (those are trained again)
            self.tb = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=initial_step + 1 if initial_step else None)
        except ImportError:
            print("logging: tensorboard not installed; writing metrics.jsonl only", file=sys.stderr)
        if progress:
            self.bar = Progress(total_steps, desc="train", unit="step", initial=initial_step)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self.file is not None
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key.replace(".", "/"), value, step)

    def log_matrix(self, tag: str, matrix, step: int) -> None:
        """A matrix (the dense-residual weights) as a TensorBoard image and a JSONL record."""
        if not self.enabled:
            return
        assert self.file is not None
        self.file.write(json.dumps({"step": step, tag: [[round(v, 5) for v in row] for row in matrix.tolist()]})
                        + "\n")
        if self.tb is not None:
            m = matrix.float()
            self.tb.add_image(tag, (m / m.max().clamp_min(1e-8)).unsqueeze(0), step)

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set(step, postfix)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, skipping a line a killed run left half-written."""
    if not path.is_file():
        return []
    records = (_parse(line) for line in path.read_text(encoding="utf-8", errors="replace").splitlines())
    return [r for r in records if r is not None]
