"""The long-context suite on a loaded checkpoint (the ``ruler`` kind of :class:`.runner.TaskRunner`).

Samples are generated (:mod:`.ruler`) for the checkpoint's own tokenizer at each length, a task and length at a
time, continued greedily through the evaluator's generation path (:meth:`.model.EvalModel.generate`) and scored by
RULER's string match. The task folder holds the per-sample records (without the long prompts: their hash, their
last characters, where the needles were), ``ruler.md`` (score by length, Table 3's shape) and ``ruler.png``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..infer.sampling import SamplingParams
from ..progress import Progress
from .records import Log, Records, row, training_data
from .ruler import SUITE, TooShort, length_label, make_sample, parse_tasks, valtext_sentences
from .scoring import string_match_all, string_match_part
from .tasks import TaskError, render_prompt

if TYPE_CHECKING:
    from .model import EvalModel
    from .tasks import Task


class TaskRunner(Protocol):
    """What the suite reads of the :class:`.runner.TaskRunner` that runs it (named here, not imported: the runner
    imports this module)."""

    model: EvalModel
    task: Task
    folder: Path
    fingerprint: dict[str, Any]
    data: str | None
    fresh: bool
    progress: bool
    limit: int | None
    count: int
    seed: int
    batch_size: int
    chat_template: str | None
    log: Log

TAIL_CHARS = 300  # the end of each prompt kept in its record (the question and the answer prefix)


def clip_lengths(lengths: tuple[int, ...], context: int, name: str, log: Log) -> tuple[int, ...]:
    """``lengths`` with those beyond the model's ``context`` replaced by the context, with a warning."""
    over = [n for n in lengths if n > context]
    if over:
        log(f"warning: {name}: {', '.join(length_label(n) for n in over)} tokens exceed the model's context of "
            f"{context}: evaluated at {context} tokens instead (prompt = length − the task's answer tokens)")
    return tuple(sorted({min(n, context) for n in lengths}))


def validation_sentences(runner: TaskRunner, names: tuple[str, ...],
                         longest: int) -> tuple[list[str] | None, str]:
    """Sentences of the validation split the checkpoint was trained on (or ``--data``) and that folder, when a task
    needs them (else None and "")."""
    from ..data.format import load_meta, open_split
    from .bpb import _check_tokenizers

    needs = [n for n in names if SUITE[n].haystack == "valtext"]
    if not needs:
        return None, ""
    data = runner.data or training_data(runner.model.checkpoint)
    if not data:
        raise TaskError(f"ruler's {', '.join(needs)} hide their needles in validation text: give --data DIR (a "
                        f"`kunlun prepare` folder), or choose other tasks (ruler=niah_single_1,vt,…)")
    meta = load_meta(data)
    _check_tokenizers(runner.model.checkpoint, Path(data), meta, runner.model.tokenizer.get_vocab_size())
    ids: list[int] = []
    for shard in open_split(data, "val"):
        ids += shard[:2 * longest - len(ids)].tolist()
        if len(ids) >= 2 * longest:
            break
    sentences = valtext_sentences(runner.model.tokenizer.decode(ids)) if ids else []
    if not sentences:
        raise TaskError(f"the val split of {data} holds no text: prepare it with --val-fraction > 0, or choose tasks "
                        "without validation text (ruler=niah_single_1,vt,…)")
    return sentences, str(data)


