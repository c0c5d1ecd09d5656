"""Rejection-sampling fine-tuning (§4): sample N replies per prompt, score them, keep the good ones, fine-tune.

One round: :class:`~kunlunbaize.posttrain.sample.Sampler` draws ``n`` replies per prompt (temperature, top-p) with
the project's batched cached generation; :class:`~kunlunbaize.posttrain.rewards.Combined` scores them; per prompt
the best reply is kept when its reward exceeds ``min_reward``, and with ``threshold`` every reply scoring at least
that is kept too (de-duplicated); the kept replies become an SFT dataset that :func:`~.sft.run_sft` fine-tunes on.
The next round samples from the newly trained model.

Under ``torchrun`` each rank samples and scores every ``world``-th prompt and writes its own file; rank 0 merges
them (a barrier in between) and selects; every rank then fine-tunes on the selection (DDP).

Layout of ``OUT``: ``round_K/samples.jsonl`` (every reply, its reward and each reward component),
``round_K/sft.jsonl`` (what was kept), ``round_K/model/`` (the fine-tuned model), ``round_K/stats.json``. A round
whose ``stats.json`` exists is done; running the command again continues with the next one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..infer.sampling import SamplingParams
from ..progress import Progress
from .data import write_jsonl
from .models import Log, model_folder
from .rewards import Combined
from .sample import Completion, Sampler, init_process_group, rank_and_world, shard
from .sft import SFTSettings, run_sft


class NothingKept(ValueError):
    """No sampled reply was good enough to fine-tune on; the samples are kept for inspection."""


@dataclass
class RSSettings:
    n: int = 8
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 128
    min_reward: float = 0.0  # the best reply of a prompt is kept when its reward is above this
    threshold: float | None = None  # also keep every reply with at least this reward
    rounds: int = 1
    batch_size: int = 32  # rows per generation batch
    seed: int = 0
    sft: SFTSettings = field(default_factory=SFTSettings)


def score(reward: Combined, prompts: list[dict[str, Any]], completions: list[Completion]) -> list[dict[str, Any]]:
    """Every completion with its prompt record's columns scored by ``reward``: one row per completion."""
    columns = {k for p in prompts for k in p if k != "prompt"}
    picked = [prompts[c.index] for c in completions]
    table = reward.score([p["prompt"] for p in picked], [c.text for c in completions],
                         **{k: [p.get(k) for p in picked] for k in sorted(columns)})
    rows = []
    for j, (c, p) in enumerate(zip(completions, picked, strict=True)):
        rows.append({"index": c.index, "sample": c.sample, "id": p.get("id", c.index), "prompt": p["prompt"],
                     "completion": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason,
                     **{name: values[j] for name, values in table.items()}})
    return rows


def select(rows: list[dict[str, Any]], min_reward: float, threshold: float | None) -> list[dict[str, Any]]:
    """The rows to fine-tune on: each prompt's best (reward > ``min_reward``; ties: the first sampled), and with
    ``threshold`` every row with reward ≥ it; one row per distinct (prompt, reply)."""
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r["reward"] is not None:
            by_prompt.setdefault(r["index"], []).append(r)
    kept: list[dict[str, Any]] = []
    seen: set[tuple[int, str]] = set()
    for index in sorted(by_prompt):
        group = sorted(by_prompt[index], key=lambda r: (-r["reward"], r["sample"]))
        chosen = [group[0]] if group[0]["reward"] > min_reward else []
        if threshold is not None:
            chosen += [r for r in group if r["reward"] >= threshold]
        for r in chosen:
            key = (index, " ".join(r["completion"].split()))
            if key not in seen and r["completion"].strip():
                seen.add(key)
                kept.append(r)
    return kept


def preference_pairs(rows: list[dict[str, Any]], min_gap: float = 0.0) -> list[dict[str, Any]]:
    """DPO pairs from scored samples: per prompt the best reply against the worst, when the best scores more than
    ``min_gap`` above the worst and the two texts differ."""
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r["reward"] is not None:
            by_prompt.setdefault(r["index"], []).append(r)
    pairs = []
    for index in sorted(by_prompt):
        group = sorted(by_prompt[index], key=lambda r: (-r["reward"], r["sample"]))
        best, worst = group[0], group[-1]
        if best["reward"] - worst["reward"] > min_gap and best["completion"].strip() != worst["completion"].strip():
            pairs.append({"index": index, "id": best["id"], "prompt": best["prompt"], "chosen": best["completion"],
                          "rejected": worst["completion"], "reward_chosen": best["reward"],
                          "reward_rejected": worst["reward"]})
    return pairs


