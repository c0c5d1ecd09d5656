"""Training tokens/s and peak memory with and without activation checkpointing and the chunked loss, side by side.

Every variant runs ``kunlun train``'s step (``kunlunbaize.train.step.train_step``: forward, backward, gradient
clipping, AdamW from the trainer's optimiser builder; bf16 autocast on a GPU, fp32 on the CPU, as the trainer).
The loss is either computed from the full [B, T, V] logits of the main head and every MTP depth (``logits``), or a
chunk of rows at a time without storing logits (``chunked``: ``forward(..., logits=False)``, what ``kunlun train``
uses for KunlunBaize).

Each variant runs in a fresh child process (peak memory cannot be reset inside one process on CPU).
Peak memory is the CUDA allocator's peak on GPU; on CPU it is the child's peak resident set size
minus its resident size just before the first step (weights, optimiser and framework already loaded),
i.e. what the training step itself adds: activations, gradients, optimiser state.

    python benchmarks/train_memory.py                     # small preset, CPU
    python benchmarks/train_memory.py --preset 125m --seq-len 1024 --batch-size 4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def make_step(args: argparse.Namespace) -> tuple[Callable[[], None], torch.Tensor]:
    """The training step of ``kunlun train`` (its model builder, optimiser, precision and ``train_step``) on a
    batch of random tokens, and that batch."""
    from kunlunbaize import ModelConfig
    from kunlunbaize.train.config import TrainConfig
    from kunlunbaize.train.models import build_model
    from kunlunbaize.train.optim import build_optimizer
    from kunlunbaize.train.step import precision, resolve_dtype, train_step

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model, cfg, spec = build_model(TrainConfig(preset=args.preset, arch=args.arch, seq_len=args.seq_len),
                                   ModelConfig.preset(args.preset).vocab_size)
    model.to(dev)
    if args.ac:
        spec.set_activation_checkpointing(model, True)
    model.train()
    opt = build_optimizer(model, 1e-4)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), device=dev)
    autocast = precision(dev, resolve_dtype("auto", dev))
    chunked = {"logits": False} if args.loss == "chunked" else {}

    def step() -> None:
        train_step(model, opt, [x], grad_clip=1.0, autocast=autocast, loss_kwargs=chunked)

    return step, x


def child(args: argparse.Namespace) -> None:
    """Time ``args.steps`` training steps after one warm-up step; print tokens/s and the step's peak memory."""
    dev = torch.device(args.device)
    step, x = make_step(args)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    step()  # warm-up (also allocates the optimiser state)
    rates = []
    for _ in range(args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rates.append(x.numel() / (time.perf_counter() - t0))
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_cuda
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    print(json.dumps({"tokens_per_s": statistics.median(rates), "peak_bytes": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--arch", default="kunlunbaize", choices=["kunlunbaize", "llama"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ac", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--loss", default="logits", choices=["logits", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    variants = [(0, "logits"), (1, "logits")]
    if args.arch == "kunlunbaize":
        variants += [(0, "chunked"), (1, "chunked")]
    results = {}
    for ac, loss in variants:
        cmd = [sys.executable, __file__, "--child", "--ac", str(ac), "--loss", loss, "--preset", args.preset,
               "--arch", args.arch, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[ac, loss] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results[0, "logits"]
    print(f"{args.arch} {args.preset}, batch {args.batch_size} x {args.seq_len}, device {args.device}, "
          f"torch {torch.__version__}, {platform.machine()}\n")
    print("| activation checkpointing | loss | tokens/s | relative | step peak memory | relative |")
    print("|---|---|---:|---:|---:|---:|")
    for (ac, loss), r in results.items():
        print(f"| {'on' if ac else 'off'} | {loss} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['peak_bytes'] / 2**20:,.0f} MiB | "
              f"{r['peak_bytes'] / base['peak_bytes']:.2f}x |")

if __name__ == "__main__":
    main()
