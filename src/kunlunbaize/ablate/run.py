"""Running a study: every planned run trained and evaluated in its own process, resumable.

``OUT/study.json`` records the study; each run lives in ``OUT/runs/<name>/`` (a ``kunlun train`` run folder) with
``spec.json`` (what it is) and, once trained and evaluated, ``done.json``. A killed study started again skips the
runs with ``done.json``; a run killed mid-training resumes from its last checkpoint (the trainer's own resume).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .plan import RunSpec, StudyConfig, plan, run_dir, train_config
from .report import write_report

Log = Callable[[str], None]


class StudyError(RuntimeError):
    """A run failed or the study folder holds another study's run; the message says which and what to do."""


def is_done(cfg: StudyConfig, spec: RunSpec) -> bool:
    return (run_dir(cfg, spec) / "done.json").is_file()


def _check_spec(cfg: StudyConfig, spec: RunSpec) -> None:
    """Write the run's ``spec.json``, or refuse a folder that holds a different run of the same name."""
    folder = run_dir(cfg, spec)
    want = json.loads(json.dumps({"spec": spec.to_dict(), "train": train_config(cfg, spec, str(folder)),
                                  "eval_tasks": list(cfg.eval_tasks), "eval_limit": cfg.eval_limit}))
    file = folder / "spec.json"
    if file.is_file():
        have = json.loads(file.read_text())
        if have != want:
            diff = sorted(k for k in set(have["train"]) | set(want["train"])
                          if have["train"].get(k) != want["train"].get(k))
            what = ", ".join(diff) or "the evaluation or the run's definition"
            raise StudyError(f"{folder} holds a run made with other settings ({what}); use another --out for a "
                             "different study, or delete that run folder to redo it")
        return
    folder.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(want, indent=2))


def _prepare_data(cfg: StudyConfig, log: Log) -> None:
    """Prepare the embedded corpus once, here, before parallel runs would each start preparing it."""
    from ..data.format import is_prepared
    from ..train.trainer import DEFAULT_DATA

    if is_prepared(Path(cfg.data)):
        return
    if cfg.data != DEFAULT_DATA:
        raise StudyError(f"no prepared dataset at {cfg.data}; run `kunlun prepare SOURCES --out {cfg.data}` first "
                         "(or leave --data at its default, the embedded corpus)")
    from ..data.prepare import prepare

    log(f"preparing the embedded corpus (Python standard library) into {cfg.data} …")
    prepare(sources=[], out=Path(cfg.data))


def _launch(cfg: StudyConfig, spec: RunSpec, threads: int, log: Log) -> None:
    """Train and evaluate one run in a child process (``python -m kunlunbaize.ablate.worker``)."""
    folder = run_dir(cfg, spec)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "KUNLUN_THREADS": str(threads)}
    t0 = time.time()
    log(f"[{spec.name}] training {spec.tokens:,} tokens ({spec.match} match; progress in {folder / 'worker.log'}) …")
    with (folder / "worker.log").open("a") as out:
        proc = subprocess.run([sys.executable, "-m", "kunlunbaize.ablate.worker", str(folder / "spec.json")],
                              stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = (folder / "worker.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise StudyError(f"run {spec.name} failed (exit status {proc.returncode}): {' | '.join(tail)} — see "
                         f"{folder / 'worker.log'}; fix it and run the same command to continue")
    done = json.loads((folder / "done.json").read_text())
    log(f"[{spec.name}] done in {time.time() - t0:.0f}s: val loss {done['val_loss']:.4f}")


def run_study(cfg: StudyConfig, log: Log = print, report: bool = True) -> dict[str, Any]:
    """Train and evaluate every run not yet done (``cfg.jobs`` at a time), then write the report.

    Returns ``{"planned", "ran", "skipped"}`` (run names) and, with ``report``, the report's files."""
    runs = plan(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({**asdict(cfg), "runs": [r.to_dict() for r in runs]}, indent=2))
    for spec in runs:
        _check_spec(cfg, spec)
    todo = [s for s in runs if not is_done(cfg, s)]
    if todo:
        _prepare_data(cfg, log)
    skipped = [s.name for s in runs if s not in todo]
    if skipped:
        log(f"{len(skipped)} of {len(runs)} runs already done: {', '.join(skipped)}")
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    failures: list[str] = []
    if cfg.jobs == 1:
        for spec in todo:
            _launch(cfg, spec, threads, log)
    else:
        with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
            for future in [pool.submit(_launch, cfg, s, threads, log) for s in todo]:
                try:
                    future.result()
                except StudyError as e:
                    failures.append(str(e))
    if failures:
        raise StudyError("; ".join(failures))
    result: dict[str, Any] = {"planned": [r.name for r in runs], "ran": [s.name for s in todo], "skipped": skipped}
    if report:
        result["report"] = write_report(cfg)
    return result
