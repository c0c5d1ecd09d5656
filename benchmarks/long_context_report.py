"""The report of ``benchmarks/long_context.py --report DIR``: the stages' commands and wall times, the loss by
position of every model side by side (a table and a plot per window length), the loss over position ranges, each
extension against the parent and against its control (the parent trained on as many tokens at its own context),
range by range and bucket by bucket, and the ruler suite's score by length in Table 3's shape — small files meant
to be committed (results/long_context/).

Also usable on its own: ``python benchmarks/long_context_report.py --out runs/lc --report results/long_context``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kunlunbaize.eval.position_loss import curves_markdown, plot_curves
from kunlunbaize.eval.ruler import length_label

RANGES = ((0, 256), (256, 2048), (2048, 4096))  # the parent's context, the 2K stage's addition, the 4K stage's


def _task_summary(folder: Path) -> dict[str, Any] | None:
    path = folder / "summary.json"
    return json.loads(path.read_text())["tasks"][0] if path.is_file() else None


def collect(out: Path) -> dict[str, dict[str, Any]]:
    """Per model (``parent``, ``METHOD-2k``, ``METHOD-4k``): its position curves, ruler scores and training step."""
    models: dict[str, dict[str, Any]] = {}
    for folder in sorted((out / "eval").glob("*")):
        ruler = _task_summary(folder / "ruler")
        entry: dict[str, Any] = {}
        for sub in sorted(folder.glob("position*")):  # e.g. position and a later position4 with more windows
            position = _task_summary(sub)
            for n, c in (position or {}).get("position_loss", {}).get("curves", {}).items():
                if c["windows"] > entry.setdefault("curves", {}).get(int(n), {}).get("windows", 0):
                    entry["curves"][int(n)] = c
                    entry.setdefault("windows", {})[int(n)] = window_curves(sub, int(n))
        if ruler:
            entry["ruler"] = {t: {int(n): v for n, v in s.items()} for t, s in ruler["ruler"]["scores"].items()}
        metrics = out / folder.name / "metrics.jsonl"
        if metrics.is_file():
            steps = [json.loads(ln) for ln in metrics.read_text().splitlines() if '"loss"' in ln]
            entry["train"] = {"steps": len(steps), "loss": [s["loss"] for s in steps],
                              "main_loss": [s.get("main_loss") for s in steps],
                              "tokens_per_s": [s.get("tokens_per_s") for s in steps]}
        models[folder.name] = entry
    return models


def window_curves(folder: Path, n: int) -> list[dict[str, Any]]:
    """The curve of each ``n``-token window of a position-loss evaluation (its ``records.jsonl``), in order."""
    path = folder / "position-loss" / "records.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []
    return [{"starts": r["edges"][:-1], "ends": r["edges"][1:], "loss": r["loss"]}
            for r in sorted(rows, key=lambda r: r["window"]) if r["length"] == n]


def paired_gain(mine: dict[str, Any], base: dict[str, Any], n: int, lo: int, hi: int) -> str:
    """``mine`` − ``base`` over positions lo … hi−1 at window length ``n``, ± the standard error of the mean over
    the windows (each window read by both: a paired difference); the plain difference without per-window data."""
    a, b = range_loss(mine["curves"][n], lo, hi), range_loss(base["curves"][n], lo, hi)
    if a is None or b is None:
        return "—"
    wa, wb = mine.get("windows", {}).get(n, []), base.get("windows", {}).get(n, [])
    if len(wa) < 2 or len(wa) != len(wb):
        return f"{a - b:+.3f}"
    d = [range_loss(x, lo, hi) - range_loss(y, lo, hi) for x, y in zip(wa, wb, strict=True)]
    return f"{a - b:+.3f} ± {np.std(d, ddof=1) / np.sqrt(len(d)):.3f}"


def range_loss(curve: dict[str, Any], lo: int, hi: int) -> float | None:
    """The mean loss over positions lo … hi−1, from the buckets that lie inside (None when none does)."""
    values = [(loss, e - a) for a, e, loss in zip(curve["starts"], curve["ends"], curve["loss"], strict=True)
              if a >= lo and e <= hi]
    return sum(v * w for v, w in values) / sum(w for _, w in values) if values else None


def ranges_table(models: dict[str, dict[str, Any]], stages: dict[str, dict[str, Any]]) -> str:
    """A row per model and window length (the parent's read through its 256-token sliding window)."""
    head = ("| model | windows | training (wall) | loss, positions " + " | ".join(f"{a}–{b - 1}" for a, b in RANGES)
            + " | ruler avg |")
    lines = [head, "|---|---|---:|" + "---:|" * (len(RANGES) + 1)]
    for name, m in models.items():
        ruler = m.get("ruler")
        avg = np.mean([v for s in ruler.values() for v in s.values()]) if ruler else None
        wall = stages.get(f"train-{name}", {}).get("wall_s")
        for n, curve in sorted(m.get("curves", {}).items()):
            if n <= RANGES[0][1] and len(m["curves"]) > 1:
                continue
            cells = [f"{v:.3f}" if (v := range_loss(curve, a, b)) is not None else "—" for a, b in RANGES]
            lines.append(f"| {name} | {curve['windows']} × {length_label(n)} | {f'{wall:.0f} s' if wall else '—'} | "
                         + " | ".join(cells) + f" | {f'{avg:.3f}' if avg is not None else '—'} |")
    return "\n".join(lines)


def control_of(name: str) -> str | None:
    """The control of an extension (``yarn-2k`` → ``control-2k``: the parent trained on as many tokens at its own
    context); None for the parent and the controls."""
    if name == "parent" or name.startswith("control-") or "-" not in name:
        return None
    return "control-" + name.rsplit("-", 1)[1]


def gain_table(models: dict[str, dict[str, Any]], against: str = "parent") -> str:
    """Each model's loss over each position range minus a baseline's on the same tokens (both read at the model's
    longest window length): ``against="parent"``, the parent's (through its own 256-token sliding window), every
    model; ``"control"``, the matching control's, every extension. Negative where the model does better."""
    lines = ["| model | " + " | ".join(f"Δ positions {a}–{b - 1}" for a, b in RANGES) + " |",
             "|---|" + "---:|" * len(RANGES)]
    for name, m in models.items():
        base_name = "parent" if against == "parent" else control_of(name)
        base_curves = models.get(base_name or "", {}).get("curves", {})
        if name == base_name or base_name is None or not m.get("curves"):
            continue
        n = max(m["curves"])
        if n not in base_curves:
            continue
        cells = []
        for a, b in RANGES:
            if against == "control":
                cells.append(paired_gain(m, models[base_name], n, a, b))
                continue
            mine, base = range_loss(m["curves"][n], a, b), range_loss(base_curves[n], a, b)
            cells.append(f"{mine - base:+.3f}" if mine is not None and base is not None else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bucket_gains(curves: dict[str, dict[str, Any]], base: str, names: list[str]) -> str:
    """A row per position bucket, a column per model in ``names``: its loss minus ``base``'s there (nats)."""
    ref = curves[base]
    lines = ["| positions | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for b, (a, e) in enumerate(zip(ref["starts"], ref["ends"], strict=True)):
        lines.append(f"| {a}–{e - 1} | " + " | ".join(f"{curves[m]['loss'][b] - ref['loss'][b]:+.3f}"
                                                      for m in names) + " |")
    return "\n".join(lines)


def training_table(models: dict[str, dict[str, Any]]) -> str:
    """Each trained stage: its steps, its main loss at the first and last step (one batch each, so noisy) and
    the mean training throughput."""
    lines = ["| stage | steps | main loss, first step | last step | tokens/s (mean) |", "|---|---:|---:|---:|---:|"]
    for name, m in models.items():
        t = m.get("train")
        if t and t["steps"]:
            rates = [r for r in t["tokens_per_s"] if r]
            lines.append(f"| {name} | {t['steps']} | {t['main_loss'][0]:.3f} | {t['main_loss'][-1]:.3f} | "
                         + (f"{np.mean(rates):.0f} |" if rates else "— |"))
    return "\n".join(lines)


def ruler_table(models: dict[str, dict[str, Any]]) -> str:
    """Score by length, Table 3's shape: a row per model (the mean over its tasks), a column per length."""
    lengths = sorted({n for m in models.values() for s in m.get("ruler", {}).values() for n in s})
    lines = ["| model | " + " | ".join(length_label(n) for n in lengths) + " | avg |",
             "|---|" + "---:|" * (len(lengths) + 1)]
    for name, m in models.items():
        if "ruler" not in m:
            continue
        at = {n: np.mean([s[n] for s in m["ruler"].values() if n in s]) for n in lengths
              if any(n in s for s in m["ruler"].values())}
        lines.append(f"| {name} | " + " | ".join(f"{at[n]:.2f}" if n in at else "—" for n in lengths)
                     + f" | {np.mean(list(at.values())):.2f} |")
    return "\n".join(lines)


def stages_table(records: list[dict[str, Any]]) -> str:
    lines = ["| stage | started (UTC) | wall | load (1-min avg) at start → end | rc |", "|---|---|---:|---|---:|"]
    for r in records:
        lines.append(f"| {r['stage']} | {r['started']} | {r['wall_s']:.0f} s | {r['load_start']} → "
                     f"{r['load_end']} | {r['rc']} |")
    return "\n".join(lines)


def control_section(curves: dict[str, dict[int, dict[str, Any]]], n: int, report: Path) -> list[str]:
    """Markdown (a bucket table) and a plot of every extension at window length ``n`` minus its control, when
    the control was read at that length."""
    flat = {name: c[n] for name, c in curves.items()}
    by_control: dict[str, list[str]] = {}
    for name in flat:
        if (control := control_of(name)) in flat:
            by_control.setdefault(control, []).append(name)
    parts: list[str] = []
    for control, names in sorted(by_control.items()):
        gains = {name: {n: {**flat[name], "loss": [v - b for v, b in zip(flat[name]["loss"], flat[control]["loss"],
                                                                          strict=True)]}} for name in names}
        path = report / f"position_control_gain_{n}.png"
        plot_curves(gains, path, marks={"parent's context": 256, **({"2K stage": 2048} if n > 2048 else {})},
                    ylabel=f"loss − {control}'s (nats)",
                    title=f"loss − the control's ({control}) on the same tokens, {length_label(n)} windows")
        parts += [f"## Against {control} by position, {n}-token windows (nats; negative: the longer context helps)",
                  "", bucket_gains(flat, control, names), "",
                  f"![against {control} at {length_label(n)}]({path.name})\n"]
    return parts


def write_report(out: Path, report: Path, args: argparse.Namespace | None = None) -> None:
    """Gather ``out``'s results into ``report``: ``report.md`` (every table), ``models.json``, ``stages.jsonl``
    and ``position_<L>.png`` per window length."""
    report.mkdir(parents=True, exist_ok=True)
    records = [json.loads(ln) for ln in (out / "stages.jsonl").read_text().splitlines()] \
        if (out / "stages.jsonl").is_file() else []
    last = {r["stage"]: r for r in records if r["rc"] == 0}
    models = collect(out)
    parts = ["# Long-context demonstration: results", "", "## Stages", "", stages_table(records), "",
             "## Training", "", training_table(models), "",
             "## Loss over position ranges (nats)", "", ranges_table(models, last), "",
             "## Against the parent on the same tokens (its 256-token sliding window)", "", gain_table(models), ""]
    if any(name.startswith("control-") for name in models):
        parts += ["## Against the control on the same tokens (the parent trained on as many tokens at its own "
                  "context, read through its 256-token sliding window)", "", gain_table(models, "control"), "",
                  "(± the standard error of the mean difference over the windows: each window is read by both "
                  "models, so the difference is paired)", ""]
    for n in sorted({n for m in models.values() for n in m.get("curves", {}) if n > 256}):
        curves = {name: {n: m["curves"][n]} for name, m in models.items() if n in m.get("curves", {})}
        parts += [f"## Loss by position, {n}-token windows", "", curves_markdown(curves), ""]
        plot_curves(curves, report / f"position_{n}.png", title=f"loss by position, {length_label(n)} windows",
                    marks={"parent's context": 256, **({"2K stage": 2048} if n > 2048 else {})})
        parts.append(f"![loss by position at {length_label(n)}](position_{n}.png)\n")
        if "parent" in curves:
            base = curves["parent"][n]["loss"]
            gains = {name: {n: {**c[n], "loss": [v - b for v, b in zip(c[n]["loss"], base, strict=True)]}}
                     for name, c in curves.items() if name != "parent"}
            plot_curves(gains, report / f"position_gain_{n}.png", marks={"parent's context": 256,
                        **({"2K stage": 2048} if n > 2048 else {})}, ylabel="loss − the parent's (nats)",
                        title=f"loss − the parent's on the same tokens, {length_label(n)} windows")
            parts.append(f"![against the parent at {length_label(n)}](position_gain_{n}.png)\n")
        parts += control_section(curves, n, report)
    if any("ruler" in m for m in models.values()):
        parts += ["## Ruler suite: score by length", "", ruler_table(models), ""]
    (report / "report.md").write_text("\n".join(parts), encoding="utf-8")
    (report / "models.json").write_text(json.dumps(models, indent=1, default=float) + "\n", encoding="utf-8")
    if records:
        shutil.copy(out / "stages.jsonl", report / "stages.jsonl")
    print(f"report: {report / 'report.md'}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/lc", help="the folder benchmarks/long_context.py wrote")
    p.add_argument("--report", default="results/long_context", help="where the report goes")
    a = p.parse_args()
    write_report(Path(a.out), Path(a.report))
