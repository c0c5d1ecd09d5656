"""``kunlun`` command line: ``prepare``, ``train``, ``generate``, ``eval``, ``ablate``, ``export``, ``posttrain``,
``reward``, ``serve``, ``info`` (size and FLOPs), ``demo``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import PRESETS, ModelConfig

COMMANDS = ("info", "demo", "prepare", "train", "generate", "eval", "ablate", "export", "posttrain", "reward",
            "serve")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``kunlun <cmd>: what is wrong — see `kunlun <cmd> --help```, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} — see `{self.prog} --help`\n")


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (and <= ``high``); underscores allowed, e.g. 1_000."""

    def parse(raw: str) -> int:
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None
        if value < low or (high is not None and value > high):
            where = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {where}, got {value}")
        return value

    return parse


SEED = int_at_least(0, 2**63 - 1)  # what torch.Generator.manual_seed takes


def float_in(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite float in [low, high] (or (low, high] with ``low_open``)."""
    if high < math.inf:
        where = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        where = f"{'>' if low_open else '>='} {low:g}"

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"expected a finite number {where}, got {raw}")
        return value

    return parse


def _parse_overrides(pairs: list[str], command: str = "kunlun") -> dict:
    """``key=value`` pairs into typed ModelConfig overrides (ints, floats, bools, comma lists)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"{command}: --set {pair!r} must look like key=value, e.g. --set mtp_depth=1")
        key, raw = pair.split("=", 1)
        out[key] = _parse_value(raw)
    return out


def _parse_value(raw: str):
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if "," in raw:
        return tuple(_parse_value(p) for p in raw.split(",") if p)
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _config(args: argparse.Namespace) -> ModelConfig:
    try:
        return ModelConfig.preset(args.preset, **_parse_overrides(args.set, f"kunlun {args.command}"))
    except ValueError as e:
        raise SystemExit(f"kunlun {args.command}: invalid config: {e} — fix the --set value "
                         "(`kunlun info --preset NAME` shows every field)") from None


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from .model import KunlunBaize

    cfg = _config(args)
    with torch.device("meta"):  # no memory, any size
        model = KunlunBaize(cfg)
    n = model.num_params()
    print(f"preset {args.preset}: {n:,} parameters ({n / 1e9:.3f} B)")
    for name, count in cfg.param_breakdown().items():
        print(f"  {name:<15} {count:>20,}")
    T = args.seq_len or cfg.max_seq_len
    print(f"forward FLOPs/token at T={T}:  {cfg.flops_per_token(T):.4e}")
    print(f"training FLOPs/token at T={T}: {cfg.flops_per_token(T, training=True):.4e}")
    print(cfg.to_json())


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(_config(args), steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
             lr=args.lr, seed=args.seed, prompt=args.prompt, max_new_tokens=args.max_new_tokens)


def cmd_train(args: argparse.Namespace) -> None:
    from .checkpoint import CheckpointError
    from .data.format import DataError
    from .train.distributed import shutdown
    from .train.trainer import TrainConfig, TrainingError, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["model_overrides"] = _parse_overrides(args.set, "kunlun train")
    values["progress"] = not args.no_progress
    try:
        cfg = TrainConfig(**values)
        summary = train(cfg)
    except (ValueError, DataError, CheckpointError, TrainingError) as e:
        raise SystemExit(f"kunlun train: {e}") from None
    finally:
        shutdown()  # a process group left to interpreter teardown can abort the process (gloo threads)
    if "loss_plot" not in summary:  # not rank 0
        return
    if summary["steps_now"] == 0 and summary["finished"]:
        print(f"\nalready trained: {summary['step']} steps, {summary['tokens']:,} tokens (the whole budget)")
    else:
        print(f"\ntrained {summary['step']} steps, {summary['tokens']:,} tokens"
              + ("" if summary["finished"] else " (stopped early; run the same command to resume)"))
    if "first_val_loss" in summary:
        print(f"validation loss {summary['first_val_loss']:.3f} -> {summary['val_loss']:.3f}")
    print(f"checkpoint:   {summary['checkpoint']}")
    print(f"loss curve:   {summary['loss_plot']}")
    if "dense_plot" in summary:
        print(f"dense-residual weights: {summary['dense_plot']}")
    print(f"metrics:      {summary['run_dir']}/metrics.jsonl (TensorBoard: {summary['run_dir']}/tensorboard)")
    if args.sample_tokens > 0 and summary["checkpoint"] and not summary["interrupted"]:
        from .checkpoint import CheckpointError
        from .infer.sample import print_sample

        try:
            print_sample(summary["checkpoint"], args.sample_prompt, cfg.data, args.sample_tokens)
        except (CheckpointError, DataError, ValueError) as e:
            raise SystemExit(f"kunlun train: training finished, but the sample could not be generated: {e}") from None


