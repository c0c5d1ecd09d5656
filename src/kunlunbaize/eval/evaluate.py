"""``kunlun eval``: a checkpoint on several tasks (and lm-evaluation-harness tasks) into one results folder.

The folder holds ``config.json`` (checkpoint, its hash, the settings of this invocation), one sub-folder per task
(``task.json``, ``records.jsonl``, ``summary.json``), ``summary.json`` with every metric row and ``results.md``
with the table that is printed.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..defaults import PREFILL_CHUNK
from .model import EvalModel, checkpoint_hash
from .records import Log, _stderr, _write_json
from .runner import TaskRunner
from .tasks import Task, TaskError


def default_out(ckpt: Path) -> Path:
    """``RUN/eval/<checkpoint>`` for a training checkpoint (``RUN/checkpoints/step_…``), else ``evals/<folder>``."""
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "eval" / ckpt.name
    return Path("evals") / ckpt.name


def evaluate(checkpoint: str | Path, tasks: list[Task], *, out: str | Path | None = None,
             lm_eval_tasks: list[str] | None = None, include_path: str | None = None,
             lm_eval_few_shot: int | None = None, lm_eval_metadata: dict[str, Any] | None = None,
             batch_size: int = 16,
             limit: int | None = None, seed: int = 0, chat: str = "auto", fresh: bool = False, device: str = "cpu",
             dtype: torch.dtype = torch.float32, progress: bool = True, workers: int | None = None,
             timeout: float = 10.0, data: str | Path | None = None, log: Log = _stderr,
             prefill_chunk: int | None = PREFILL_CHUNK) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (run, checkpoint or export folder) on ``tasks``; returns the summary written to
    ``OUT/summary.json`` (``rows``: one per metric, ``tasks``: each task's summary, ``out``: the folder).
    ``prefill_chunk``: tokens per forward when reading long inputs (:class:`~kunlunbaize.eval.model.EvalModel`)."""
    if chat not in ("auto", "on", "off"):
        raise TaskError(f"chat must be auto, on or off, not {chat!r}")
    model = EvalModel(checkpoint, device=device, dtype=dtype, prefill_chunk=prefill_chunk)
    template = None if chat == "off" else model.chat_template
    if chat == "on" and template is None:
        raise TaskError(f"{model.checkpoint} has no chat template (chat_template.jinja or tokenizer_config.json's "
                        "chat_template): evaluate with --chat-template auto or off")
    folder = Path(out) if out is not None else default_out(model.checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    digest = checkpoint_hash(model.checkpoint)
    config = {"checkpoint": str(model.checkpoint), "checkpoint_hash": digest, "arch": model.arch,
              "tasks": [t.name for t in tasks], "lm_eval_tasks": lm_eval_tasks or [], "limit": limit,
              "batch_size": batch_size, "seed": seed, "chat_template": template is not None, "device": device,
              "dtype": str(dtype).removeprefix("torch."), "kunlunbaize": __version__, "torch": torch.__version__,
              "python": platform.python_version(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write_json(folder / "config.json", config)
    log(f"evaluating {model.checkpoint} ({model.arch}, sha256 {digest[:12]}) into {folder}"
        + (" with its chat template" if template else ""))
    summaries, rows = [], []
    for task in tasks:
        runner = TaskRunner(model, task, folder / task.name, checkpoint_hash=digest, batch_size=batch_size,
                            limit=limit, seed=seed, chat_template=template, fresh=fresh, progress=progress,
                            workers=workers, timeout=timeout, data=data, log=log)
        summary = runner.run()
        summaries.append(summary)
        rows += summary["rows"]
    if lm_eval_tasks:
        from .harness import run_lm_eval

        lm_rows, raw = run_lm_eval(model.checkpoint, lm_eval_tasks, include_path=include_path, limit=limit,
                                   batch_size=batch_size, device=device, seed=seed, num_fewshot=lm_eval_few_shot,
                                   apply_chat_template=template is not None, metadata=lm_eval_metadata)
        rows += [{"kind": "lm-eval", **r} for r in lm_rows]
        _write_json(folder / "lm_eval.json", _jsonable(raw))
    summary = {"checkpoint": str(model.checkpoint), "checkpoint_hash": digest, "rows": rows, "tasks": summaries,
               "out": str(folder)}
    _write_json(folder / "summary.json", summary)
    ruler = "".join(f"\n## {t['task']}: score by length\n\n{t['ruler']['table']}\n" for t in summaries if "ruler" in t)
    ruler += "".join(f"\n## {t['task']}\n\n{t['position_loss']['table']}\n" for t in summaries
                     if "position_loss" in t)
    (folder / "results.md").write_text(markdown_table(rows) + "\n" + ruler, encoding="utf-8")
    return summary


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _cells(r: dict[str, Any]) -> list[str]:
    value = r["value"]
    stderr = "" if r.get("stderr") is None else f"± {r['stderr']:.4f}"
    return [r["task"], r.get("kind", ""), r["metric"], f"{value:.4f}", stderr, "" if r.get("n") is None else
            f"{r['n']:,}"]


HEADER = ["task", "kind", "metric", "value", "stderr", "n"]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as an aligned text table (what ``kunlun eval`` prints)."""
    cells = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    right = {3, 4, 5}
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                               enumerate(zip(cell, widths, strict=True))).rstrip() for cell in cells)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * 3 + "---:|" * 3]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


__all__ = ["default_out", "evaluate", "format_table", "markdown_table"]
