"""Probe: does ``torch.compile`` (dynamic shapes) of the decoding forward pay on this machine?

Plain cached greedy and adaptive MTP speculative greedy, eager and then with ``model.forward`` and
``model.mtp.depth_step`` compiled (``dynamic=True``, the cache's growing length a symbolic size), on the same
prompts; outputs checked identical to eager plain greedy. Reports tokens/s and the compile warm-up time. The
project's decoding does not compile by default: this measures whether it should.

    python benchmarks/decode_compile.py --checkpoint runs/small
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from kunlunbaize.checkpoint import load_tokenizer
from kunlunbaize.infer import generate, speculative_generate
from kunlunbaize.infer.load import load_model

PROMPTS = ["def parse_args(argv):\n", "class Cache:\n    def __init__(self", "import os\nimport sys\n\n",
           "    for i in range(len(", "# Copyright", "if __name__ == '__main__':\n"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model, ckpt = load_model(args.checkpoint, "cpu")
    tok, _ = load_tokenizer(ckpt, model.config.vocab_size)
    prompts = [tok.encode(p).ids for p in PROMPTS]
    n = args.max_new_tokens

    def plain(p: list[int]) -> list[int]:
        return generate(model, [p], n).tokens[0]

    def spec(p: list[int]) -> list[int]:
        return speculative_generate(model, p, n, adaptive=True).tokens[0]

    reference = [plain(p) for p in prompts]

    def rate(fn) -> float:
        t0, count = time.perf_counter(), 0
        for p, ref in zip(prompts, reference, strict=True):
            out = fn(p)
            if out != ref:
                raise SystemExit("output differs from eager plain greedy")
            count += len(out)
        return count / (time.perf_counter() - t0)

    eager = [(rate(plain), rate(spec)) for _ in range(args.rounds)]
    model.forward = torch.compile(model.forward, dynamic=True)
    model.mtp.depth_step = torch.compile(model.mtp.depth_step, dynamic=True)
    t0 = time.perf_counter()
    rate(plain), rate(spec)
    warm = time.perf_counter() - t0
    compiled = [(rate(plain), rate(spec)) for _ in range(args.rounds)]
    print(f"{ckpt}: {len(prompts)} prompts x {n} new tokens, batch 1, cpu, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {platform.machine()}; compile warm-up {warm:.0f} s\n")
    print("| decoding | eager tokens/s | compiled tokens/s | compiled / eager |")
    print("|---|---:|---:|---:|")
    for i, name in enumerate(("plain greedy", "speculative, adaptive")):
        e = max(r[i] for r in eager)
        c = max(r[i] for r in compiled)
        print(f"| {name} | {e:.1f} | {c:.1f} | {c / e:.2f}x |")


if __name__ == "__main__":
    main()