def _add_train_parser(sub) -> None:
    from .train.trainer import TrainConfig

    d = TrainConfig()
    tr = sub.add_parser("train", help="pre-train on a prepared dataset (default: prepares and trains on the "
                                      "Python standard library)")
    tr.add_argument("--data", default=d.data, help="folder written by `kunlun prepare`")
    tr.add_argument("--out", default=d.out, help="run folder (checkpoints, metrics, plots)")
    tr.add_argument("--preset", default=d.preset, choices=list(PRESETS))
    tr.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    tr.add_argument("--arch", default=d.arch, choices=["kunlunbaize", "llama"],
                    help="llama: transformers' LlamaForCausalLM of matched width/depth/params, same loop")
    tr.add_argument("--tokens", type=int, help=f"token budget (default {d.tokens:,})")
    tr.add_argument("--seq-len", dest="seq_len", type=int, help=f"default {d.seq_len}")
    tr.add_argument("--batch-size", dest="batch_size", type=int, help=f"global sequences per step (default "
                                                                      f"{d.batch_size}) after the ramp")
    tr.add_argument("--batch-size-start", dest="batch_size_start", type=int)
    tr.add_argument("--micro-batch-size", dest="micro_batch_size", type=int, help="per rank; the rest is "
                                                                                 "gradient accumulation")
    tr.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    tr.add_argument("--dense-lr-mult", dest="dense_lr_mult", type=float,
                    help="learning rate of the dense-residual logits / --lr (default 1)")
    tr.add_argument("--warmup-steps", dest="warmup_steps", type=int)
    tr.add_argument("--weight-decay", dest="weight_decay", type=float)
    tr.add_argument("--grad-clip", dest="grad_clip", type=float)
    tr.add_argument("--seed", type=int)
    tr.add_argument("--log-every", dest="log_every", type=int)
    tr.add_argument("--eval-every", dest="eval_every", type=int)
    tr.add_argument("--eval-batches", dest="eval_batches", type=int)
    tr.add_argument("--ckpt-every", dest="ckpt_every", type=int)
    tr.add_argument("--keep-last", dest="keep_last", type=int)
    tr.add_argument("--resume", help="auto (default): newest checkpoint in --out; none; or a checkpoint folder")
    tr.add_argument("--parallel", choices=["auto", "none", "ddp", "fsdp"])
    tr.add_argument("--device", help="auto, cpu, cuda")
    tr.add_argument("--dtype", choices=["auto", "fp32", "bf16"])
    tr.add_argument("--activation-checkpointing", dest="activation_checkpointing", action="store_true",
                    default=None)
    tr.add_argument("--compile", action="store_true", default=None, help="torch.compile each block")
    tr.add_argument("--max-bad-steps", dest="max_bad_steps", type=int)
    tr.add_argument("--peak-tflops", dest="peak_tflops", type=float, help="device peak for MFU")
    tr.add_argument("--stop-at-step", dest="stop_at_step", type=int, help="save and stop after this step")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--sample-prompt", default=None, help="prompt of the sample generated after training (default: "
                    "'def main():' on the embedded Python corpus, else the start of a validation document)")
    tr.add_argument("--sample-tokens", type=int, default=80, help="tokens of that sample (0: none)")
    tr.set_defaults(func=cmd_train)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of ``kunlun generate``: the arguments, ``--prompt-file`` (not both) or stdin."""
    if args.prompt_file and args.prompt:
        raise SystemExit("kunlun generate: a prompt was given both as an argument and with --prompt-file — "
                         "give only one of them")
    if args.prompt_file:
        try:
            prompts = [Path(args.prompt_file).read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"kunlun generate: cannot read prompt file {args.prompt_file}: {e}") from None
    elif args.prompt == ["-"] or (not args.prompt and not sys.stdin.isatty()):
        prompts = [sys.stdin.read()]
    else:
        prompts = args.prompt
    if not prompts or any(p == "" for p in prompts):
        raise SystemExit("kunlun generate: empty prompt — give text as an argument, --prompt-file or on stdin")
    return prompts


def resolve_device(name: str, command: str) -> str:
    """``--device`` checked against this machine: auto (cuda when available, else cpu), cpu, cuda[:N], mps."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise SystemExit(f"kunlun {command}: unknown --device {name!r} — use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"kunlun {command}: --device {name}: no CUDA GPU is usable on this machine — "
                             "use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SystemExit(f"kunlun {command}: --device {name}: this machine has {torch.cuda.device_count()} "
                             "GPU(s) — use cuda:0 … or auto")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise SystemExit(f"kunlun {command}: --device {name}: MPS is not available here — use --device cpu")
    elif dev.type != "cpu":
        raise SystemExit(f"kunlun {command}: --device {name} is not supported — use auto, cpu, cuda or cuda:N")
    return str(dev)