def summarize(rows: list[dict[str, Any]], kept: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean reward, the share of prompts with a kept reply, and each reward component's mean, of one round."""
    scored = [r["reward"] for r in rows if r["reward"] is not None]
    prompts = {r["index"] for r in rows}
    out: dict[str, Any] = {"samples": len(rows), "prompts": len(prompts), "kept": len(kept),
                           "prompts_kept": len({r["index"] for r in kept}) / max(1, len(prompts)),
                           "mean_reward": sum(scored) / len(scored) if scored else None}
    skip = {"index", "sample", "id", "prompt", "completion", "tokens", "finish_reason", "reward"}
    for name in (k for k in rows[0] if k not in skip) if rows else ():
        values = [r[name] for r in rows if r.get(name) is not None]
        out[f"mean_{name}"] = sum(values) / len(values) if values else None
    return out


def sample_and_score(folder: Path, prompts: list[dict[str, Any]], reward: Combined, settings: RSSettings,
                     round_dir: Path, log: Log = print, progress: bool = True) -> list[dict[str, Any]]:
    """Sample and score this rank's share of ``prompts``; with several ranks, rank 0 returns everyone's rows
    (merged from the per-rank files) and the others an empty list."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    sampler = Sampler(folder, device=settings.sft.device)
    mine = shard(prompts, rank, world)
    sampling = SamplingParams(temperature=settings.temperature, top_p=settings.top_p)
    bar = _bar(len(mine) * settings.n, f"sampling {settings.n} x {len(mine)} prompts", progress and rank == 0)
    completions = sampler.sample([p["prompt"] for p in prompts], settings.n, sampling, settings.max_new_tokens,
                                 seed=settings.seed, batch_size=settings.batch_size, indices=mine,
                                 progress=bar.update)
    bar.close()
    rows = score(reward, prompts, completions)
    if world == 1:
        return rows
    write_jsonl(round_dir / f"samples.rank{rank}.jsonl", rows)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return []
    merged = []
    for r in range(world):
        part = round_dir / f"samples.rank{r}.jsonl"
        merged += [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines() if line]
        part.unlink()
    return sorted(merged, key=lambda r: (r["index"], r["sample"]))


def run_rs(checkpoint: str | Path, prompts: list[dict[str, Any]], reward: Combined, out: Path,
           settings: RSSettings, log: Log = print, progress: bool = True) -> list[dict[str, Any]]:
    """``settings.rounds`` rounds of rejection sampling + SFT from ``checkpoint``; returns each round's stats
    (rounds already done are read back, not run again)."""
    out.mkdir(parents=True, exist_ok=True)
    init_process_group(settings.sft.device)
    folder = model_folder(checkpoint, out, log)
    history = []
    for k in range(1, settings.rounds + 1):
        round_dir = out / f"round_{k}"
        stats_file = round_dir / "stats.json"
        if stats_file.is_file():
            stats = json.loads(stats_file.read_text(encoding="utf-8"))
            log(f"round {k}: already done ({stats_file})")
        else:
            round_dir.mkdir(parents=True, exist_ok=True)
            stats = _round(k, folder, prompts, reward, settings, round_dir, log, progress)
        folder = round_dir / "model"
        history.append(stats)
    return history


def _round(k: int, folder: Path, prompts: list[dict[str, Any]], reward: Combined, settings: RSSettings,
           round_dir: Path, log: Log, progress: bool) -> dict[str, Any]:
    """One round: every rank samples its share; rank 0 merges, scores and selects; every rank fine-tunes (DDP
    under torchrun) on what rank 0 kept; rank 0 writes the files."""
    import torch.distributed as dist

    rank, _ = rank_and_world()
    rows = sample_and_score(folder, prompts, reward, settings, round_dir, log, progress)
    stats: dict[str, Any] = {}
    kept: list[dict[str, Any]] = []
    if rank == 0:
        write_jsonl(round_dir / "samples.jsonl", rows)
        kept = select(rows, settings.min_reward, settings.threshold)
        stats = {"round": k, "sampled_from": str(folder), **summarize(rows, kept), "settings": asdict(settings)}
        log(f"round {k}: mean reward {_fmt(stats['mean_reward'])}, kept {len(kept)} replies for "
            f"{stats['prompts_kept']:.0%} of {stats['prompts']} prompts")
    if dist.is_initialized():
        box = [kept]
        dist.broadcast_object_list(box, src=0)
        kept = box[0]
    if not kept:
        raise NothingKept(f"round {k}: no reply scored above {settings.min_reward} — nothing to fine-tune on. The "
                         f"samples are in {round_dir / 'samples.jsonl'}; lower --min-reward, sample more (--n) or "
                         "start from a better model (kunlun posttrain sft first)")
    examples = [{"messages": r["prompt"] + [{"role": "assistant", "content": r["completion"]}]} for r in kept]
    if rank == 0:
        write_jsonl(round_dir / "sft.jsonl", examples)
    sft = run_sft(folder, examples, round_dir, settings.sft, log)
    if rank == 0:
        stats["sft"] = sft
        (round_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    if dist.is_initialized():
        dist.barrier()
    return stats


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _bar(total: int, desc: str, enabled: bool) -> Progress:
    return Progress(total, desc=desc, unit="reply", enabled=enabled)


__all__ = ["RSSettings", "preference_pairs", "run_rs", "sample_and_score", "score", "select", "summarize"]