class RulerRun:
    """The ``ruler`` task of ``runner``: :meth:`run` generates, scores and returns (rows, extra summary)."""

    def __init__(self, runner: TaskRunner) -> None:
        self.runner, self.task, self.model = runner, runner.task, runner.model
        self.names = parse_tasks(self.task.source or None)
        self.lengths = clip_lengths(self.task.lengths, self.model.context, self.task.name, runner.log)
        per = self.task.per_length
        self.per = per if runner.limit is None else min(per, runner.limit)
        template = runner.chat_template
        self.wrap = (lambda text: render_prompt(text, [], template)) if template else None
        # a sample's index does not depend on --limit, so a run with a higher limit resumes one with a lower
        self.units = [(n, name, i) for n in self.lengths for name in self.names for i in range(per)]
        runner.count = len(self.lengths) * len(self.names) * self.per
        self.wall: dict[int, float] = {}  # seconds per length: making the samples and generating
        self.making: dict[int, float] = {}  # of which making the samples (tokenizer work)

    def budget(self, name: str) -> int:
        return self.task.budget if self.task.budget is not None else SUITE[name].budget

    def count(self, text: str) -> int:
        return len(self.model.encode(text))

    def run(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        sentences, data = validation_sentences(self.runner, self.names, max(self.lengths))
        plan = {"tasks": list(self.names), "lengths": list(self.lengths), "data": data}
        fingerprint = dict(self.runner.fingerprint, records=hashlib.sha256(json.dumps(plan).encode()).hexdigest())
        self.records = Records(self.runner.folder, fingerprint, 1, self.runner.fresh)
        skipped: set[tuple[int, str]] = set()
        done = sum(1 for i, (_, _, k) in enumerate(self.units) if k < self.per and i in self.records.done)
        bar = Progress(self.runner.count, initial=done, desc=self.task.name, unit="sample",
                       enabled=self.runner.progress)
        with bar:
            for length in self.lengths:
                start = time.perf_counter()
                for name in self.names:
                    if not self._group(length, name, sentences, bar):
                        skipped.add((length, name))
                self.wall[length] = time.perf_counter() - start
        if len(skipped) == len(self.lengths) * len(self.names):
            raise TaskError(f"{self.task.name}: no task fits at {', '.join(map(length_label, self.lengths))} tokens "
                            f"(the model's context is {self.model.context}): choose longer --lengths, a smaller "
                            "--max-new-tokens, or a model with a longer context")
        return self._score(skipped)

    def _group(self, length: int, name: str, sentences: list[str] | None, bar: Any) -> bool:
        """Generate and score the samples of ``name`` at ``length`` not yet recorded; False if it cannot fit."""
        base = self.units.index((length, name, 0))
        todo = [i for i in range(self.per) if base + i not in self.records.done]
        budget, hint = self.budget(name), None
        stop = tuple(self.task.stop)
        for at in range(0, len(todo), self.runner.batch_size):
            samples = []
            for i in todo[at:at + self.runner.batch_size]:
                start = time.perf_counter()
                try:
                    sample = make_sample(name, length, i, self.count, seed=self.runner.seed, sentences=sentences,
                                         budget=budget, wrap=self.wrap, hint=hint)
                except TooShort as e:
                    self.runner.log(f"warning: {e}; skipped")
                    return False
                finally:
                    self.making[length] = self.making.get(length, 0.0) + time.perf_counter() - start
                hint = sample["haystack_units"]
                samples.append((base + i, sample))
            outs = self.model.generate([s["prompt"] for _, s in samples], budget, SamplingParams(), None, stop)
            self.records.add([self._line(index, s, out) for (index, s), out in zip(samples, outs, strict=True)])
            bar.update(len(samples))
        return True

    @staticmethod
    def _line(index: int, sample: dict[str, Any], out: Any) -> dict[str, Any]:
        prompt = sample.pop("prompt")
        score = (string_match_all if sample["metric"] == "all" else string_match_part)(out.text, sample["answer"])
        return {"index": index, **sample, "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
                "prompt_tail": prompt[-TAIL_CHARS:], "output": out.text, "tokens": out.tokens,
                "finish_reason": out.finish_reason, "score": score, "correct": float(score == 1.0)}

    def _score(self, skipped: set[tuple[int, str]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        lines = [ln for d in self.records.done.values() for ln in d if ln["sample"] < self.per]
        by = {(n, name): [ln["score"] for ln in lines if ln["length"] == n and ln["task"] == name]
              for n in self.lengths for name in self.names if (n, name) not in skipped}
        table = {name: {n: sum(v) / len(v) for (n, t), v in by.items() if t == name and v} for name in self.names}
        rows = []
        for n in self.lengths:
            values = [s for (m, _), v in by.items() if m == n for s in v]
            if values:
                rows.append(row(self.task, f"score@{length_label(n)}", values, len(values)))
        if rows:
            rows.append(row(self.task, "score (avg over lengths)", sum(r["value"] for r in rows) / len(rows),
                            sum(r["n"] for r in rows)))
        markdown = table_markdown(table, self.lengths)
        (self.runner.folder / "ruler.md").write_text(markdown + "\n", encoding="utf-8")
        plot = plot_scores(table, self.lengths, self.runner.folder / "ruler.png", self.task.name)
        return rows, {"ruler": {"scores": {t: {str(n): v for n, v in s.items()} for t, s in table.items()},
                                "lengths": list(self.lengths), "per_length": self.per, "table": markdown,
                                "plot": str(plot), "wall_s": {str(n): s for n, s in self.wall.items()},
                                "making_s": {str(n): self.making.get(n, 0.0) for n in self.wall},
                                "skipped": [f"{t}@{length_label(n)}" for n, t in sorted(skipped)]}}


def _average(scores: dict[int, float]) -> str:
    return f"{sum(scores.values()) / len(scores):.3f}" if scores else "—"


def table_markdown(table: dict[str, dict[int, float]], lengths: tuple[int, ...]) -> str:
    """Score by length in Table 3's shape: a row per task, a column per length, the average of each row; the last
    row averages the tasks at each length."""
    head = "| task | " + " | ".join(length_label(n) for n in lengths) + " | avg |"
    lines = [head, "|---|" + "---:|" * (len(lengths) + 1)]
    for name, scores in table.items():
        cells = [f"{scores[n]:.3f}" if n in scores else "—" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_average(scores)} |")
    means = {n: sum(s[n] for s in table.values() if n in s) / sum(n in s for s in table.values()) for n in lengths
             if any(n in s for s in table.values())}
    lines.append("| **average** | " + " | ".join(f"{means[n]:.3f}" if n in means else "—" for n in lengths)
                 + f" | {_average(means)} |")
    return "\n".join(lines)


def plot_scores(table: dict[str, dict[int, float]], lengths: tuple[int, ...], path: Path, title: str) -> Path:
    """Score against length (log scale): a thin line per task, the average over the tasks thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, scores in table.items():
        xs = [n for n in lengths if n in scores]
        ax.plot(xs, [scores[n] for n in xs], "o-", lw=1, ms=3, alpha=0.6, label=name)
    means = {n: [s[n] for s in table.values() if n in s] for n in lengths}
    xs = [n for n in lengths if means[n]]
    ax.plot(xs, [sum(means[n]) / len(means[n]) for n in xs], "o-", lw=3, color="black", label="average")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths), [length_label(n) for n in lengths])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score (string match)")
    ax.set_title(f"{title}: score by length")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["RulerRun", "clip_lengths", "plot_scores", "table_markdown", "validation_sentences"]
