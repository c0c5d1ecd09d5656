"""The study's report: ``ablation.json``, ``ablation.md`` (Table 4's shape) and two plots, from the runs done so far.

Per comparison (equal tokens, equal training FLOPs) and variant: mean ± sample standard deviation over seeds of
the final validation loss (nats/token) and of every ``kunlun eval`` metric; Δ vs. the full model and vs. Llama
as the mean ± standard deviation of the per-seed differences (paired by seed); parameters, training FLOPs per
token, tokens trained and training tokens/s.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from .plan import BASE, FULL, VARIANTS, StudyConfig, plan, run_dir

MATCH_TITLES = {"tokens": "equal tokens (the paper's comparison)", "flops": "equal training FLOPs"}


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for no values; sd None for one)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def collect(cfg: StudyConfig, specs: list | None = None) -> list[dict[str, Any]]:
    """``done.json`` of every planned run (``specs``, default the study's plan) that is done, with its validation
    curve."""
    from ..train.logging import read_metrics

    out = []
    for spec in plan(cfg) if specs is None else specs:
        folder = run_dir(cfg, spec)
        if (folder / "done.json").is_file():
            done = json.loads((folder / "done.json").read_text())
            curve = [(r["tokens"], r["val_loss"]) for r in read_metrics(folder / "metrics.jsonl") if "val_loss" in r]
            out.append({**done, "name": spec.name, "curve": sorted(dict(curve).items())})
    return out


def _metrics(run: dict[str, Any]) -> dict[str, float]:
    """A run's numbers by name: ``val_loss`` and each eval row as ``task metric``."""
    values = {"val_loss": run["val_loss"]}
    for r in run["eval"]:
        values[f"{r['task']} {r['metric']}"] = r["value"]
    return values


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (comparison, variant) with means, standard deviations and paired deltas."""
    rows = []
    matches = [m for m in ("tokens", "flops") if any(r["spec"]["match"] == m or r["spec"]["variant"] == "full"
                                                       for r in runs)]
    for match in matches:
        # the full model's own run serves both comparisons (its budget defines the FLOPs)
        group = [r for r in runs if r["spec"]["match"] == match or (r["spec"]["variant"] == "full" and
                                                                     r["spec"]["match"] == "tokens")]
        by_variant: dict[str, dict[int, dict]] = {}
        for r in group:
            by_variant.setdefault(r["spec"]["variant"], {})[r["spec"]["seed"]] = r
        if match == "flops" and set(by_variant) <= {"full"}:
            continue
        for variant in [v for v in VARIANTS if v in by_variant]:
            seeds = by_variant[variant]
            names = sorted({k for r in seeds.values() for k in _metrics(r)})
            row: dict[str, Any] = {"match": match, "variant": variant, "label": VARIANTS[variant].label,
                                   "seeds": sorted(seeds), "n": len(seeds)}
            first = next(iter(seeds.values()))
            row.update(params=first["params"], flops_per_token=first["spec"]["flops_per_token"],
                       tokens=first["tokens"], tokens_per_s=mean_sd([r["tokens_per_s"] for r in seeds.values()])[0])
            row["metrics"] = {k: mean_sd([_metrics(r).get(k) for r in seeds.values()]) for k in names}
            for ref in (FULL.name, BASE.name):
                if ref in by_variant and ref != variant:
                    common = sorted(set(seeds) & set(by_variant[ref]))
                    diffs = [seeds[s]["val_loss"] - by_variant[ref][s]["val_loss"] for s in common]
                    row[f"delta_vs_{ref}"] = mean_sd(diffs)
            rows.append(row)
    return rows


def _pm(value: tuple[float | None, float | None] | None, digits: int = 4, signed: bool = False) -> str:
    if value is None or value[0] is None:
        return "—"
    mean, sd = value
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _setting(value: Any) -> str:
    """A model override as `--set` takes it."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def markdown(rows: list[dict[str, Any]], cfg: StudyConfig) -> str:
    """Table 4's shape, one table per comparison."""
    # one column per eval metric, leaving out those that repeat another (perplexity ~ bpb, math_equal ~ exact match)
    extra = sorted({k for r in rows for k in r["metrics"] if k != "val_loss" and not k.endswith(
        (" perplexity", " math_equal"))})
    lines = [f"Preset `{cfg.preset}`, {cfg.tokens:,} tokens (equal-token budget), batch {cfg.batch_size} × "
             f"{cfg.seq_len}, lr {cfg.lr}, seeds {', '.join(map(str, cfg.seeds))}; mean ± sd over seeds, Δ paired "
             "by seed (negative: better than the reference)."]
    # a study's settings must be readable from its report
    settings = [f"{k}={_setting(v)}" for k, v in cfg.model_overrides.items()]
    if cfg.dense_lr_mult != 1.0:
        settings.append(f"dense_lr_mult={cfg.dense_lr_mult}")
    if settings:
        lines += ["", f"Every variant with `{' '.join(settings)}` (before its own switch)."]
    for match in ("tokens", "flops"):
        part = [r for r in rows if r["match"] == match]
        if not part:
            continue
        lines += ["", f"**{MATCH_TITLES[match]}**", "",
                  "| variant | seeds | params | train MFLOPs/token | tokens | tokens/s | val loss | Δ vs full | "
                  "Δ vs Llama | " + " | ".join(extra) + " |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra)]
        for r in part:
            tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "—"
            lines.append(f"| {r['label']} | {r['n']} | {r['params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:,.1f} | "
                         f"{r['tokens']:,} | {tps} | {_pm(r['metrics']['val_loss'])} | "
                         f"{_pm(r.get('delta_vs_full'), signed=True)} | "
                         f"{_pm(r.get(f'delta_vs_{BASE.name}'), signed=True)} | "
                         + " | ".join(_pm(r["metrics"].get(k)) for k in extra) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Validation-loss curves with seed bands (vs tokens; vs training FLOPs) and bars of the final losses."""
    from ..train.plots import _pyplot

    plt = _pyplot()
    colors = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    matches = [m for m in MATCH_TITLES if any(r["match"] == m for r in rows)] or ["tokens"]  # the study's own
    fig, axes = plt.subplots(1, len(matches), figsize=(6.5 * len(matches), 4.8), squeeze=False)
    for ax, match in zip(axes[0], matches, strict=True):
        for variant in VARIANTS:
            group = [r for r in runs if r["spec"]["variant"] == variant and (
                r["spec"]["match"] == match or (variant == "full" and r["spec"]["match"] == "tokens"))]
            if not group:
                continue
            steps = sorted(set.intersection(*[{t for t, _ in r["curve"]} for r in group]))
            if not steps:
                continue
            per_seed = [dict(r["curve"]) for r in group]
            mean = [statistics.fmean(c[t] for c in per_seed) for t in steps]
            sd = [statistics.stdev([c[t] for c in per_seed]) if len(per_seed) > 1 else 0.0 for t in steps]
            scale = group[0]["spec"]["flops_per_token"] / 1e15 if match == "flops" else 1e-6
            x = [t * scale for t in steps]
            ax.plot(x, mean, "-", color=colors[variant], label=f"{VARIANTS[variant].label} (n={len(group)})")
            ax.fill_between(x, [m - s for m, s in zip(mean, sd, strict=True)],
                            [m + s for m, s in zip(mean, sd, strict=True)], color=colors[variant], alpha=0.2)
        ax.set_xlabel("tokens (millions)" if match == "tokens" else "training PFLOPs")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(MATCH_TITLES[match])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
            lows = [min(line.get_ydata()) for line in ax.lines]
            ax.set_ylim(min(lows) - 0.2, min(lows) + 2.5)
    fig.tight_layout()
    curves = out / "ablation_curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(matches), figsize=(6.5 * len(matches), 4.5), squeeze=False)
    for ax, match in zip(axes[0], matches, strict=True):
        part = [r for r in rows if r["match"] == match]
        means = [r["metrics"]["val_loss"][0] for r in part]
        errs = [r["metrics"]["val_loss"][1] or 0.0 for r in part]
        ax.bar(range(len(part)), means, yerr=errs, capsize=4, color=[colors[r["variant"]] for r in part])
        ax.set_xticks(range(len(part)), [r["label"] for r in part], rotation=20, fontsize=8)
        if means:
            lo = min(m - e for m, e in zip(means, errs, strict=True))
            hi = max(m + e for m, e in zip(means, errs, strict=True))
            ax.set_ylim(lo - 0.15 * (hi - lo + 0.05), hi + 0.15 * (hi - lo + 0.05))
            for i, v in enumerate(means):
                ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("final validation loss (mean ± sd over seeds)")
        ax.set_title(MATCH_TITLES[match])
    fig.tight_layout()
    bars = out / "ablation_bars.png"
    fig.savefig(bars, dpi=120)
    plt.close(fig)
    gap = _plot_gap(plt, runs, colors, out)
    return [curves, bars] + ([gap] if gap else [])


def _plot_gap(plt, runs: list[dict[str, Any]], colors: dict[str, str], out: Path) -> Path | None:
    """Each variant's validation loss minus Llama's (paired by seed, equal tokens) against tokens: where the
    ranking changes with training length."""
    tokens_runs = [r for r in runs if r["spec"]["match"] == "tokens"]
    llama = {r["spec"]["seed"]: dict(r["curve"]) for r in tokens_runs if r["spec"]["variant"] == BASE.name}
    if not llama:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for variant in [v for v in VARIANTS if v != BASE.name]:
        pairs = [(dict(r["curve"]), llama[r["spec"]["seed"]]) for r in tokens_runs
                 if r["spec"]["variant"] == variant and r["spec"]["seed"] in llama]
        if not pairs:
            continue
        steps = sorted(set.intersection(*[set(c) & set(ref) for c, ref in pairs]))
        diffs = [[c[t] - ref[t] for c, ref in pairs] for t in steps]
        mean = [statistics.fmean(d) for d in diffs]
        sd = [statistics.stdev(d) if len(d) > 1 else 0.0 for d in diffs]
        x = [t / 1e6 for t in steps]
        ax.plot(x, mean, "-", color=colors[variant], label=f"{VARIANTS[variant].label} (n={len(pairs)})")
        ax.fill_between(x, [m - e for m, e in zip(mean, sd, strict=True)],
                        [m + e for m, e in zip(mean, sd, strict=True)], color=colors[variant], alpha=0.2)
    ax.axhline(0.0, color=colors[BASE.name], lw=1, label=BASE.label)
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("validation loss − Llama's (nats/token)")
    ax.set_title("the gap to Llama along training (equal tokens; below 0: better than Llama)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "ablation_gap.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(cfg: StudyConfig) -> dict[str, Any]:
    """Aggregate the runs done so far into ``ablation.json``, ``ablation.md`` and the plots; returns the paths."""
    out = Path(cfg.out)
    specs = plan(cfg)
    runs = collect(cfg, specs)
    rows = aggregate(runs)
    (out / "ablation.json").write_text(json.dumps({"rows": rows, "runs": [
        {k: v for k, v in r.items() if k != "curve"} for r in runs], "planned": len(specs)}, indent=2))
    (out / "ablation.md").write_text(markdown(rows, cfg))
    files = {"json": str(out / "ablation.json"), "markdown": str(out / "ablation.md"), "done": len(runs)}
    if runs:
        files["plots"] = [str(p) for p in plot(runs, rows, out)]
    return files
