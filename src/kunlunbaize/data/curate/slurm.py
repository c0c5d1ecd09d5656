"""The Slurm side of ``kunlun curate --executor slurm``: the jobs of the last submission are recorded in the work
folder, so that a rerun waits for them (instead of submitting the stages twice) or says which stage failed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..format import DataError

JOBS_FILE = "slurm_jobs.json"
NEVER = "DependencyNeverSatisfied"  # a job whose afterok dependency failed: it will never start


def env_command() -> str:
    """The line a job runs first: the bin folder of the Python running kunlun (datatrove's launch_pickled_pipeline
    and merge_stats are there) ahead on PATH, so a job finds them even when kunlun was run by its full path."""
    return f'export PATH="{Path(sys.executable).parent}:$PATH"'


def record_jobs(work: Path, executors: Sequence[Any]) -> None:
    """Save the Slurm job ids the stages were submitted as (a stage already complete submits none)."""
    ids = [str(e.job_id) for e in executors if e.job_id not in (None, -1)]
    (work / JOBS_FILE).write_text(json.dumps(ids) + "\n", encoding="utf-8")


def queued_jobs(work: Path) -> list[tuple[str, str, str]]:
    """(job, state, reason) of every job of the last submission that Slurm still queues or runs."""
    path = work / JOBS_FILE
    ids = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    if not ids:
        return []
    try:
        done = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r"], capture_output=True,
                              text=True, timeout=120)
    except FileNotFoundError:
        raise DataError("--executor slurm needs Slurm's commands (squeue, sbatch) on PATH; run kunlun curate on a "
                        "node that can submit jobs") from None
    if done.returncode != 0 and "Invalid job id" not in done.stderr:  # ids Slurm has forgotten: finished long ago
        raise DataError(f"squeue failed: {done.stderr.strip() or done.returncode}; is the Slurm controller up?")
    return [tuple(line.split("|", 2)) for line in done.stdout.splitlines() if line.count("|") == 2]


def check_queue(work: Path) -> str | None:
    """None when no job of this curation is left in Slurm's queue; else a line saying what is still queued.
    Raises DataError when a stage failed and the jobs after it can never start."""
    queued = queued_jobs(work)
    if not queued:
        return None
    stuck = sorted({job.split("_")[0] for job, _state, reason in queued if NEVER in reason})
    if stuck:
        raise DataError(f"a curation stage failed on Slurm: job(s) {', '.join(stuck)} wait on it and can never "
                        f"start; read the slurm_logs/ folders under {work / 'logs'}, cancel them (scancel "
                        f"{' '.join(stuck)}) and rerun the same command to resume")
    jobs = sorted({job.split("_")[0] for job, _state, _reason in queued}, key=int)
    states = sorted({state.lower() for _job, state, _reason in queued})
    return (f"Slurm job(s) {', '.join(jobs)} of this curation are still {'/'.join(states)}; rerun the same command "
            f"when they are done")
