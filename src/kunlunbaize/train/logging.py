"""Run logging: JSONL (always), TensorBoard (when installed) and a console progress bar, on rank 0."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes ``metrics.jsonl`` (one record per log or eval step) and TensorBoard events under ``run_dir``."""

    def __init__(self, run_dir: Path, total_steps: int, initial_step: int, enabled: bool = True,
                 progress: bool = True) -> None:
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = (run_dir / "metrics.jsonl").open("a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            print("logging: tensorboard not installed; writing metrics.jsonl only", file=sys.stderr)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=None)

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
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
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
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
