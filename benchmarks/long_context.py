"""The long-context demonstration (docs/LONG_CONTEXT.md): a trained run extended to 2K and then 4K tokens with each
RoPE scaling (and none), every model scored by loss per position on long validation windows and by the RULER-style
suite per length.

    python benchmarks/long_context.py --parent runs/small --out runs/lc [--data data/stdlib]

Stages (each skipped when its result exists, each training resumable, so the same command continues after an
interruption): for every method, ``kunlun train --init-from`` the parent at 2K, then from that run at 4K (the staged
recipe: the original context stays the parent's, so both stages scale from it); then ``kunlun eval --task
position-loss`` and ``--task ruler=…`` of the parent and every stage. With ``--control``, the parent is also
continued at its own context (``--parent-context``, no scaling) for the same tokens and optimizer steps as each
stage (control-2k from the parent, control-4k from control-2k; a longer context's tokens as more sequences per
step) and evaluated exactly like the parent: what training more, without the longer context, buys.
``--tokens-2k``/``--tokens-4k`` give each stage a token budget (else ``--steps`` steps of ``--batch`` sequences).
``--lanes N`` runs N stages at a time (one torch thread each by default: on a shared machine, one thread per
process is much faster than several threads fighting over the cores). Every stage's command, wall time and the
machine's load go to ``OUT/stages.jsonl``; ``--report DIR`` gathers the results into small files (tables, plots)
to commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from threading import Condition, Lock, Thread

METHODS = ("none", "linear", "dynamic", "yarn", "llama3")
STAGES = ((2048, "2k"), (4096, "4k"))
_log_lock = Lock()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", default="runs/small", help="the trained run to extend (default runs/small)")
    p.add_argument("--out", default="runs/lc", help="folder of the stages' runs and evaluations")
    p.add_argument("--data", default="data/stdlib", help="the parent's `kunlun prepare` folder")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="RoPE scalings to extend with, in queue order (none = no scaling; control: as --control)")
    p.add_argument("--steps", type=int, default=1, help="training steps per stage (default 1: a CPU demonstration)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    for _, label in STAGES:
        p.add_argument(f"--tokens-{label}", type=int, metavar="N",
                       help=f"training tokens of the {label.upper()} stage (default --steps × --batch sequences)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of each stage (default 5e-4)")
    p.add_argument("--warmup-steps", type=int, default=1, help="linear warm-up steps of each stage (default 1)")
    p.add_argument("--control", action="store_true",
                   help="also continue the parent at its own context for the same tokens (control-2k, control-4k)")
    p.add_argument("--parent-context", type=int, default=256, help="the parent's context (default 256)")
    p.add_argument("--window-tokens", type=int, default=16384,
                   help="position loss: validation tokens per length (default 16,384: 8 windows of 2K, 4 of 4K)")
    p.add_argument("--ruler-tasks", default="passkey")
    p.add_argument("--ruler-lengths", default="256,512,1k,2k,4k")
    p.add_argument("--per-length", type=int, default=1, help="ruler: samples per task and length")
    p.add_argument("--lanes", type=int, default=2, help="stages run at a time (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage (default 1)")
    p.add_argument("--nice", type=int, default=5, help="niceness of every stage (default 5)")
    p.add_argument("--only", choices=("train", "eval"), help="run only the trainings or only the evaluations")
    p.add_argument("--skip", default="", metavar="STAGE,…",
                   help="stages left out (as stages.jsonl names them, e.g. train-llama3-4k; what needs them goes too)")
    p.add_argument("--report", metavar="DIR", help="gather the results into DIR (tables, plots) and exit")
    return p.parse_args(argv)


def kunlun() -> list[str]:
    """The ``kunlun`` command of this Python (the venv's console script, else ``python -m kunlunbaize.cli``)."""
    script = Path(sys.executable).with_name("kunlun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kunlunbaize.cli"]


def run_name(method: str, label: str) -> str:
    return f"{method}-{label}"


def train_stage(args: argparse.Namespace, method: str, index: int) -> tuple[Path, list[str]]:
    """The run folder and command of ``method``'s stage ``index`` (0: parent → 2K, 1: 2K → 4K). ``control``:
    the same tokens and steps at the parent's context with no scaling (more sequences per step)."""
    stage_len, label = STAGES[index]
    init = args.parent if index == 0 else str(Path(args.out) / run_name(method, STAGES[index - 1][1]))
    out = Path(args.out) / run_name(method, label)
    tokens = getattr(args, f"tokens_{label}") or args.steps * args.batch * stage_len
    seq_len, batch = stage_len, args.batch
    if method == "control":
        seq_len, batch = args.parent_context, args.batch * stage_len // args.parent_context
    cmd = [*kunlun(), "train", "--data", args.data, "--init-from", init, "--out", str(out), "--seq-len",
            str(seq_len), "--rope", "none" if method == "control" else method, "--tokens", str(tokens),
            "--batch-size", str(batch), "--batch-size-start", str(batch), "--lr", str(args.lr),
            "--warmup-steps", str(args.warmup_steps), "--eval-every", "1000000",
            "--eval-batches", "0", "--ckpt-every", "1000000", "--keep-last", "1", "--log-every", "1",
            "--no-progress", "--sample-tokens", "0"]
    return out, cmd


def trained(run: Path) -> bool:
    path = run / "summary.json"
    return path.exists() and bool(json.loads(path.read_text()).get("finished"))


def eval_commands(args: argparse.Namespace, run: str, name: str) -> list[tuple[Path, list[str]]]:
    """(results folder, command) of the position-loss evaluations of ``run`` — at its own context, on the first
    ``--window-tokens`` of the validation split; the parent also at 2K and 4K, read through a sliding window of its
    own 256 tokens (the same tokens without any longer context: the baseline an extension has to beat); a control
    like the parent, at its own context and its stage's length — and of the ruler suite (the parent's and the last
    stage's only)."""
    root = Path(args.out) / "eval" / name
    stage_len = {label: n for n, label in STAGES}.get(name.rsplit("-", 1)[-1])
    lengths = ((args.parent_context, *(n for n, _ in STAGES)) if name == "parent"
               else (args.parent_context, stage_len) if name.startswith("control-") else (stage_len,))
    common = ["--checkpoint", run, "--no-progress"]
    jobs = []
    for n in lengths:
        folder = root / ("position" if len(lengths) == 1 else f"position-{n}")
        jobs.append((folder, [*kunlun(), "eval", *common, "--task", "position-loss", "--data", args.data,
                              "--lengths", str(n), "--per-length", str(max(1, args.window_tokens // n)),
                              "--out", str(folder)]))
    if name == "parent" or name.endswith(STAGES[-1][1]):
        jobs.append((root / "ruler", [*kunlun(), "eval", *common, "--task", f"ruler={args.ruler_tasks}",
                                      "--lengths", args.ruler_lengths, "--per-length", str(args.per_length),
                                      "--max-new-tokens", "8", "--out", str(root / "ruler")]))
    return jobs


def run_stage(args: argparse.Namespace, name: str, cmd: list[str], log_dir: Path) -> bool:
    """Run one stage (niced, ``--threads`` torch threads), logging its command, wall time and load; True if it
    succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    load0, start = os.getloadavg()[0], time.time()
    with open(log_dir / f"{name}.log", "ab") as f:
        rc = subprocess.run(["nice", "-n", str(args.nice), *cmd], stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    record = {"stage": name, "command": shlex.join(cmd), "rc": rc, "started": time.strftime(
        "%Y-%m-%d %H:%M:%S", time.gmtime(start)), "wall_s": round(time.time() - start, 1),
        "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2), "threads": args.threads}
    with _log_lock, open(log_dir / "stages.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{record['started']} {name}: rc {rc}, {record['wall_s']:.0f} s (load {load0:.1f})", flush=True)
    return rc == 0


@dataclass
class Job:
    """One stage: its name (``train-yarn-2k``, ``eval-yarn-2k-position``), command, the file that says it is done,
    and the jobs it needs."""

    name: str
    cmd: list[str]
    done_file: Path
    needs: tuple[str, ...] = ()

    def done(self) -> bool:
        if self.name.startswith("train-"):
            return trained(self.done_file.parent)
        return self.done_file.exists()


def plan_jobs(args: argparse.Namespace, methods: list[str]) -> list[Job]:
    """Every stage in priority order: the 2K trainings (and control's), their position losses, the parent's,
    the 4K trainings, theirs, then the ruler suite (the slowest and, for a small model, the least informative)."""
    jobs: list[Job] = []
    methods = [*methods, *(["control"] if args.control and "control" not in methods else [])]
    for index in range(len(STAGES)):
        label = STAGES[index][1]
        for m in methods:
            out, cmd = train_stage(args, m, index)
            needs = (f"train-{run_name(m, STAGES[index - 1][1])}",) if index else ()
            jobs.append(Job(f"train-{out.name}", cmd, out / "summary.json", needs))
        for m in methods:
            jobs += eval_jobs(args, str(Path(args.out) / run_name(m, label)), run_name(m, label), "position")
        if index == 0:
            jobs += eval_jobs(args, args.parent, "parent", "position")
    jobs += eval_jobs(args, args.parent, "parent", "ruler")
    for m in methods:
        jobs += eval_jobs(args, str(Path(args.out) / run_name(m, STAGES[-1][1])), run_name(m, STAGES[-1][1]), "ruler")
    if args.only:
        jobs = [j for j in jobs if j.name.startswith(args.only)]
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    while True:  # a skipped stage takes what needs it along
        dropped = {j.name for j in jobs if j.name in skip or set(j.needs) & skip}
        if dropped <= skip:
            break
        skip |= dropped
    return [j for j in jobs if j.name not in skip]


def eval_jobs(args: argparse.Namespace, run: str, name: str, which: str) -> list[Job]:
    needs = () if name == "parent" else (f"train-{name}",)
    return [Job(f"eval-{name}-{folder.name}", cmd, folder / "summary.json", needs)
            for folder, cmd in eval_commands(args, run, name) if folder.name.startswith(which)]


def run_jobs(args: argparse.Namespace, jobs: list[Job], log_dir: Path) -> None:
    """Run ``jobs`` on ``--lanes`` lanes, each lane taking the first job whose needs are met (a job whose need
    failed, or is not in the list and not done, is dropped)."""
    names = {j.name for j in jobs}
    finished = {j.name for j in jobs if j.done()}
    pending = [j for j in jobs if j.name not in finished]
    failed: set[str] = set()
    cond = Condition()

    def ready(j: Job) -> bool:
        return all(n in finished or (n not in names and trained(Path(args.out, n.removeprefix("train-"))))
                   for n in j.needs)

    def lane() -> None:
        while True:
            with cond:
                while True:
                    for j in [j for j in pending if any(n in failed for n in j.needs)]:
                        pending.remove(j)
                        failed.add(j.name)
                    job = next((j for j in pending if ready(j)), None)
                    if job or not pending:
                        break
                    cond.wait(timeout=5)
                if job is None:
                    cond.notify_all()
                    return
                pending.remove(job)
            ok = run_stage(args, job.name, job.cmd, log_dir)
            with cond:
                (finished if ok else failed).add(job.name)
                cond.notify_all()

    threads = [Thread(target=lane) for _ in range(args.lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        from long_context_report import write_report

        write_report(Path(args.out), Path(args.report), args)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {*METHODS, "control"})
    if unknown:
        sys.exit(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}, control")
    log_dir = Path(args.out)
    log_dir.mkdir(parents=True, exist_ok=True)
    run_jobs(args, plan_jobs(args, methods), log_dir)

if __name__ == "__main__":
    main()
