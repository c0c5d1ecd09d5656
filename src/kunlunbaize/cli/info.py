"""``kunlun info``: parameter count and FLOPs per token of a preset (the model built on the meta device), and the
memory of its inference state and training activations at a sequence length (:mod:`kunlunbaize.memory`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..memory import DTYPE_BYTES, memory_report
from .args import add_model_args, int_at_least, model_config, new_command

SET_HELP = "config overrides, e.g. --set dense_residual=false conv_kernel_sizes=3,15"


def add_parser(sub: Any) -> None:
    """Add ``info`` to ``sub`` (from ``ArgumentParser.add_subparsers``)."""
    p = new_command(sub, "info", help="parameter count, FLOPs per token, inference-state and activation memory of a "
                                      "preset (built on meta)")
    add_model_args(p, "paper", SET_HELP)
    p.add_argument("--seq-len", type=int_at_least(1), default=None, help="default: the preset's max_seq_len")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bfloat16",
                   help="element type of the memory figures (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    """Print the parameter breakdown, the FLOPs per token and the config as JSON."""
    cfg = model_config(args.preset, args.set)
    import torch

    from ..model import KunlunBaize

    with torch.device("meta"):  # no memory, any size
        model = KunlunBaize(cfg)
    n = model.num_params()
    print(f"preset {args.preset}: {n:,} parameters ({n / 1e9:.3f} B)")
    for name, count in cfg.param_breakdown().items():
        print(f"  {name:<15} {count:>20,}")
    T = args.seq_len or cfg.max_seq_len
    print(f"forward FLOPs/token at T={T}:  {cfg.flops_per_token(T):.4e}")
    print(f"training FLOPs/token at T={T}: {cfg.flops_per_token(T, training=True):.4e}")
    print("\n".join(memory_report(cfg, T, args.dtype)))
    print(cfg.to_json())
