"""The curation report: documents and tokens in and out of every stage, examples of what each filter removed,
duplicate-cluster sizes, the final mixture against the requested one, and a plot of the removals per stage."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .pipeline import FILTERS
from .steps import iter_jsonl_docs

EXAMPLES = 3  # removed documents shown per filter
EXAMPLE_CHARS = 160
REPORT_JSON = "curation_report.json"
REPORT_MD = "curation_report.md"
REPORT_PLOT = "curation_removals.png"


def removals(work: Path, count_tokens: Callable[[list[str]], list[int]]) -> dict[str, dict[str, Any]]:
    """Per filter (pipeline order): documents and tokens removed, by reason, with a few examples."""
    out: dict[str, dict[str, Any]] = {}
    for name in FILTERS:
        records = list(iter_jsonl_docs(work / "removed" / name))
        reasons = Counter(r.get("metadata", {}).get("filter_reason") or name for r in records)
        examples = [{"reason": r.get("metadata", {}).get("filter_reason") or name,
                     "source": r.get("metadata", {}).get("source", ""),
                     "text": r.get("text", "")[:EXAMPLE_CHARS]} for r in records[:EXAMPLES]]
        out[name] = {"documents": len(records), "tokens": sum(count_tokens([r.get("text", "") for r in records])),
                     "reasons": dict(reasons.most_common()), "examples": examples}
    return out


def stage_table(removed: dict[str, dict[str, Any]], kept_docs: int, kept_tokens: int) -> list[dict[str, Any]]:
    """Documents and tokens into and out of every filter, from what each removed and what was kept at the end."""
    rows = []
    docs_out, tokens_out = kept_docs, kept_tokens
    for name in reversed(FILTERS):
        docs_in, tokens_in = docs_out + removed[name]["documents"], tokens_out + removed[name]["tokens"]
        rows.append({"stage": name, "documents_in": docs_in, "documents_out": docs_out, "tokens_in": tokens_in,
                     "tokens_out": tokens_out})
        docs_out, tokens_out = docs_in, tokens_in
    return rows[::-1]


def cluster_sizes(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """How many duplicate clusters (a kept document and the copies removed for it) have each size, from the cluster
    ids and sizes datatrove puts on ``records`` (kept and removed documents). The removed copies always carry them;
    the kept one not when its task removed nothing (datatrove's filter then skips the metadata)."""
    clusters: dict[int, int] = {}
    for r in records:
        meta = r.get("metadata", {})
        cluster, size = int(meta.get("minhash_cluster_id", -1)), int(meta.get("minhash_cluster_size", 1))
        if cluster >= 0 and size > 1:
            clusters[cluster] = size
    return {str(k): v for k, v in sorted(Counter(clusters.values()).items())}


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``report`` as curation_report.json, a Markdown summary and the removals plot, into ``out``."""
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / REPORT_MD).write_text(format_report(report) + "\n", encoding="utf-8")
    plot_removals(report["stages"], out / REPORT_PLOT)


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    lines = ["# Curation report", "", "| stage | documents in | documents out | tokens in | tokens out |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['documents_in']:,} | {r['documents_out']:,} | {r['tokens_in']:,} | "
              f"{r['tokens_out']:,} |" for r in report["stages"]]
    lines += ["", "## Removed, with examples", ""]
    for name, info in report["removed"].items():
        if info["documents"]:
            reasons = ", ".join(f"{k} {v:,}" for k, v in info["reasons"].items())
            lines.append(f"- **{name}**: {info['documents']:,} documents ({reasons})")
            lines += [f"  - `{e['reason']}` {e['source']}: {e['text'][:100]!r}" for e in info["examples"]]
    lines += ["", "## Duplicate clusters (size: count)", "",
              ", ".join(f"{k}: {v:,}" for k, v in report["cluster_sizes"].items()) or "none"]
    lines += ["", "## Mixture (tokens)", "", "| domain | available | requested | final | final share |",
              "|---|---:|---:|---:|---:|"]
    for domain, m in report["mixture"].items():
        requested = "-" if m["requested"] is None else f"{m['requested']:.3f}"
        lines.append(f"| {domain} | {m['available_tokens']:,} | {requested} | {m['final_tokens']:,} | "
                     f"{m['final_share']:.4f} |")
    languages = ", ".join(f"{k} {v:,}" for k, v in report["languages"].items())
    lines += ["", f"Languages of the kept documents: {languages}"]
    return "\n".join(lines)


def plot_removals(stages: list[dict[str, Any]], path: Path) -> None:
    """A bar chart of the documents and tokens each stage removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["stage"] for s in stages]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, unit in zip(axes, ("documents", "tokens"), strict=True):
        ax.barh(names, [s[f"{unit}_in"] - s[f"{unit}_out"] for s in stages], color="tab:red")
        ax.invert_yaxis()
        ax.set_xlabel(f"{unit} removed")
    axes[1].set_yticklabels([])
    fig.suptitle("kunlun curate: removals per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
