"""``kunlun`` command line: ``info`` (size and FLOPs of a preset) and ``demo`` (train, evaluate, generate)."""

from __future__ import annotations

import argparse
import sys
import time

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
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    args.func(args)
    if args.command != "info":
        print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