def _load_for_generation(args: argparse.Namespace, device: str):
    """The :class:`kunlunbaize.infer.generator.Generator` of ``--checkpoint`` (a Llama checkpoint with --speculative is
    refused before anything is loaded)."""
    from .checkpoint import CheckpointError, checkpoint_arch, resolve_checkpoint
    from .infer.generator import load_for_generation

    ckpt = resolve_checkpoint(args.checkpoint)
    spec = checkpoint_arch(ckpt)
    if args.speculative and not spec.mtp:
        raise CheckpointError(f"{ckpt} is a {spec.note} checkpoint (`kunlun train --arch {spec.name}`): it has no "
                              "MTP depths to draft with — drop --speculative")
    return load_for_generation(ckpt, device)


def _draft_vocab(args: argparse.Namespace, ckpt, vocab_size: int):
    """The ``--draft-vocab`` most frequent token ids of ``--draft-data`` (default: the checkpoint's training data)."""
    from .checkpoint import training_data
    from .data.format import token_counts
    from .infer import frequent_tokens

    data = args.draft_data or training_data(ckpt)
    if data is None:
        raise ValueError(f"--draft-vocab needs token frequencies and {ckpt} does not say what data it was trained "
                         "on: give --draft-data DIR (a folder from `kunlun prepare`)")
    if args.draft_vocab > vocab_size:
        raise ValueError(f"--draft-vocab {args.draft_vocab} exceeds the vocabulary of {vocab_size}")
    try:
        counts = token_counts(data, vocab_size)
    except (OSError, ValueError) as e:
        raise ValueError(f"--draft-vocab: cannot count tokens of {data}: {e} — give --draft-data DIR") from None
    return frequent_tokens(counts, args.draft_vocab)


