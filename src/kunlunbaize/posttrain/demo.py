"""``kunlun posttrain demo``: the whole of §4 on a small pre-trained checkpoint, in minutes on 2 CPU cores.

base (the chat format added) → SFT on generated verifiable tasks → one round of rejection-sampling SFT → DPO on
best-vs-worst pairs from the sampled replies (for a prompt whose replies all scored alike, the task's reference
reply against the worst sampled one). After each stage the model is scored on the held-out split: arith
exact match through ``kunlun eval`` (the same problems, prompts and check as ``kunlun eval --task arith`` with the
chat template), the pass rate of greedy code replies on held-out code tasks in the sandbox, and the MTP depths'
greedy draft acceptance (how much self-speculative decoding still gets out of them).

Every stage's model, data and scores stay under ``OUT``; a stage whose model exists is not run again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..infer.sampling import GREEDY
from .data import preference_records, prompt_records, write_jsonl
from .dpo import DPOSettings, run_dpo
from .models import Log, is_hf_folder, load_policy, model_folder, save_model
from .rewards import Combined, code_reward
from .rs import NothingKept, RSSettings, preference_pairs, run_rs
from .sample import Sampler
from .sft import SFTSettings, run_sft
from .tasks import code_problems, generate_tasks, math_problems, reference_reply

MIN_PAIRS = 5  # fewer preference pairs than this: DPO has nothing to hold out and learn from


@dataclass
class DemoSettings:
    checkpoint: str = "runs/small"
    out: str = "runs/posttrain-demo"
    tasks: str = "mix"  # the generated tasks to train on: mix (half math, half code), math or code
    sft_examples: int = 1600  # generated train tasks with reference replies
    sft_epochs: float = 3.0
    sft_lr: float = 1e-3
    rs_prompts: int = 96  # further train tasks (not in the SFT set) to sample for
    rs_n: int = 4
    dpo_epochs: float = 3.0
    eval_math: int = 200  # held-out arith problems (the kunlun eval task's test split)
    eval_code: int = 50  # held-out code problems (0: none)
    max_new_tokens: int = 96
    seed: int = 0
    device: str = "cpu"


def heldout_scores(folder: Path, settings: DemoSettings, out: Path, log: Log) -> dict[str, Any]:
    """arith exact match (kunlun eval), greedy code pass rate and greedy MTP acceptance of the model in ``folder``."""
    from ..eval.evaluate import evaluate
    from ..eval.tasks import make_task
    from ..infer.speculative import speculative_generate

    summary = evaluate(folder, [make_task("arith", max_new_tokens=16)], out=out / "eval", limit=settings.eval_math,
                       chat="on", progress=False, device=settings.device, log=lambda _: None)
    arith = next(r for r in summary["rows"] if r["metric"] == "exact_match")
    sampler = Sampler(folder, device=settings.device)
    passed: list[float | None] = []
    if settings.eval_code:
        codes = prompt_records(code_problems("test", settings.eval_code))
        replies = sampler.sample([c["prompt"] for c in codes], 1, GREEDY, settings.max_new_tokens, batch_size=25)
        passed = code_reward(None, [r.text for r in replies], test=[c["test"] for c in codes])
        write_jsonl(out / "code_samples.jsonl", [{"id": c["id"], "completion": r.text, "passed": p}
                                                  for c, r, p in zip(codes, replies, passed, strict=True)])
    forwards = tokens = 0
    # greedy self-speculative decoding on held-out prompts (code: replies long enough to draft for)
    probes = code_problems("test", 10) if settings.eval_code else math_problems("test", 10)
    for text in [r["prompt"] for r in probes]:
        stats = speculative_generate(sampler.model, sampler.encode_prompt([{"role": "user", "content": text}]), 32,
                                     eos_id=sampler.eos_id, should_stop=sampler.ends_turn).stats
        forwards += stats["trunk_forwards"] + 1  # + the prefill, which yields the first token
        tokens += stats["tokens"]
    scores = {"arith_exact_match": arith["value"], "arith_n": arith["n"],
              "code_pass": sum(passed) / len(passed) if passed else None, "code_n": len(passed),
              "tokens_per_trunk_forward": tokens / max(1, forwards)}
    log(f"  held out: arith exact match {scores['arith_exact_match']:.3f} (n={arith['n']})"
        + (f", code pass {scores['code_pass']:.3f} (n={len(passed)})" if passed else "")
        + f", speculative tokens per trunk forward {scores['tokens_per_trunk_forward']:.2f}")
    return scores



def run_demo(settings: DemoSettings, log: Log = print) -> list[dict[str, Any]]:
    """Run (or continue) the demo; returns one row per stage and writes ``OUT/demo.json`` and ``OUT/demo.md``."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    t0 = time.time()

    def stage(name: str, folder: Path, detail: dict[str, Any], seconds: float) -> None:
        saved = out / "scores" / name / "stage.json"
        if saved.is_file():  # scored in an earlier run of the demo
            rows.append(json.loads(saved.read_text(encoding="utf-8")))
        else:
            log(f"[{name}] scoring {folder}")
            rows.append({"stage": name, "model": str(folder), "seconds": round(seconds, 1), **detail,
                         **heldout_scores(folder, settings, out / "scores" / name, log)})
            saved.write_text(json.dumps(rows[-1], indent=2) + "\n", encoding="utf-8")
        _write(out, rows, settings)

    # 0. the pre-trained model with the chat format
    log(f"[base] {settings.checkpoint} as a chat model")
    chat = out / "base-chat"
    t = time.time()
    if not is_hf_folder(chat):
        base = model_folder(settings.checkpoint, out, log)
        save_model(*load_policy(base, settings.device, log), chat, log)
    stage("base", chat, {}, time.time() - t)

    # 1. SFT on generated tasks with their reference replies
    tasks = generate_tasks(settings.tasks, "train", settings.sft_examples + settings.rs_prompts, seed=settings.seed)
    sft_tasks, rs_tasks = tasks[:settings.sft_examples], tasks[settings.sft_examples:]
    examples = [{"messages": [{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": reference_reply(r)}]} for r in sft_tasks]
    sft_dir = out / "sft"
    t = time.time()
    detail: dict[str, Any] = {"examples": len(examples)}
    if not is_hf_folder(sft_dir / "model"):
        log(f"[sft] {len(examples)} generated tasks, {settings.sft_epochs:g} epochs")
        write_jsonl(sft_dir / "sft.jsonl", examples)
        sft = SFTSettings(epochs=settings.sft_epochs, lr=settings.sft_lr, batch_size=16, seed=settings.seed,
                          device=settings.device)
        detail.update(_short(run_sft(chat, examples, sft_dir, sft, log)))
    stage("sft", sft_dir / "model", detail, time.time() - t)

    # 2. one round of rejection sampling on further train tasks, rewarded by math-verify and the code sandbox
    rs_dir = out / "rs"
    t = time.time()
    prompts = prompt_records(rs_tasks)
    rs = RSSettings(n=settings.rs_n, temperature=1.0, top_p=0.95, max_new_tokens=settings.max_new_tokens,
                    seed=settings.seed, sft=SFTSettings(epochs=2, lr=1e-4, batch_size=16, seed=settings.seed,
                                                         device=settings.device))
    log(f"[rs] {settings.rs_n} samples for each of {len(prompts)} train tasks, rewards math + code")
    try:
        stats = run_rs(sft_dir / "model", prompts, Combined.from_spec("math,code"), rs_dir, rs, log,
                       progress=False)[-1]
        rs_model = rs_dir / "round_1" / "model"
    except NothingKept as e:  # a model too weak to solve any train task: report it, go on from the SFT model
        log(f"[rs] {e}; the next stage starts from the SFT model")
        rows.append({"stage": "rs", "model": None, "note": "no sampled reply was correct: nothing to fine-tune on"})
        _write(out, rows, settings)
        stats, rs_model = None, sft_dir / "model"
    if stats is not None:
        stage("rs", rs_model, {"samples": stats["samples"], "kept": stats["kept"],
                               "sample_reward": stats["mean_reward"]}, time.time() - t)

    # 3. DPO on best-vs-worst pairs of the sampled replies, early stopping on held-out reward accuracy
    dpo_dir = out / "dpo"
    t = time.time()
    samples = [json.loads(line) for line in (rs_dir / "round_1" / "samples.jsonl").read_text().splitlines() if line]
    found = preference_pairs(samples)
    sampled = len(found)
    found += reference_pairs(samples, rs_tasks, {p["index"] for p in found})
    if len(found) < MIN_PAIRS:
        log(f"[dpo] only {len(found)} prompts had a better and a worse reply (need {MIN_PAIRS}): DPO skipped")
        rows.append({"stage": "dpo", "model": None, "note": f"{len(found)} preference pairs: too few to train on"})
        _write(out, rows, settings)
    else:
        pairs = preference_records(found, source="pairs from rejection sampling")
        write_jsonl(dpo_dir / "pairs.jsonl", pairs)
        detail = {"pairs": len(pairs), "pairs_from_samples": sampled}
        if not is_hf_folder(dpo_dir / "model"):
            log(f"[dpo] {len(pairs)} pairs ({sampled} best-vs-worst sampled replies, {len(pairs) - sampled} with the "
                "task's reference reply as chosen), lr 1e-5 (the paper's), early stopping on reward accuracy")
            dpo = DPOSettings(batch_size=16, per_device_batch_size=8, epochs=settings.dpo_epochs, eval_steps=2,
                              patience=3, eval_fraction=0.2, seed=settings.seed, device=settings.device)
            detail.update(_short(run_dpo(rs_model, pairs, dpo_dir, dpo, log)))
        stage("dpo", dpo_dir / "model", detail, time.time() - t)
    log(f"done in {time.time() - t0:.0f}s: {out / 'demo.md'}")
    return rows


def reference_pairs(samples: list[dict[str, Any]], tasks: list[dict[str, Any]], skip: set[int]) -> list[dict]:
    """For prompts without a better and a worse sampled reply (all replies scored alike): the generated task's
    reference reply as chosen against the lowest-scoring sampled reply, when that reply is wrong."""
    worst: dict[int, dict[str, Any]] = {}
    for r in samples:
        if r["index"] in skip or r["reward"] is None or not r["completion"].strip():
            continue
        if r["index"] not in worst or r["reward"] < worst[r["index"]]["reward"]:
            worst[r["index"]] = r
    return [{"index": i, "prompt": r["prompt"], "chosen": reference_reply(tasks[i]), "rejected": r["completion"]}
            for i, r in sorted(worst.items()) if r["reward"] <= 0 and r["completion"] != reference_reply(tasks[i])]


def _short(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("train_loss", "steps", "eval_loss", "rewards/accuracies", "rewards/margins", "best_step", "stopped_early")
    return {k: metrics[k] for k in keep if k in metrics}


def _write(out: Path, rows: list[dict[str, Any]], settings: DemoSettings) -> None:
    (out / "demo.json").write_text(json.dumps({"settings": asdict(settings), "stages": rows}, indent=2) + "\n",
                                   encoding="utf-8")
    (out / "demo.md").write_text(markdown(rows) + "\n", encoding="utf-8")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The stages as a Markdown table."""
    lines = ["| stage | arith exact match (held out) | code pass (held out) | spec. tokens / trunk forward | seconds |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("model") is None:
            lines.append(f"| {r['stage']} | {r['note']} | | | |")
            continue
        code = "–" if r["code_pass"] is None else f"{r['code_pass']:.3f} (n={r['code_n']})"
        lines.append(f"| {r['stage']} | {r['arith_exact_match']:.3f} (n={r['arith_n']}) | {code} "
                     f"| {r['tokens_per_trunk_forward']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)
