"""lm-evaluation-harness on a checkpoint, its numbers as rows of ``kunlun eval``'s results table.

The checkpoint is evaluated through the transformers integration: an export folder is used as it is; a training
checkpoint (KunlunBaize or the Llama baseline) is exported to a temporary folder first. lm-eval's
``HFLM`` then loads it with ``AutoModelForCausalLM``.

Averaging over samples: lm-eval's ``repeats: N`` generates N samples per document, but without a filter in
the task's YAML it applies ``take_first`` (lm_eval/api/task.py: "Using default 'take_first' filter for handling
repeats") and scores only the first. ``kunlun eval``'s own ``math-avg`` kind averages over all of them; through
lm-eval, averaging needs a filter that keeps every sample and a metric that averages it.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path
from typing import Any

from ..checkpoint import checkpoint_arch, is_export, resolve_checkpoint


def _export_folder(ckpt: Path, tmp: str) -> Path:
    """A transformers folder for ``ckpt``: itself when it is an export, else an export written into ``tmp``."""
    from .. import hf  # noqa: F401  (registers KunlunBaize with the Auto classes)

    if is_export(ckpt):
        return ckpt
    out = Path(tmp) / "hf"
    checkpoint_arch(ckpt).hook("export")(ckpt, out, log=lambda m: None)
    return out


def metric_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """lm-eval's ``results`` as table rows: ``{"task", "metric", "value", "stderr", "n", "source": "lm-eval"}``.

    ``"acc,none"`` becomes metric ``acc``; another filter is named in brackets (``exact_match (flexible)``);
    the matching ``"acc_stderr,none"`` becomes ``stderr`` (None when lm-eval says "N/A")."""
    rows = []
    counts = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        n = counts.get(task, {}).get("effective")
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name in ("alias", "sample_len") or "_stderr" in name or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}")
            rows.append({"task": task, "metric": name if filt in ("none", "") else f"{name} ({filt})",
                         "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "n": n, "source": "lm-eval"})
    return rows


def sizes_by_tokenizer(manager: Any, tasks: list[str]) -> bool:
    """Whether one of ``tasks`` is lm-eval's RULER (its data is generated to token lengths with the model's
    tokenizer, which lm-eval finds under the ``pretrained`` metadata)."""
    entries = [manager.task_index.get(t) for t in tasks]
    return any(e is not None and e.yaml_path is not None and "ruler" in Path(e.yaml_path).parts for e in entries)


def task_manager(tasks: list[str], include_path: str | Path | None = None,
                 metadata: dict[str, Any] | None = None) -> Any:
    """lm-eval's ``TaskManager`` for ``tasks``: the YAMLs of ``include_path`` alone when every one of ``tasks`` is a
    task defined there, else those and lm-eval's own (indexing its ~15,000 YAMLs takes seconds of CPU)."""
    from lm_eval.tasks import TaskManager

    path = str(include_path) if include_path is not None else None
    if path is not None:
        local = TaskManager(include_path=path, include_defaults=False, metadata=metadata)
        entries = [local.task_index.get(t) for t in tasks]
        if all(e is not None and e.kind.name in ("TASK", "PY_TASK") for e in entries):  # not a group or a tag
            return local
    return TaskManager(include_path=path, metadata=metadata)


def run_lm_eval(checkpoint: str | Path, tasks: list[str], *, include_path: str | Path | None = None,
                limit: int | None = None, batch_size: int = 8, device: str = "cpu", num_fewshot: int | None = None,
                seed: int = 0, apply_chat_template: bool = False, log_samples: bool = False,
                metadata: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run lm-evaluation-harness ``tasks`` on ``checkpoint`` (run, checkpoint or export folder), offline.

    ``metadata`` goes to every task (lm-eval's ``--metadata``, e.g. ``{"max_seq_lengths": [4096, 8192]}`` for its
    RULER tasks). Tasks that generate their data for the model's tokenizer (lm-eval's ``ruler`` folder) are told
    the exported folder as ``pretrained``, where the tokenizer is. Returns the table rows (:func:`metric_rows`) and
    lm-eval's raw results. An unknown task name raises a ValueError naming the closest known ones.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ValueError(f"--lm-eval needs lm-evaluation-harness ({e}): pip install -e '.[eval]'") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: local tasks and files only
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path} is not a folder of lm-eval task YAMLs")
    manager = task_manager(tasks, include_path)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            raise ValueError(f"lm-eval has no task {task!r}" + (f" (did you mean {', '.join(close)}?)" if close
                                                                 else "") +
                             "; `python -m kunlunbaize.lm_eval ls tasks` lists them, --include-path adds a folder "
                             "of task YAMLs")
    ckpt = resolve_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="kunlun-lm-eval-") as tmp:
        folder = _export_folder(ckpt, tmp)
        if metadata or sizes_by_tokenizer(manager, tasks):
            manager = task_manager(tasks, include_path, metadata={"pretrained": str(folder), **(metadata or {})})
        lm = HFLM(pretrained=str(folder), backend="causal", batch_size=batch_size, device=device)
        try:
            raw = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed,
                                          apply_chat_template=apply_chat_template, log_samples=log_samples)
        except ImportError as e:  # a task's YAML names Python code of a package lm-eval does not install
            what = f"the Python package {e.name!r}, which is not installed" if e.name else str(e).splitlines()[0]
            raise ValueError(f"lm-eval's {', '.join(tasks)} cannot load: {what} (docs/guide-eval.md says what "
                             "each needs offline)") from None
    return metric_rows(raw), raw