def cmd_generate(args: argparse.Namespace) -> None:
    from .checkpoint import CheckpointError, load_tokenizer
    from .infer import SamplingParams, speculative_generate
    from .infer.generate import fit_prompts
    from .infer.text import TextStream
    from .model import KunlunBaize

    prompts = _read_prompts(args)
    many = len(prompts) > 1
    if not args.speculative and (args.draft_len is not None or args.adaptive or args.draft_vocab):
        raise SystemExit("kunlun generate: --draft-len, --adaptive and --draft-vocab apply to --speculative "
                         "decoding — add --speculative or drop them")
    if args.speculative and many:
        raise SystemExit("kunlun generate: --speculative decodes one prompt at a time — give a single prompt")
    device = resolve_device(args.device, "generate")
    try:  # everything is checked before anything is written to stdout
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        loaded = _load_for_generation(args, device)
        model, ckpt, run, context, depth = (loaded.model, loaded.checkpoint, loaded.generate, loaded.context,
                                            loaded.mtp_depth)
        if args.speculative and depth == 0:
            raise CheckpointError(f"{ckpt} has no MTP depths (mtp_depth=0) to draft with — drop --speculative")
        if args.speculative and args.draft_len is not None and args.draft_len > depth:
            raise CheckpointError(f"--draft-len {args.draft_len} exceeds the model's mtp_depth={depth} — "
                            f"use 1 … {depth}")
        tokenizer, eot = load_tokenizer(ckpt, model.config.vocab_size)
        ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
        fitted, max_new = fit_prompts(ids, args.max_new_tokens, context, args.truncate)
        draft_vocab = _draft_vocab(args, ckpt, model.config.vocab_size) if args.draft_vocab else None
        if (args.compile or args.compile_mode) and not isinstance(model, KunlunBaize):
            raise CheckpointError(f"{ckpt} is a {loaded.arch.note} checkpoint: --compile compiles KunlunBaize's "
                                  "static decoding step — drop --compile/--compile-mode")
    except (ValueError, CheckpointError) as e:
        raise SystemExit(f"kunlun generate: {e}") from None
    for row, (full, kept) in enumerate(zip(ids, fitted, strict=True)):
        if len(kept) < len(full):
            print(f"kunlun generate: warning: prompt{f' {row}' if many else ''} truncated to its last {len(kept)} "
                  f"of {len(full)} tokens (--truncate)", file=sys.stderr)
    if max_new < args.max_new_tokens:
        print(f"kunlun generate: warning: --max-new-tokens {args.max_new_tokens} clipped to {max_new}: the context "
              f"holds {context} tokens and the {'longest ' if many else ''}prompt takes {context - max_new}",
              file=sys.stderr)

    def write(row: int, text: str) -> None:
        if not many:
            sys.stdout.write(text)
            sys.stdout.flush()

    stream = TextStream(tokenizer, len(prompts), args.stop, write)

    def should_stop(row: int, tokens: list[int]) -> bool:  # nobody reads a closed stdout: stop generating
        return stream.update(row, tokens) or (not many and output_closed())

    print(f"[{ckpt}]", file=sys.stderr)
    decoder = None
    if args.compile or args.compile_mode:
        from .infer import StaticDecoder

        print("[compiling the decoding step: the first use of a shape takes a while (tens of seconds on a small "
              "CPU, minutes with max-autotune); inductor caches it on disk for later runs]", file=sys.stderr)
        decoder = StaticDecoder(model, len(prompts), mtp=args.speculative, mode=args.compile_mode)
    if not many:
        sys.stdout.write(prompts[0])
    try:
        if args.speculative:
            result = speculative_generate(model, fitted[0], max_new, sampling, args.draft_len, args.adaptive, eot,
                                          args.seed, should_stop=should_stop, draft_vocab=draft_vocab,
                                          decoder=decoder)
        elif decoder is not None:
            result = run(model, fitted, max_new, sampling, eot, args.seed, should_stop=should_stop, decoder=decoder)
        else:
            result = run(model, fitted, max_new, sampling, eot, args.seed, should_stop=should_stop)
    except ValueError as e:
        raise SystemExit(f"\nkunlun generate: {e}") from None
    except KeyboardInterrupt:  # keep what was generated: the held-back text, and each row of a batch
        for row in range(len(prompts)):
            stream.flush(row)
            if many:
                print(f"--- [{row}] (interrupted)\n{prompts[row]}{stream.texts[row]}")
        if not many:
            print()
        raise
    for row in range(len(prompts)):
        text = stream.finish(row, result.tokens[row])
        if many:
            print(f"--- [{row}] ({result.finish_reasons[row]})\n{prompts[row]}{text}")
    if not many:
        print()
    print(f"[finished: {', '.join(result.finish_reasons)}]", file=sys.stderr)
    if result.stats:
        print("[" + "  ".join(f"{k} {v:.3g}" for k, v in result.stats.items()) + "]", file=sys.stderr)


