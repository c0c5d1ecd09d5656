"""``kunlun curate``: sources → datatrove curation (format fixes, filters, language, near-duplicates) → domain
mixing in tokens → the tokenize-and-shard step of ``kunlun prepare``, with a report."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..format import DataError
from ..prepare import _check_destination, prepare
from ..sources import discover
from ..tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from .mix import plan_mixture
from .pipeline import ExecutorOptions, build_executors, minhash_config, run_stages
from .report import cluster_sizes, removals, stage_table, write_report
from .slurm import check_queue, record_jobs
from .steps import Source, iter_jsonl_docs

_NAMED = re.compile(r"^([A-Za-z][\w.-]*)=(.+)$")
SETTINGS_FILE = "curate_settings.json"
_DUP = "near_duplicate"  # the removal folder of MinHash's duplicates


def parse_sources(sources: Sequence[str]) -> list[Source]:
    """The input files of ``sources``; ``NAME=PATH`` gives the documents of PATH the domain NAME."""
    out: list[Source] = []
    for raw in sources:
        named = _NAMED.match(str(raw))
        label, path = (named.group(1), named.group(2)) if named and not Path(raw).exists() else (None, str(raw))
        out += [Source(f, label) for f in discover([path])]
    if not out:
        raise DataError(f"no input files found in {', '.join(map(str, sources))}; give files, folders or globs of "
                        f"text, JSONL or Parquet files, or saved Hugging Face datasets")
    return out


def _check_work(work: Path, settings: dict[str, Any], restart: bool) -> None:
    """Start ``work`` afresh (``restart``), or resume it only if it was started with the same ``settings``."""
    marker = work / SETTINGS_FILE
    if restart and work.exists():
        shutil.rmtree(work)
    if marker.is_file():
        before = json.loads(marker.read_text(encoding="utf-8"))
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise DataError(f"work folder {work} holds a curation started with other settings ({', '.join(changed)}"
                            f"); pass --restart to start it over, or choose another --work")
    elif work.exists() and any(work.iterdir()):
        raise DataError(f"work folder {work} exists and is not a kunlun curate work folder (no {SETTINGS_FILE}); "
                        f"choose another --work")
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _domain(record: dict[str, Any]) -> str:
    meta = record.get("metadata", {})
    return meta.get("label") or ("code" if meta.get("kind") == "code" else meta.get("language", "unknown"))


def _texts(folder: Path) -> Iterator[str]:
    return (r["text"] for r in iter_jsonl_docs(folder))


def _tokenizer(folder: Path, tokenizer: str | os.PathLike[str] | None, vocab_size: int, save_to: Path) -> Any:
    """The dataset's tokenizer (``tokenizer``, or a byte-level BPE trained on the documents of ``folder``, read as a
    stream), saved into ``save_to``."""
    if tokenizer is not None:
        tok, eot = load_tokenizer(tokenizer)
    else:
        tok, eot = train_tokenizer(_texts(folder), vocab_size), "<|endoftext|>"
    save_to.mkdir(exist_ok=True)
    save_tokenizer(tok, save_to, eot)
    return tok


def _counter(tok: Any) -> Callable[[list[str]], list[int]]:
    """Tokens per text as ``kunlun prepare`` writes them (the text's tokens plus one end-of-text)."""
    return lambda texts: [len(e.ids) + 1 for e in tok.encode_batch(texts)] if texts else []


def _summary(folder: Path, count: Callable[[list[str]], list[int]],
             batch_size: int = 1000) -> tuple[list[dict[str, Any]], list[int]]:
    """The id and metadata of every document of ``folder`` and its tokens; the texts are read as a stream, a batch
    at a time, never all held in memory."""
    records: list[dict[str, Any]] = []
    tokens: list[int] = []
    batch: list[str] = []
    for r in iter_jsonl_docs(folder):
        records.append({"id": r["id"], "metadata": r.get("metadata", {})})
        batch.append(r["text"])
        if len(batch) == batch_size:
            tokens += count(batch)
            batch.clear()
    return records, tokens + count(batch)


def _write_mixed(folder: Path, plan: dict[int, int], path: Path) -> None:
    """Each document of ``folder`` as many times as ``plan`` says (by position), streamed into ``path``."""
    path.parent.mkdir(exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(_texts(folder)):
            if plan.get(i):
                f.write((json.dumps({"text": text}, ensure_ascii=False) + "\n") * plan[i])


def _mixture(domains: list[str], tokens: list[int], plan: dict[int, int],
             mix: dict[str, float] | None) -> dict[str, dict[str, Any]]:
    available, final = Counter(), Counter()
    for i, (d, n) in enumerate(zip(domains, tokens, strict=True)):
        available[d] += n
        final[d] += n * plan.get(i, 0)
    total = sum(final.values()) or 1
    return {d: {"available_tokens": available[d], "requested": (mix or {}).get(d) if mix else None,
                "final_tokens": final[d], "final_share": final[d] / total} for d in sorted(available)}


def curate(sources: Sequence[str], out: str | os.PathLike[str], *, work: str | os.PathLike[str] | None = None,
           similarity: float = 0.7, languages: list[str] | None = None, mix: dict[str, float] | None = None,
           mix_tokens: int | None = None, tokenizer: str | os.PathLike[str] | None = None, vocab_size: int = 8192,
           executor: ExecutorOptions | None = None, tasks: int | None = None, text_field: str = "text",
           decode_errors: str = "replace", val_fraction: float = 0.005, shard_tokens: int = 100_000_000,
           overwrite: bool = False, restart: bool = False, seed: int = 0, progress: bool = True,
           log: Callable[[str], None] | None = print) -> Path | None:
    """Curate ``sources`` into a prepared token dataset in ``out`` (what ``kunlun train --data`` reads) with its
    report (curation_report.json/.md, curation_removals.png), and return ``out``.

    Intermediate files live in ``work`` (default ``<out>.curate``); a rerun with the same settings resumes there,
    skipping the datatrove tasks already complete. With the Slurm executor the stages are submitted and None is
    returned; rerun the same command once the jobs are done. The sources are only read.
    """
    say = log or (lambda _msg: None)
    executor = executor or ExecutorOptions()
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(f"{out.name}.curate")
    minhash_config(similarity)  # checks the threshold
    _check_destination(out, overwrite)
    resolved = parse_sources(sources)
    tasks = tasks or max(executor.workers, 1)
    settings = {"sources": [str(s) for s in sources], "similarity": similarity, "languages": languages,
                "tasks": tasks, "text_field": text_field, "decode_errors": decode_errors}
    _check_work(work, settings, restart)
    if executor.kind == "slurm" and (busy := check_queue(work)):
        say(busy)
        return None
    started = time.perf_counter()
    executors = build_executors(work, resolved, executor, tasks=tasks, similarity=similarity, text_field=text_field,
                                decode_errors=decode_errors, languages=languages)
    if not run_stages(executors, executor.kind):
        record_jobs(work, executors)
        say(f"curation stages submitted ({executor.kind}); rerun the same command when they are done to mix, "
            f"tokenize and write {out}")
        return None
    curated = time.perf_counter() - started
    deduped = work / "deduped"
    if next(iter_jsonl_docs(deduped), None) is None:
        raise DataError(f"no documents left after curating {len(resolved)} input file(s); see the removed "
                        f"documents under {work / 'removed'}, or relax --languages / --similarity")
    count = _counter(_tokenizer(deduped, tokenizer, vocab_size, work / "tokenizer"))
    kept, tokens = _summary(deduped, count)  # ids and metadata only
    domains = [_domain(r) for r in kept]
    plan = (plan_mixture(domains, tokens, [r["id"] for r in kept], mix, total_tokens=mix_tokens, seed=seed)
            if mix else {i: 1 for i in range(len(kept))})
    _write_mixed(deduped, plan, work / "mixed" / "mixed.jsonl")
    removed = removals(work, count)  # before the dataset is published: a failure here leaves no report-less out
    prepare([work / "mixed"], out, tokenizer=work / "tokenizer", val_fraction=val_fraction,
            shard_tokens=shard_tokens, workers=executor.workers, overwrite=overwrite, dedup=False,
            progress=progress, log=log)
    report = {"settings": {**settings, "mix": mix, "mix_tokens": mix_tokens, "executor": executor.kind,
                           "workers": executor.workers, "minhash": str(minhash_config(similarity))},
              "seconds_curation": round(curated, 2), "stages": stage_table(removed, len(kept), sum(tokens)),
              "removed": removed, "cluster_sizes": cluster_sizes([*kept, *iter_jsonl_docs(work / "removed" / _DUP)]),
              "languages": dict(Counter(r.get("metadata", {}).get("language", "?") for r in kept).most_common()),
              "mixture": _mixture(domains, tokens, plan, mix)}
    write_report(out, report)
    say(f"curation report: {out / 'curation_report.md'}")
    return out
