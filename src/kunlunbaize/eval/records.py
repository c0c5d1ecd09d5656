"""A task folder's records (``task.json``, ``records.jsonl``, resumable), its result rows, and the small helpers the
task runners share."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .tasks import Task, TaskError

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------------- records
class Records:
    """``records.jsonl`` of a task folder: the lines already written, grouped by problem index."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], per_unit: int, fresh: bool) -> None:
        self.folder, self.per_unit = folder, per_unit
        self.file = folder / "records.jsonl"
        meta = folder / "task.json"
        if fresh and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if meta.is_file():
            old = _read_json(meta)
            if old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise TaskError(f"{folder} holds records of another evaluation (different {', '.join(diff)}): "
                                "pass --fresh to start this task over, or --out another folder")
        else:
            _write_json(meta, fingerprint)
        self.done: dict[int, list[dict[str, Any]]] = self._read()

    def _read(self) -> dict[int, list[dict[str, Any]]]:
        """Complete problems only; a torn last line or an incomplete problem is dropped from the file."""
        if not self.file.is_file():
            return {}
        units: dict[int, list[dict[str, Any]]] = {}
        dropped = False
        with self.file.open("rb") as f:
            for raw in f:
                try:
                    line = json.loads(raw) if raw.endswith(b"\n") else None
                    units.setdefault(int(line["index"]), []).append(line)
                except (ValueError, TypeError, KeyError):  # a torn or foreign line
                    dropped = True
        complete = {u: ls for u, ls in units.items() if len(ls) == self.per_unit}
        if dropped or len(complete) != len(units):
            self._rewrite([ln for u in sorted(complete) for ln in complete[u]])
        return complete

    def _rewrite(self, lines: list[dict[str, Any]]) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(ln, ensure_ascii=False) + "\n" for ln in lines), encoding="utf-8")
        os.replace(tmp, self.file)

    def add(self, lines: list[dict[str, Any]]) -> None:
        """Append a batch's lines in one write, flushed to disk (a crash loses at most this batch)."""
        with self.file.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(ln, ensure_ascii=False) + "\n" for ln in lines))
            f.flush()
            os.fsync(f.fileno())
        for line in lines:
            self.done.setdefault(int(line["index"]), []).append(line)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TaskError(f"{path} is unreadable ({e}): pass --fresh to start the task over") from None
    return value if isinstance(value, dict) else {}


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def records_digest(records: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- metrics
def mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample standard deviation / √n, as lm-evaluation-harness reports)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def row(task: Task, metric: str, values: list[float] | float, n: int, stderr: float | None = None) -> dict[str, Any]:
    """A results-table row; ``values`` per problem (mean ± standard error) or one number."""
    if isinstance(values, list):
        value, stderr = mean_stderr(values)
    else:
        value = values
    return {"task": task.name, "kind": task.kind, "metric": metric, "value": value, "stderr": stderr, "n": n,
            "source": "kunlun"}


# ---------------------------------------------------------------------------------------------- the runner


def training_data(ckpt: Path) -> str | None:
    """The dataset folder a training checkpoint was trained on (``trainer_state.json``), if it still exists."""
    try:
        data = json.loads((ckpt / "trainer_state.json").read_text())["train_config"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data, str) and Path(data).is_dir() else None
