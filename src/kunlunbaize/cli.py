"""``kunlun`` command line: ``prepare``, ``train``, ``generate``, ``export``, ``info`` (size and FLOPs), ``demo``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from .config import PRESETS, ModelConfig


def _parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs into typed ModelConfig overrides (ints, floats, bools, comma lists)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"kunlun: override {pair!r} must look like key=value")
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
        return ModelConfig.preset(args.preset, **_parse_overrides(args.set))
    except ValueError as e:
        raise SystemExit(f"kunlun: invalid config: {e}") from None


def cmd_info(args: argparse.Namespace) -> None:
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
    from .data.format import DataError
    from .train.checkpoint import CheckpointError
    from .train.distributed import shutdown
    from .train.trainer import TrainConfig, TrainingError, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["model_overrides"] = _parse_overrides(args.set)
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
    print(f"\ntrained {summary['step']} steps, {summary['tokens']:,} tokens"
          + ("" if summary["finished"] else " (stopped early; run the same command to resume)"))
    if "first_val_loss" in summary:
        print(f"validation loss {summary['first_val_loss']:.3f} -> {summary['val_loss']:.3f}")
    print(f"checkpoint:   {summary['checkpoint']}")
    print(f"loss curve:   {summary['loss_plot']}")
    if "dense_plot" in summary:
        print(f"dense-residual weights: {summary['dense_plot']}")
    print(f"metrics:      {summary['run_dir']}/metrics.jsonl (TensorBoard: {summary['run_dir']}/tensorboard)")
    if cfg.arch == "kunlunbaize" and args.sample_tokens > 0:
        _print_sample(summary["checkpoint"], args.sample_prompt, args.sample_tokens)


def _print_sample(checkpoint: str, prompt: str, max_new_tokens: int) -> None:
    """Greedy text from the trained checkpoint, decoded MTP self-speculatively when the model has depths."""
    from .infer import generate, speculative_generate
    from .infer.load import load_model, load_tokenizer

    model, ckpt = load_model(checkpoint)
    tok, eot = load_tokenizer(ckpt, model.config.vocab_size)
    ids = tok.encode(prompt).ids or ([eot] if eot is not None else [0])
    n = max(1, min(max_new_tokens, model.config.max_seq_len - len(ids) - 1))
    if model.config.mtp_depth:
        out = speculative_generate(model, ids, n, eos_id=eot, truncate=True)
        how = (f"greedy, MTP self-speculative: {out.stats['tokens_per_trunk_forward']:.2f} tokens per trunk "
               f"forward, depth-1 acceptance {out.stats['acceptance_depth_1']:.2f}")
    else:
        out = generate(model, [ids], n, eos_id=eot, truncate=True)
        how = "greedy"
    print(f"\nsample ({how}; `kunlun generate` for more):\n{prompt}{tok.decode(out.tokens[0])}")


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
    tr.add_argument("--sample-prompt", default="def main():", help="prompt of the sample generated after training")
    tr.add_argument("--sample-tokens", type=int, default=80, help="tokens of that sample (0: none)")
    tr.set_defaults(func=cmd_train)


def cmd_generate(args: argparse.Namespace) -> None:
    from .infer import SamplingParams, generate, speculative_generate
    from .infer.load import LoadError, load_model, load_tokenizer
    from .infer.text import TextStream

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
        raise SystemExit("kunlun generate: empty prompt; give text as an argument, --prompt-file or on stdin")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        model, ckpt = load_model(args.checkpoint, device)
        tokenizer, eot = load_tokenizer(ckpt, model.config.vocab_size)
    except (ValueError, LoadError) as e:
        raise SystemExit(f"kunlun generate: {e}") from None
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    many = len(prompts) > 1

    def write(row: int, text: str) -> None:
        if not many:
            sys.stdout.write(text)
            sys.stdout.flush()

    stream = TextStream(tokenizer, len(prompts), args.stop, write)
    print(f"[{ckpt}]", file=sys.stderr)
    if not many:
        sys.stdout.write(prompts[0])
    try:
        if args.speculative:
            if many:
                raise ValueError("--speculative decodes one prompt at a time")
            result = speculative_generate(model, ids[0], args.max_new_tokens, sampling, args.draft_len,
                                          args.adaptive, eot, args.seed, args.truncate, should_stop=stream.update)
        else:
            result = generate(model, ids, args.max_new_tokens, sampling, eot, args.seed, args.truncate,
                              should_stop=stream.update)
    except ValueError as e:
        raise SystemExit(f"\nkunlun generate: {e}") from None
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
    g.add_argument("--prompt-file")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--truncate", action="store_true", help="keep the end of a prompt too long for the context")
    g.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    g.add_argument("--draft-len", type=int, default=None, help="drafts per round, 1 … mtp_depth")
    g.add_argument("--adaptive", action="store_true", help="adapt the draft length to acceptance")
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)


def cmd_export(args: argparse.Namespace) -> None:
    from .infer.load import LoadError

    try:
        from .hf.export import ExportError, export_hf
    except ImportError as e:
        raise SystemExit(f"kunlun export: needs transformers ({e}); pip install 'kunlunbaize[hf]'") from None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        export_hf(args.checkpoint, args.hf, dtype=dtype, overwrite=args.overwrite, verify=not args.no_verify,
                  log=lambda m: print(m, file=sys.stderr))
    except (LoadError, ExportError) as e:
        raise SystemExit(f"kunlun export: {e}") from None


def _add_export_parser(sub) -> None:
    e = sub.add_parser("export", help="convert a training checkpoint to a Hugging Face transformers folder")
    e.add_argument("--hf", required=True, metavar="OUT", help="folder to write (config, safetensors, tokenizer)")
    e.add_argument("--checkpoint", default="runs/small", help="run folder (newest checkpoint) or checkpoint folder")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.add_argument("--no-verify", action="store_true", help="skip reloading the export and comparing logits")
    e.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kunlun", description="KunlunBaize language model tools")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser, default_preset: str) -> None:
        sp.add_argument("--preset", default=default_preset, choices=list(PRESETS))
        sp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set dense_residual=false conv_kernel_sizes=3,15")

    info = sub.add_parser("info", help="parameter count and FLOPs per token of a preset (built on meta)")
    model_args(info, "paper")
    info.add_argument("--seq-len", type=int, default=None)
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="train a small byte-level model on the Python standard library, "
                                       "evaluate it and generate from it (CPU, minutes)")
    model_args(demo, "tiny")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--seq-len", type=int, default=128)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--prompt", default="def ")
    demo.add_argument("--max-new-tokens", type=int, default=120)
    demo.set_defaults(func=cmd_demo)

    from .data.cli import add_prepare_parser

    add_prepare_parser(sub)
    _add_train_parser(sub)
    _add_generate_parser(sub)
    _add_export_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    args.func(args)
    if args.command == "demo":
        print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
