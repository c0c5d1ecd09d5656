"""One run of an ablation study, in its own process: ``python -m kunlunbaize.ablate.worker RUN/spec.json``.

Trains (resuming from the run's last checkpoint if any), evaluates the final checkpoint with ``kunlun eval``'s
tasks, and writes ``done.json`` last (atomically), so a run is done exactly when that file exists.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(spec_file: str) -> None:
    import torch

    from ..eval.evaluate import evaluate
    from ..eval.tasks import make_task
    from ..train.logging import read_metrics
    from ..train.trainer import TrainConfig, train

    if os.environ.get("KUNLUN_THREADS"):
        torch.set_num_threads(int(os.environ["KUNLUN_THREADS"]))
    spec = json.loads(Path(spec_file).read_text())
    folder = Path(spec["train"]["out"])
    t0 = time.time()
    # progress lines go to worker.log (a file: plain lines at a steady interval); the spec keeps progress=False
    summary = train(TrainConfig(**{**spec["train"], "progress": True}))
    if not summary["finished"]:
        raise SystemExit(f"training stopped early ({summary.get('interrupted')}); run the study again to resume")
    train_s = time.time() - t0
    tasks = [make_task(name, data=spec["train"]["data"]) for name in spec["eval_tasks"]]
    device = "cuda" if spec["train"]["device"] in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    result = evaluate(summary["checkpoint"], tasks, out=folder / "eval", limit=spec["eval_limit"], device=device,
                      progress=False, log=lambda m: print(m, file=sys.stderr))
    records = read_metrics(folder / "metrics.jsonl")
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first includes start-up
    done = {"spec": spec["spec"], "val_loss": summary["val_loss"], "params": summary["params"],
            "tokens": summary["tokens"], "steps": summary["step"], "checkpoint": summary["checkpoint"],
            "tokens_per_s": statistics.median(rates) if rates else None, "train_s": train_s,
            "eval": result["rows"], "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = folder / "done.json.tmp"
    tmp.write_text(json.dumps(done, indent=2))
    os.replace(tmp, folder / "done.json")


if __name__ == "__main__":
    main(sys.argv[1])