def _add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a trained checkpoint (streamed)")
    g.add_argument("prompt", nargs="*", help="prompt text (several: a batch, left-padded); '-' or none: stdin")
    g.add_argument("--checkpoint", default="runs/small", help="run folder (newest checkpoint) or checkpoint folder")
    g.add_argument("--prompt-file", help="read the prompt from this file (instead of arguments or stdin)")
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=200,
                   help="at most this many tokens (clipped, with a warning, to the room the context leaves)")
    g.add_argument("--temperature", type=float_in(0), default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int_at_least(0), default=0, help="0: no top-k filter")
    g.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=1.0, help="in (0, 1]; 1: no nucleus filter")
    g.add_argument("--seed", type=SEED, default=None, help="for sampling (default: random)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--truncate", action="store_true",
                   help="keep the end of a long prompt: its last max(context − max-new-tokens, context/2) tokens")
    g.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    g.add_argument("--draft-len", type=int_at_least(1), default=None, help="drafts per round, 1 … mtp_depth")
    g.add_argument("--adaptive", action="store_true", help="adapt the draft length to acceptance")
    g.add_argument("--draft-vocab", type=int_at_least(1), default=None, metavar="N",
                   help="draft from the N most frequent training tokens only (cheaper drafts, same output)")
    g.add_argument("--draft-data", default=None, metavar="DIR",
                   help="prepared data whose token frequencies choose --draft-vocab (default: the training data)")
    g.add_argument("--compile", action="store_true",
                   help="decode through a StaticDecoder: the step compiled once at fixed shapes (faster per token, "
                        "after a one-time compile; same output)")
    g.add_argument("--compile-mode", choices=["default", "max-autotune", "reduce-overhead"], default=None,
                   help="torch.compile mode of --compile (implies it): max-autotune on a CPU picks C++ GEMM kernels "
                        "per matrix shape (minutes to compile, a faster step); reduce-overhead: CUDA graphs")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N, mps")
    g.set_defaults(func=cmd_generate)


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from .arch import DEFAULT
    from .checkpoint import CheckpointError, checkpoint_arch, resolve_checkpoint

    try:
        from .hf.export import ExportError
    except ImportError as e:
        raise SystemExit(f"kunlun export: needs transformers ({e}) — pip install 'kunlunbaize[hf]'") from None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        out = Path(args.hf).resolve()
        if out == ckpt.resolve() or out in ckpt.resolve().parents:
            raise ExportError(f"--hf {args.hf} holds the checkpoint being exported ({ckpt}) and would be replaced "
                              "— choose another folder")
        spec = checkpoint_arch(ckpt)
        export = spec.hook("export")
        extra = {"chat_template": True} if args.chat_template else {}
        if args.chat_template and spec is not DEFAULT:
            raise ExportError(f"--chat-template is for KunlunBaize checkpoints (the {spec.note} has no role tokens)")
        export(ckpt, args.hf, dtype=dtype, overwrite=args.overwrite, verify=not args.no_verify,
               log=lambda m: print(m, file=sys.stderr), **extra)
    except (CheckpointError, ExportError) as e:
        raise SystemExit(f"kunlun export: {e}") from None
    except OSError as e:  # the temporary folder is removed by the export itself: OUT is complete or untouched
        raise SystemExit(f"kunlun export: cannot write {args.hf} ({e.strerror or e}: {e.filename or ''}) — "
                         "choose a folder you can write to") from None


