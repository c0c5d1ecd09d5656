"""``kunlun posttrain {tasks,sft,rs,dpo,rm,demo}`` and ``kunlun reward`` (parsers and commands; the work is in the
modules of :mod:`kunlunbaize.posttrain`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _fail(command: str, e: BaseException) -> SystemExit:
    return SystemExit(f"kunlun {command}: {e}")


def _need_trl(command: str) -> None:
    """A one-line error saying what to install when the post-training libraries are missing."""
    import importlib.util

    missing = [m for m in ("trl", "datasets", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"kunlun {command}: needs {', '.join(missing)} — pip install 'kunlunbaize[posttrain]'")


def _errors() -> tuple[type[BaseException], ...]:
    from ..checkpoint import CheckpointError
    from ..data.format import DataError
    from ..eval.convert import TaskFileError

    return (ValueError, CheckpointError, DataError, TaskFileError, OSError)


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _report(value: Any) -> None:
    """Print the result as JSON, once (rank 0 under torchrun)."""
    import os

    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(value, indent=2))


def _device(args: argparse.Namespace, command: str) -> str:
    from ..cli import resolve_device

    return resolve_device(args.device, command)


def _tasks_records(spec: str, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """``KIND[:N]`` (math, code, mix) as generated task records."""
    from .tasks import generate_tasks

    kind, _, n = spec.partition(":")
    try:
        count = int(n) if n else None
    except ValueError:
        raise ValueError(f"--tasks {spec!r}: N must be an integer (KIND[:N], e.g. math:500)") from None
    return generate_tasks(kind, split, count, seed)


def _reward(args: argparse.Namespace, device: str):
    from .rewards import MODEL_REWARD, Combined, parse_spec

    model_reward = None
    names = [n for n, _ in parse_spec(args.rewards)]
    if args.reward_model:
        if MODEL_REWARD not in names:
            raise ValueError(f"--reward-model is given but --rewards does not name it: add {MODEL_REWARD}=WEIGHT")
        from .reward_model import ModelReward

        model_reward = ModelReward(args.reward_model, device=device)
    return Combined.from_spec(args.rewards, model_reward, max_chars=args.max_chars, timeout=args.timeout)


# ------------------------------------------------------------------------------------------------------ commands
def cmd_tasks(args: argparse.Namespace) -> None:
    from .data import write_jsonl
    from .tasks import reference_reply

    try:
        records = _tasks_records(f"{args.kind}:{args.n}" if args.n is not None else args.kind, args.split, args.seed)
        if args.format == "sft":
            records = [{"messages": [{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": reference_reply(r)}]} for r in records]
        count = write_jsonl(args.out, records)
    except _errors() as e:
        raise _fail("posttrain tasks", e) from None
    _log(f"wrote {count} {args.kind} {args.split} tasks ({args.format} schema) to {args.out}")


def _sft_settings(args: argparse.Namespace, device: str):
    from .sft import SFTSettings

    return SFTSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       eval_fraction=args.eval_fraction, mtp=not args.no_mtp, seed=args.seed, device=device)


def cmd_sft(args: argparse.Namespace) -> None:
    from .data import read, sft_records, write_jsonl
    from .models import model_folder
    from .sft import run_sft
    from .tasks import reference_reply

    _need_trl("posttrain sft")
    device = _device(args, "posttrain sft")
    out = Path(args.out)
    try:
        if args.data:
            examples = sft_records(read(args.data), args.data)
        else:
            examples = [{"messages": [{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": reference_reply(r)}]}
                        for r in _tasks_records(args.tasks, seed=args.seed)]
            write_jsonl(out / "sft.jsonl", examples)
        folder = model_folder(args.model, out, _log)
        metrics = run_sft(folder, examples, out, _sft_settings(args, device), _log)
    except _errors() as e:
        raise _fail("posttrain sft", e) from None
    _report(metrics)


def cmd_rs(args: argparse.Namespace) -> None:
    from ..infer.sampling import SamplingParams
    from .data import prompt_records, read
    from .rs import RSSettings, run_rs

    _need_trl("posttrain rs")
    device = _device(args, "posttrain rs")
    try:
        SamplingParams(temperature=args.temperature, top_p=args.top_p)  # validates
        source = args.prompts or f"generated {args.tasks} tasks"
        records = read(args.prompts) if args.prompts else _tasks_records(args.tasks, seed=args.seed)
        prompts = prompt_records(records, source)
        settings = RSSettings(n=args.n, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, min_reward=args.min_reward,
                              threshold=args.threshold, rounds=args.rounds, batch_size=args.gen_batch_size,
                              seed=args.seed, sft=_sft_settings(args, device))
        history = run_rs(args.model, prompts, _reward(args, device), Path(args.out), settings, _log,
                         progress=not args.no_progress)
    except _errors() as e:
        raise _fail("posttrain rs", e) from None
    _report([{k: v for k, v in stats.items() if k != "settings"} for stats in history])


def cmd_dpo(args: argparse.Namespace) -> None:
    from .data import preference_records, read, write_jsonl
    from .dpo import DPOSettings, run_dpo
    from .models import model_folder
    from .rs import preference_pairs
    from .sample import rank_and_world

    _need_trl("posttrain dpo")
    device = _device(args, "posttrain dpo")
    out = Path(args.out)
    try:
        settings = DPOSettings(beta=args.beta, lr=args.lr, batch_size=args.batch_size,
                               per_device_batch_size=args.per_device_batch_size, epochs=args.epochs,
                               eval_fraction=args.eval_fraction, eval_steps=args.eval_steps, patience=args.patience,
                               metric=args.metric, reference=args.reference, seed=args.seed, device=device)
        settings.validate()
        settings.accumulation(rank_and_world()[1])
        if args.pairs:
            pairs = preference_records(read(args.pairs), args.pairs)
        else:
            found = preference_pairs(read(args.from_samples), min_gap=args.min_gap)
            if not found:
                raise ValueError(f"{args.from_samples}: no prompt has two replies with different rewards — nothing "
                                 "to prefer; sample more replies per prompt (kunlun posttrain rs --n)")
            pairs = preference_records(found, f"pairs from {args.from_samples}")
            write_jsonl(out / "pairs.jsonl", pairs)
        metrics = run_dpo(model_folder(args.model, out, _log), pairs, out, settings, _log)
    except _errors() as e:
        raise _fail("posttrain dpo", e) from None
    _report(metrics)


def cmd_rm(args: argparse.Namespace) -> None:
    from .data import preference_records, read
    from .models import model_folder
    from .reward_model import RMSettings, run_reward_model

    _need_trl("posttrain rm")
    device = _device(args, "posttrain rm")
    out = Path(args.out)
    try:
        pairs = preference_records(read(args.pairs), args.pairs)
        settings = RMSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                              eval_fraction=args.eval_fraction, seed=args.seed, device=device)
        metrics = run_reward_model(model_folder(args.model, out, _log), pairs, out, settings, _log)
    except _errors() as e:
        raise _fail("posttrain rm", e) from None
    _report(metrics)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoSettings, markdown, run_demo

    _need_trl("posttrain demo")
    device = _device(args, "posttrain demo")
    settings = DemoSettings(checkpoint=args.checkpoint, out=args.out, tasks=args.tasks,
                            sft_examples=args.sft_examples, rs_prompts=args.rs_prompts, rs_n=args.n,
                            eval_math=args.eval_math, eval_code=args.eval_code, seed=args.seed, device=device)
    try:
        rows = run_demo(settings, _log)
    except _errors() as e:
        raise _fail("posttrain demo", e) from None
    print(markdown(rows))


def cmd_reward(args: argparse.Namespace) -> None:
    from .data import prompt_records, read, write_jsonl
    from .rewards import completion_text

    device = _device(args, "reward")
    try:
        records = prompt_records(read(args.input), args.input)
        for i, r in enumerate(records):
            if "completion" not in r or r["completion"] is None:
                raise ValueError(f"{args.input}, record {i + 1}: missing 'completion' — kunlun reward scores "
                                 '{"prompt": …, "completion": …} records')
            completion_text(r["completion"])  # a string or chat turns
        reward = _reward(args, device)
        columns = sorted({k for r in records for k in r if k not in ("prompt", "completion")})
        table = reward.score([r["prompt"] for r in records], [r["completion"] for r in records],
                             **{k: [r.get(k) for r in records] for k in columns})
        scored = [{**r, **{name: values[i] for name, values in table.items()}} for i, r in enumerate(records)]
        out = args.out or str(Path(args.input).with_suffix("")) + ".scored.jsonl"
        write_jsonl(out, scored)
    except _errors() as e:
        raise _fail("reward", e) from None
    print(f"{'reward':<16} {'mean':>8} {'n':>6}")
    for name, values in table.items():
        applied = [v for v in values if v is not None]
        mean = sum(applied) / len(applied) if applied else float("nan")
        print(f"{name:<16} {mean:>8.4f} {len(applied):>6}")
    _log(f"scored records: {out}")


# ------------------------------------------------------------------------------------------------------- parsers
def _reward_args(p: argparse.ArgumentParser, default: str | None) -> None:
    from ..cli import float_in

    p.add_argument("--rewards", default=default, required=default is None, metavar="NAME[=W],…",
                   help="rule-based rewards and weights: math, code, answer_tag, no_repetition, length, and rm "
                        "(the --reward-model)" + (f" (default: {default})" if default else ""))
    p.add_argument("--reward-model", metavar="PATH", help="a reward model trained with `kunlun posttrain rm`")
    p.add_argument("--max-chars", type=int, default=None, help="the length reward's limit (default 512)")
    p.add_argument("--timeout", type=float_in(0, low_open=True), default=None,
                   help="seconds per sandboxed code run (default 10)")


def _common(p: argparse.ArgumentParser, out: str) -> None:
    from ..cli import SEED

    p.add_argument("--model", default="runs/small", help="run folder, checkpoint folder or transformers folder "
                                                         "(default: runs/small, the main job's)")
    p.add_argument("--out", default=out, help=f"output folder (default: {out})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=SEED, default=0)


def _sft_args(p: argparse.ArgumentParser, epochs: float, lr: float) -> None:
    from ..cli import float_in, int_at_least

    p.add_argument("--epochs", type=float_in(0, low_open=True), default=epochs)
    p.add_argument("--lr", type=float_in(0, low_open=True), default=lr)
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="per device")
    p.add_argument("--grad-accum", type=int_at_least(1), default=1)
    p.add_argument("--eval-fraction", type=float_in(0, 0.5), default=0.0,
                   help="hold out this share of the examples and report their loss")
    p.add_argument("--no-mtp", action="store_true", help="train the trunk only (TRL's loss); by default the MTP "
                                                         "depths are trained too (eq. 22)")


def add_posttrain_parser(sub) -> None:
    from ..cli import float_in, int_at_least

    pt = sub.add_parser("posttrain", help="post-training (§4): SFT, rejection sampling, DPO, reward models, "
                                          "generated verifiable tasks, an end-to-end demo")
    ps = pt.add_subparsers(dest="stage", metavar="STAGE", required=True)

    t = ps.add_parser("tasks", help="write generated verifiable tasks (math, code) as JSONL")
    t.add_argument("--kind", default="mix", choices=["math", "code", "mix"])
    t.add_argument("--split", default="train", choices=["train", "test"])
    t.add_argument("--n", type=int_at_least(0), default=None)
    t.add_argument("--format", default="prompts", choices=["prompts", "sft"],
                   help="prompts (with answer/test columns for the rewards) or sft (with reference replies)")
    t.add_argument("--seed", type=int_at_least(0), default=0)
    t.add_argument("--out", required=True, help="JSONL file to write")
    t.set_defaults(func=cmd_tasks)

    s = ps.add_parser("sft", help="supervised fine-tuning on chat data (loss on assistant tokens only)")
    _common(s, "runs/sft")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--data", help="SFT JSONL: {messages: [...]} or {prompt, completion}")
    src.add_argument("--tasks", default="mix:1000", help="generated tasks KIND[:N] when no --data (default mix:1000)")
    _sft_args(s, 3.0, 1e-4)
    s.set_defaults(func=cmd_sft)

    r = ps.add_parser("rs", help="rejection-sampling SFT: sample, score, keep the best, fine-tune (rounds)")
    _common(r, "runs/rs")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="prompts JSONL: {prompt, answer?/test?, …}")
    src.add_argument("--tasks", default="mix:200", help="generated tasks KIND[:N] when no --prompts")
    _reward_args(r, "math,code")
    r.add_argument("--n", type=int_at_least(1), default=8, help="samples per prompt")
    r.add_argument("--temperature", type=float_in(0), default=0.8)
    r.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=0.95)
    r.add_argument("--max-new-tokens", type=int_at_least(1), default=128)
    r.add_argument("--min-reward", type=float, default=0.0, help="keep a prompt's best reply when above this")
    r.add_argument("--threshold", type=float, default=None, help="also keep every reply with at least this reward")
    r.add_argument("--rounds", type=int_at_least(1), default=1, help="each round samples from the newest model")
    r.add_argument("--gen-batch-size", type=int_at_least(1), default=32)
    r.add_argument("--no-progress", action="store_true")
    _sft_args(r, 2.0, 1e-4)
    r.set_defaults(func=cmd_rs)

    d = ps.add_parser("dpo", help="DPO with the paper's settings (lr 1e-5, batch 256) and early stopping")
    _common(d, "runs/dpo")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="preference JSONL: {prompt, chosen, rejected}")
    src.add_argument("--from-samples", metavar="SAMPLES", help="samples.jsonl of `kunlun posttrain rs`: best vs "
                                                               "worst reply per prompt")
    d.add_argument("--min-gap", type=float, default=0.0, help="with --from-samples: least reward gap of a pair")
    d.add_argument("--beta", type=float_in(0, low_open=True), default=0.1)
    d.add_argument("--lr", type=float_in(0, low_open=True), default=1e-5)
    d.add_argument("--batch-size", type=int_at_least(1), default=256,
                   help="global batch: per-device batch x accumulation x ranks (default 256, the paper's)")
    d.add_argument("--per-device-batch-size", type=int_at_least(1), default=8)
    d.add_argument("--epochs", type=float_in(0, low_open=True), default=1.0)
    d.add_argument("--eval-fraction", type=float_in(0, 0.5, low_open=True), default=0.1)
    d.add_argument("--eval-steps", type=int_at_least(1), default=10)
    d.add_argument("--patience", type=int_at_least(1), default=3, help="evaluations without improvement before "
                                                                       "stopping")
    d.add_argument("--metric", default="rewards/accuracies", choices=["rewards/accuracies", "rewards/margins", "loss"])
    d.add_argument("--reference", default="model", choices=["model", "precompute"],
                   help="a frozen copy of the starting model, or its log-probs computed once before training")
    d.set_defaults(func=cmd_dpo)

    m = ps.add_parser("rm", help="train the learned reward model on preference pairs (Bradley-Terry)")
    _common(m, "runs/rm")
    m.add_argument("--pairs", required=True, help="preference JSONL: {prompt, chosen, rejected}")
    m.add_argument("--epochs", type=float_in(0, low_open=True), default=3.0)
    m.add_argument("--lr", type=float_in(0, low_open=True), default=1e-4)
    m.add_argument("--batch-size", type=int_at_least(1), default=16)
    m.add_argument("--eval-fraction", type=float_in(0, 0.5, low_open=True), default=0.1)
    m.set_defaults(func=cmd_rm)

    de = ps.add_parser("demo", help="base -> SFT -> rejection-sampling SFT -> DPO on generated tasks, scored on "
                                    "held-out problems after each stage (minutes on 2 CPU cores)")
    de.add_argument("--checkpoint", default="runs/small", help="the pre-trained model (default: the main job's)")
    de.add_argument("--out", default="runs/posttrain-demo")
    de.add_argument("--tasks", default="mix", choices=["math", "code", "mix"])
    de.add_argument("--sft-examples", type=int_at_least(1), default=1600)
    de.add_argument("--rs-prompts", type=int_at_least(1), default=96)
    de.add_argument("--n", type=int_at_least(2), default=4, help="samples per prompt in rejection sampling")
    de.add_argument("--eval-math", type=int_at_least(1), default=200)
    de.add_argument("--eval-code", type=int_at_least(0), default=50)
    de.add_argument("--device", default="auto")
    de.add_argument("--seed", type=int_at_least(0), default=0)
    de.set_defaults(func=cmd_demo)


def add_reward_parser(sub) -> None:
    rw = sub.add_parser("reward", help="score {prompt, completion} JSONL with rule-based rewards and/or a reward "
                                       "model")
    rw.add_argument("input", help="JSONL of {prompt, completion, answer?, test?, …}")
    _reward_args(rw, None)
    rw.add_argument("--out", help="scored JSONL (default: INPUT.scored.jsonl)")
    rw.add_argument("--device", default="auto")
    rw.set_defaults(func=cmd_reward)
