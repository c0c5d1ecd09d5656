"""Loss by position on long validation windows (the ``position-loss`` task of ``kunlun eval``).

For each length L of ``--lengths``, windows of L + 1 tokens are cut from the start of a prepared dataset's split,
one after the other (``--per-length`` of them; default: every whole window the split holds), and the mean
next-token loss (nats) is reported per position bucket: ``BUCKETS`` equal spans of positions 0 … L−1, where
position t is the prediction of token t + 1 from tokens 0 … t. A model that uses its whole context keeps its loss
falling (or flat) along the window; a model that does not reach that far has its loss rise past the positions it
can use, which is what a context extension is for. A length beyond the model's context is read through a sliding
window of the context (half a context apart): the loss on the same tokens without any longer context, the baseline
an extended model has to beat. Windows run across document boundaries, as training windows do. The task folder
holds one record per window (its start in the split and its bucket losses), ``position_loss.md`` (the table) and
``position_loss.png`` (loss against position, one line per length).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .records import Records, row, training_data
from .tasks import TaskError

if TYPE_CHECKING:
    from .ruler_run import TaskRunner

BUCKETS = 32
"""Position buckets per length (fewer when the length is shorter)."""

Logits = Callable[[torch.Tensor], torch.Tensor]
"""ids [1, L] → logits [1, L, V]."""


def bucket_edges(length: int, buckets: int = BUCKETS) -> list[int]:
    """The first position of each bucket, then ``length``: ``min(buckets, length)`` spans as equal as can be."""
    n = min(buckets, length)
    return [round(i * length / n) for i in range(n + 1)]


def window_losses(logits_of: Logits, tokens: np.ndarray, context: int | None = None) -> torch.Tensor:
    """Next-token losses (nats) at positions 0 … L−1 of one window of L + 1 tokens. A window longer than
    ``context`` is read through a sliding window of ``context`` tokens, ``context // 2`` apart, each position scored
    once (in the first chunk that reaches it): no prediction sees more than ``context`` tokens, none past the
    first chunk fewer than ``context − context // 2``."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
    length = ids.shape[1] - 1
    context = length if context is None else min(context, length)
    stride = max(1, context // 2) if context < length else context
    losses = torch.empty(length)
    done, start = 0, 0
    with torch.inference_mode():
        while done < length:
            end = min(start + context, length)
            logits = logits_of(ids[:, start:end]).float()
            chunk = F.cross_entropy(logits[0], ids[0, start + 1:end + 1], reduction="none")
            losses[done:end] = chunk[done - start:]
            done, start = end, start + stride
    return losses


def bucket_means(losses: torch.Tensor, edges: Sequence[int]) -> list[float]:
    """The mean of ``losses`` over each span ``edges[i] … edges[i+1]−1``."""
    return [float(losses[a:b].double().mean()) for a, b in itertools.pairwise(edges)]


def check_lengths(lengths: Sequence[int], context: int, split_tokens: int, name: str,
                  log: Callable[[str], None]) -> tuple[int, ...]:
    """The lengths to evaluate (sorted); those beyond the model's context get a warning (they are read through a
    sliding window of the context); TaskError for one too short or longer than the split."""
    bad = [n for n in lengths if n < 2]
    if bad:
        raise TaskError(f"{name}: a window needs at least 2 positions, got --lengths {bad[0]}; give lengths such as "
                        "1k,2k")
    over = [n for n in lengths if n > context]
    if over:
        log(f"warning: {name}: {', '.join(map(str, over))} tokens exceed the model's context of {context}: read "
            f"through a sliding window of {context} tokens ({max(1, context // 2)} apart), so no prediction sees "
            f"more than {context} tokens (the baseline an extended model has to beat)")
    kept = tuple(sorted(set(lengths)))
    if max(kept) + 1 > split_tokens:
        raise TaskError(f"{name}: a window of {max(kept)} tokens needs {max(kept) + 1} tokens, but the split holds "
                        f"only {split_tokens}: choose shorter --lengths or a larger split")
    return kept


class PositionLossRun:
    """The ``position-loss`` task of ``runner`` (a :class:`.runner.TaskRunner`): :meth:`run` scores every window not
    yet recorded and returns (rows, extra summary)."""

    def __init__(self, runner: TaskRunner) -> None:
        from ..data.format import load_meta, open_split
        from .bpb import TokenStream, _check_tokenizers

        self.runner, self.task, self.model = runner, runner.task, runner.model
        data = self.task.source or runner.data or training_data(self.model.checkpoint)
        if not data:
            raise TaskError("the position-loss task reads held-out text: give --data DIR (a `kunlun prepare` "
                            f"folder); the data {self.model.checkpoint} was trained on is not recorded in it")
        self.data = str(data)
        _check_tokenizers(self.model.checkpoint, Path(data), load_meta(data), self.model.tokenizer.get_vocab_size())
        self.stream = TokenStream(open_split(data, self.task.split))
        lengths = self.task.lengths or (self.model.context,)
        self.lengths = check_lengths(lengths, self.model.context, len(self.stream), self.task.name, runner.log)
        per = self.task.per_length or None
        if runner.limit is not None:
            per = runner.limit if per is None else min(per, runner.limit)
        whole = {n: (len(self.stream) - 1) // n for n in self.lengths}
        self.windows = {n: min(per or whole[n], whole[n]) for n in self.lengths}
        # a window's record index does not depend on --per-length or --limit, so a larger run resumes a smaller one
        base = dict(zip(self.lengths, np.cumsum([0, *whole.values()]).tolist(), strict=False))
        self.units = {base[n] + w: (n, w) for n in self.lengths for w in range(self.windows[n])}
        runner.count = len(self.units)

    def logits_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``ids`` [1, L], read through the evaluator's (chunked) prefill."""
        return self.model.final_logits(ids, [(0, 0, ids.shape[1])])[None]

    def run(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        plan = {"lengths": list(self.lengths), "data": self.data, "split": self.task.split, "buckets": BUCKETS}
        fingerprint = dict(self.runner.fingerprint,
                           records=hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest())
        records = Records(self.runner.folder, fingerprint, 1, self.runner.fresh)
        from ..progress import Progress

        todo = [i for i in self.units if i not in records.done]
        with Progress(len(self.units), initial=len(self.units) - len(todo), desc=self.task.name, unit="window",
                      enabled=self.runner.progress) as bar:
            for index in todo:
                length, window = self.units[index]
                start = window * length
                losses = window_losses(self.logits_of, self.stream.slice(start, start + length + 1),
                                       self.model.context)
                edges = bucket_edges(length)
                records.add([{"index": index, "length": length, "window": window, "start": start,
                              "context": min(length, self.model.context), "edges": edges,
                              "loss": bucket_means(losses, edges), "mean": float(losses.mean())}])
                bar.update(1)
        return self._score([records.done[i][0] for i in self.units])

    def _score(self, lines: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        curves = {n: curve_of([ln for ln in lines if ln["length"] == n]) for n in self.lengths}
        rows = []
        for n in self.lengths:
            means = [ln["mean"] for ln in lines if ln["length"] == n]
            rows.append(row(self.task, f"loss@{n}", means, len(means)))
            last = [ln["loss"][-1] for ln in lines if ln["length"] == n]
            rows.append(row(self.task, f"loss@{n} last bucket", last, len(last)))
        ckpt = self.model.checkpoint
        label = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name
        markdown = curves_markdown({label: curves})
        folder = self.runner.folder
        (folder / "position_loss.md").write_text(markdown + "\n", encoding="utf-8")
        plot = plot_curves({label: curves}, folder / "position_loss.png", title=f"{self.task.name}: {label}")
        return rows, {"position_loss": {"data": self.data, "split": self.task.split, "windows": self.windows,
                                        "curves": {str(n): c for n, c in curves.items()}, "table": markdown,
                                        "plot": str(plot)}}


def curve_of(lines: list[dict[str, Any]]) -> dict[str, list[float] | int]:
    """The mean loss per bucket over the windows of one length: ``starts`` (each bucket's first position),
    ``ends`` (one past its last), ``loss`` and ``windows``."""
    edges = lines[0]["edges"]
    loss = np.mean([ln["loss"] for ln in lines], axis=0)
    return {"starts": edges[:-1], "ends": edges[1:], "loss": [float(v) for v in loss], "windows": len(lines)}


def curves_markdown(models: dict[str, dict[int, dict[str, Any]]]) -> str:
    """One table per length: a row per position bucket, a column per model (mean loss in nats)."""
    lengths = sorted({n for curves in models.values() for n in curves})
    parts = []
    for n in lengths:
        names = [m for m, curves in models.items() if n in curves]
        first = models[names[0]][n]
        lines = [f"loss by position, {n}-token windows (nats; mean over "
                 + ", ".join(f"{models[m][n]['windows']}" for m in names[:1]) + " windows)", "",
                 "| positions | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for b, (a, e) in enumerate(zip(first["starts"], first["ends"], strict=True)):
            lines.append(f"| {a}–{e - 1} | " + " | ".join(f"{models[m][n]['loss'][b]:.3f}" for m in names) + " |")
        means = [float(np.mean(models[m][n]["loss"])) for m in names]
        lines.append("| **all** | " + " | ".join(f"**{v:.3f}**" for v in means) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_curves(models: dict[str, dict[int, dict[str, Any]]], path: Path, title: str = "loss by position",
                marks: dict[str, int] | None = None, ylabel: str = "next-token loss (nats)") -> Path:
    """Loss against position: a panel per length, a line per model (each bucket at its middle position);
    ``marks`` draws labelled vertical lines (e.g. the original context)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({n for curves in models.values() for n in curves})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    for ax, n in zip(axes[0], lengths, strict=True):
        for name, curves in models.items():
            if n in curves:
                c = curves[n]
                xs = [(a + e - 1) / 2 for a, e in zip(c["starts"], c["ends"], strict=True)]
                ax.plot(xs, c["loss"], "o-", ms=2.5, lw=1.2, label=name)
        for label, x in (marks or {}).items():
            ax.axvline(x, color="grey", ls="--", lw=0.8)
            ax.text(x, 1.0, f" {label}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
        ax.set_xlabel("position in the window (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{n}-token windows")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["BUCKETS", "PositionLossRun", "bucket_edges", "bucket_means", "check_lengths", "curve_of",
           "curves_markdown", "plot_curves", "window_losses"]