def _add_export_parser(sub) -> None:
    e = sub.add_parser("export", help="convert a training checkpoint to a Hugging Face transformers folder "
                                      "(a Llama baseline checkpoint: a plain LlamaForCausalLM folder)")
    e.add_argument("--hf", required=True, metavar="OUT", help="folder to write (config, safetensors, tokenizer)")
    e.add_argument("--checkpoint", default="runs/small", help="run folder (newest checkpoint) or checkpoint folder")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.add_argument("--no-verify", action="store_true", help="skip reloading the export and comparing logits")
    e.add_argument("--chat-template", action="store_true",
                   help="add KunlunBaize's chat template (chat_template.jinja) for chat use; off for a base model")
    e.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kunlun", description="KunlunBaize language model tools")
    p.add_argument("--version", action="version", version=f"kunlun (kunlunbaize) {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def model_args(sp: argparse.ArgumentParser, default_preset: str) -> None:
        sp.add_argument("--preset", default=default_preset, choices=list(PRESETS))
        sp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set dense_residual=false conv_kernel_sizes=3,15")

    info = sub.add_parser("info", help="parameter count and FLOPs per token of a preset (built on meta)")
    model_args(info, "paper")
    info.add_argument("--seq-len", type=int_at_least(1), default=None, help="default: the preset's max_seq_len")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="train a small byte-level model on the Python standard library, "
                                       "evaluate it and generate from it (CPU, minutes)")
    model_args(demo, "tiny")
    demo.add_argument("--steps", type=int_at_least(1), default=300)
    demo.add_argument("--batch-size", type=int_at_least(1), default=16)
    demo.add_argument("--seq-len", type=int_at_least(2), default=128)
    demo.add_argument("--lr", type=float_in(0, low_open=True), default=3e-3)
    demo.add_argument("--seed", type=SEED, default=0)
    demo.add_argument("--prompt", default="def ")
    demo.add_argument("--max-new-tokens", type=int_at_least(1), default=120)
    demo.set_defaults(func=cmd_demo)

    from .data.cli import add_prepare_parser

    add_prepare_parser(sub)
    _add_train_parser(sub)
    _add_generate_parser(sub)
    from .eval.cli import add_eval_parser

    add_eval_parser(sub)
    from .ablate.cli import add_ablate_parser

    add_ablate_parser(sub)
    _add_export_parser(sub)
    from .posttrain.cli import add_posttrain_parser, add_reward_parser

    add_posttrain_parser(sub)
    add_reward_parser(sub)
    from .serve.cli import add_serve_parser

    add_serve_parser(sub)
    p.commands = sub.choices  # name -> parser, for errors found after parsing
    return p


class _OutputGuard:
    """Stands in for sys.stdout/sys.stderr so that a reader going away (``kunlun info | head -1``) stops nothing.

    On the first BrokenPipeError the stream's file descriptor is pointed at /dev/null: the command carries
    on, its later output (and the interpreter's final flush) goes nowhere, and it exits with its own status.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self.closed_by_reader = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        self.closed_by_reader = True
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError, AttributeError):  # not a real file (e.g. captured in a test)
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def output_closed() -> bool:
    """True once the reader of stdout has gone away (only inside :func:`main`)."""
    return isinstance(sys.stdout, _OutputGuard) and sys.stdout.closed_by_reader


def _command_of(argv: list[str]) -> str:
    """``kunlun <command>`` for messages, from the raw arguments (they may not be parsed yet)."""
    cmd = next((a for a in argv if not a.startswith("-")), "")
    return f"kunlun {cmd}" if cmd in COMMANDS else "kunlun"


def main(argv: list[str] | None = None) -> None:
    """The ``kunlun`` command. Errors end it with a one-line message and a non-zero status, never a traceback:
    usage errors 2, failures 1, Ctrl-C 130; a closed stdout or stderr stops nothing (see :class:`_OutputGuard`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _OutputGuard(sys.stdout), _OutputGuard(sys.stderr)
    try:
        _run(argv)
    except KeyboardInterrupt:
        print(f"{_command_of(argv)}: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for guard in (sys.stdout, sys.stderr):
            guard.flush()
        sys.stdout, sys.stderr = saved


def _run(argv: list[str]) -> None:
    parser = build_parser()  # imports the training code: inside main's Ctrl-C handling
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's own parser: `kunlun info: unrecognized arguments: …`
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:  # bare `kunlun`: the help, as a usage error
        parser.print_help()
        raise SystemExit(2)
    t0 = time.time()
    args.func(args)
    if args.command == "demo":
        print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
