"""Training tokens/s and peak memory with and without activation checkpointing and the chunked loss, side by side.

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

import torch


def child(args: argparse.Namespace) -> None:
    from kunlunbaize import KunlunBaize, ModelConfig
    from kunlunbaize.arch.llama import LlamaBaseline
    from kunlunbaize.train.optim import build_optimizer

    dev = torch.device(args.device)
    cfg = ModelConfig.preset(args.preset, max_seq_len=max(args.seq_len, 8))
    torch.manual_seed(0)
    model = (LlamaBaseline(cfg) if args.arch == "llama" else KunlunBaize(cfg)).to(dev)
    if args.ac:
        if args.arch == "llama":
            model.set_activation_checkpointing(True)
        else:
            model.gradient_checkpointing = True
    model.train()
    opt = build_optimizer(model, 1e-4)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    chunked = {"logits": False} if args.loss == "chunked" else {}

    def step() -> None:
        with autocast:
            out = model(x, labels=x, **chunked)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

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
