"""The run folder (``--out``): one job at a time (:class:`RunLock`), and its logs and checkpoints made to describe one
run before training starts (an earlier run's logs set aside; on resume, what came after the checkpoint cut back)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not on POSIX: run folders are not locked
    fcntl = None

from ..checkpoint import checkpoint_dirs
from .distributed import DistEnv
from .errors import TrainingError
from .logging import METRICS, move_into_new_folder, set_aside_logs, truncate_metrics

LOCK_FILE = ".lock"


class RunLock:
    """One training job per run folder: rank 0 holds an exclusive ``flock`` on ``<out>/.lock`` while it runs.

    The operating system releases the lock when the process ends, however it ends (SIGKILL included), so a lock
    left by a dead run never blocks. The lock file holds the owner's pid, for the message.
    """

    def __init__(self, run_dir: Path, env: DistEnv) -> None:
        self.run_dir, self.env = run_dir, env
        self._file = None

    def __enter__(self) -> RunLock:
        busy = ""
        if self.env.is_main and fcntl is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            f = open(self.run_dir / LOCK_FILE, "a+")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                busy = f.read().strip() or "?"
                f.close()
            else:
                f.truncate(0)
                f.write(f"{os.getpid()}\n")
                f.flush()
                self._file = f
        if self.env.distributed:  # every rank of the job learns whether rank 0 got the folder
            flag = torch.tensor([float(bool(busy))], device=self.env.device)
            torch.distributed.broadcast(flag, src=0)
            busy = busy or ("?" if flag.item() else "")
        if busy:
            raise TrainingError(f"{self.run_dir} is in use by another `kunlun train` (pid {busy}); wait for it to "
                                "finish or stop it, or train into another --out folder")
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def prepare_run_dir(run_dir: Path, resumed: Path | None, step: int) -> list[str]:
    """Make ``run_dir`` describe one run (rank 0 only); return notes on what was moved or dropped.

    Resumed from a checkpoint of this folder at ``step``: later checkpoints go to ``superseded-N/`` and later
    records are cut from the metrics. Otherwise (fresh, or resumed from another folder): an earlier run's logs
    and plots go to ``previous-N/``.
    """
    notes: list[str] = []
    ckpt_root = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    if resumed is not None and resumed.parent.resolve() == ckpt_root.resolve():
        moved = _set_aside_later_checkpoints(ckpt_root, resumed)
        if moved is not None:
            notes.append(f"note: resumed from step {step}, so the later checkpoint(s) of {ckpt_root} belong to "
                         f"the run being replaced; moved them to {moved} (delete it once you do not need them)")
        dropped = truncate_metrics(run_dir / METRICS, step)
        if dropped:
            notes.append(f"note: dropped {dropped} record(s) after step {step} from {run_dir / METRICS} "
                         "(trained again from the checkpoint)")
    else:
        aside = set_aside_logs(run_dir)
        if aside is not None:
            notes.append(f"note: moved the logs and plots of an earlier run in {run_dir} to {aside}")
    return notes


def _set_aside_later_checkpoints(ckpt_root: Path, resumed: Path) -> Path | None:
    """Move the complete checkpoints after ``resumed`` into a new ``superseded-N/``, so that neither ``--resume auto``
    nor ``--keep-last`` pruning mixes them with the run that continues from ``resumed``; return it (None: none)."""
    return move_into_new_folder([p for p in checkpoint_dirs(ckpt_root) if p.name > resumed.name], ckpt_root,
                                "superseded")
