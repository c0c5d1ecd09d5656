"""``kunlun posttrain {tasks,sft,rs,dpo,rm,demo}`` (the work is in the modules of :mod:`kunlunbaize.posttrain`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .args import SEED, float_in, int_at_least, new_command, resolve_device
from .posttrain_shared import build_reward, check_rewards, errors, fail, log, need_trl, report, reward_args

TASK_KINDS = ("math", "code", "mix")


def tasks_spec(spec: str) -> str:
    """An argparse ``type`` for ``--tasks``: ``KIND[:N]`` with KIND math, code or mix (checked, kept as text)."""
    kind, sep, n = spec.partition(":")
    if kind not in TASK_KINDS:
        raise argparse.ArgumentTypeError(f"{spec!r}: unknown task kind {kind!r}; expected math, code or mix "
                                         "(KIND[:N], e.g. math:500)")
    if sep:
        int_at_least(0)(n)  # N: an integer >= 0
    return spec


def _tasks_records(spec: str, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """``KIND[:N]`` (math, code, mix; checked by :func:`tasks_spec`) as generated task records."""
    from ..posttrain.tasks import generate_tasks

    kind, _, n = spec.partition(":")
    return generate_tasks(kind, split, int(n.replace("_", "")) if n else None, seed)


# ------------------------------------------------------------------------------------------------------ commands
def cmd_tasks(args: argparse.Namespace) -> None:
    from ..posttrain.data import write_jsonl
    from ..posttrain.tasks import reference_reply

    try:
        records = _tasks_records(f"{args.kind}:{args.n}" if args.n is not None else args.kind, args.split, args.seed)
        if args.format == "sft":
            records = [{"messages": [{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": reference_reply(r)}]} for r in records]
        count = write_jsonl(args.out, records)
    except errors() as e:
        raise fail("posttrain tasks", e) from None
    log(f"wrote {count} {args.kind} {args.split} tasks ({args.format} schema) to {args.out}")


def _sft_settings(args: argparse.Namespace, device: str):
    from ..posttrain.sft import SFTSettings

    return SFTSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       eval_fraction=args.eval_fraction, mtp=not args.no_mtp, seed=args.seed, device=device)


def cmd_sft(args: argparse.Namespace) -> None:
    from ..posttrain.data import read, sft_records, write_jsonl
    from ..posttrain.models import model_folder
    from ..posttrain.sft import run_sft
    from ..posttrain.tasks import reference_reply

    need_trl("posttrain sft")
    device = resolve_device(args.device)
    out = Path(args.out)
    try:
        if args.data:
            examples = sft_records(read(args.data), args.data)
        else:
            examples = [{"messages": [{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": reference_reply(r)}]}
                        for r in _tasks_records(args.tasks, seed=args.seed)]
            write_jsonl(out / "sft.jsonl", examples)
        folder = model_folder(args.model, out, log)
        metrics = run_sft(folder, examples, out, _sft_settings(args, device), log)
    except errors() as e:
        raise fail("posttrain sft", e) from None
    report(metrics)


def cmd_rs(args: argparse.Namespace) -> None:
    from ..infer.sampling import SamplingParams
    from ..posttrain.data import prompt_records, read
    from ..posttrain.rs import RSSettings, run_rs

    need_trl("posttrain rs")
    check_rewards(args)
    device = resolve_device(args.device)
    try:
        SamplingParams(temperature=args.temperature, top_p=args.top_p)  # validates
        source = args.prompts or f"generated {args.tasks} tasks"
        records = read(args.prompts) if args.prompts else _tasks_records(args.tasks, seed=args.seed)
        prompts = prompt_records(records, source)
        settings = RSSettings(n=args.n, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, min_reward=args.min_reward,
                              threshold=args.threshold, rounds=args.rounds, batch_size=args.gen_batch_size,
                              seed=args.seed, sft=_sft_settings(args, device))
        history = run_rs(args.model, prompts, build_reward(args, device), Path(args.out), settings, log,
                         progress=not args.no_progress)
    except errors() as e:
        raise fail("posttrain rs", e) from None
    report([{k: v for k, v in stats.items() if k != "settings"} for stats in history])


def cmd_dpo(args: argparse.Namespace) -> None:
    from ..posttrain.data import preference_records, read, write_jsonl
    from ..posttrain.dpo import DPOSettings, run_dpo
    from ..posttrain.models import model_folder
    from ..posttrain.rs import preference_pairs
    from ..posttrain.sample import rank_and_world

    need_trl("posttrain dpo")
    device = resolve_device(args.device)
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
        metrics = run_dpo(model_folder(args.model, out, log), pairs, out, settings, log)
    except errors() as e:
        raise fail("posttrain dpo", e) from None
    report(metrics)


def cmd_rm(args: argparse.Namespace) -> None:
    from ..posttrain.data import preference_records, read
    from ..posttrain.models import model_folder
    from ..posttrain.reward_model import RMSettings, run_reward_model

    need_trl("posttrain rm")
    device = resolve_device(args.device)
    out = Path(args.out)
    try:
        pairs = preference_records(read(args.pairs), args.pairs)
        settings = RMSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                              eval_fraction=args.eval_fraction, seed=args.seed, device=device)
        metrics = run_reward_model(model_folder(args.model, out, log), pairs, out, settings, log)
    except errors() as e:
        raise fail("posttrain rm", e) from None
    report(metrics)


def cmd_demo(args: argparse.Namespace) -> None:
    from ..posttrain.demo import DemoSettings, markdown, run_demo

    need_trl("posttrain demo")
    device = resolve_device(args.device)
    settings = DemoSettings(checkpoint=args.checkpoint, out=args.out, tasks=args.tasks,
                            sft_examples=args.sft_examples, rs_prompts=args.rs_prompts, rs_n=args.n,
                            eval_math=args.eval_math, eval_code=args.eval_code, seed=args.seed, device=device)
    try:
        rows = run_demo(settings, log)
    except errors() as e:
        raise fail("posttrain demo", e) from None
    print(markdown(rows))


# ------------------------------------------------------------------------------------------------------- parsers
def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--model", default="runs/small", help="run folder, checkpoint folder or transformers folder "
                                                         "(default: runs/small, the main job's)")
    p.add_argument("--out", default=out, help=f"output folder (default: {out})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=SEED, default=0)


def _sft_args(p: argparse.ArgumentParser, epochs: float, lr: float) -> None:
    p.add_argument("--epochs", type=float_in(0, low_open=True), default=epochs)
    p.add_argument("--lr", type=float_in(0, low_open=True), default=lr)
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="per device")
    p.add_argument("--grad-accum", type=int_at_least(1), default=1)
    p.add_argument("--eval-fraction", type=float_in(0, 0.5), default=0.0,
                   help="hold out this share of the examples and report their loss")
    p.add_argument("--no-mtp", action="store_true", help="train the trunk only (TRL's loss); by default the MTP "
                                                         "depths are trained too (eq. 22)")


def add_parser(sub: Any) -> None:
    """Add ``posttrain`` and its stages to ``sub`` (from ``ArgumentParser.add_subparsers``)."""
    pt = new_command(sub, "posttrain", help="post-training (§4): SFT, rejection sampling, DPO, reward models, "
                                          "generated verifiable tasks, an end-to-end demo")
    ps = pt.add_subparsers(dest="stage", metavar="STAGE", required=True)
    _add_tasks(ps)
    _add_sft(ps)
    _add_rs(ps)
    _add_dpo(ps)
    _add_rm(ps)
    _add_demo(ps)


def _add_tasks(ps: Any) -> None:
    t = new_command(ps, "tasks", help="write generated verifiable tasks (math, code) as JSONL")
    t.add_argument("--kind", default="mix", choices=["math", "code", "mix"])
    t.add_argument("--split", default="train", choices=["train", "test"])
    t.add_argument("--n", type=int_at_least(0), default=None)
    t.add_argument("--format", default="prompts", choices=["prompts", "sft"],
                   help="prompts (with answer/test columns for the rewards) or sft (with reference replies)")
    t.add_argument("--seed", type=int_at_least(0), default=0)
    t.add_argument("--out", required=True, help="JSONL file to write")


def _add_sft(ps: Any) -> None:
    s = new_command(ps, "sft", help="supervised fine-tuning on chat data (loss on assistant tokens only)")
    _common(s, "runs/sft")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--data", help="SFT JSONL: {messages: [...]} or {prompt, completion}")
    src.add_argument("--tasks", type=tasks_spec, default="mix:1000",
                     help="generated tasks KIND[:N] when no --data (default mix:1000)")
    _sft_args(s, 3.0, 1e-4)


def _add_rs(ps: Any) -> None:
    r = new_command(ps, "rs", help="rejection-sampling SFT: sample, score, keep the best, fine-tune (rounds)")
    _common(r, "runs/rs")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="prompts JSONL: {prompt, answer?/test?, …}")
    src.add_argument("--tasks", type=tasks_spec, default="mix:200", help="generated tasks KIND[:N] when no --prompts")
    reward_args(r, "math,code")
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


def _add_dpo(ps: Any) -> None:
    d = new_command(ps, "dpo", help="DPO with the paper's settings (lr 1e-5, batch 256) and early stopping")
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


def _add_rm(ps: Any) -> None:
    m = new_command(ps, "rm", help="train the learned reward model on preference pairs (Bradley-Terry)")
    _common(m, "runs/rm")
    m.add_argument("--pairs", required=True, help="preference JSONL: {prompt, chosen, rejected}")
    m.add_argument("--epochs", type=float_in(0, low_open=True), default=3.0)
    m.add_argument("--lr", type=float_in(0, low_open=True), default=1e-4)
    m.add_argument("--batch-size", type=int_at_least(1), default=16)
    m.add_argument("--eval-fraction", type=float_in(0, 0.5, low_open=True), default=0.1)


def _add_demo(ps: Any) -> None:
    de = new_command(ps, "demo", help="base -> SFT -> rejection-sampling SFT -> DPO on generated tasks, scored on "
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

STAGES = {"tasks": cmd_tasks, "sft": cmd_sft, "rs": cmd_rs, "dpo": cmd_dpo, "rm": cmd_rm, "demo": cmd_demo}


def run(args: argparse.Namespace) -> None:
    """Run the stage named on the command line."""
    STAGES[args.stage](args)
