"""A lone prompt read by `kunlun serve`'s two admission paths: the eager prefill (``kunlun serve``'s default) and the
compiled prefill bucket of ``--prefill-buckets`` (:class:`kunlunbaize.infer.static.PromptFiller`).

For each prompt length, the two are timed side by side in interleaved rounds (median process CPU time of one call,
one torch thread) after checking that their last logits agree; the compile time of each bucket is printed too
(docs/reports/BENCHMARKS.md, "Prefill buckets").

    python benchmarks/prefill_buckets.py --checkpoint /work/bench/llama --lengths 1,5,8,9,16 --buckets 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from kunlunbaize.infer.load import load_as_kunlunbaize
from kunlunbaize.infer.static import CompileOptions, PromptFiller, fill_buckets
from kunlunbaize.model import DEFAULT_PREFILL_CHUNK, prefill


def cpu_ms(fn, rounds: int) -> list[float]:
    """Process CPU milliseconds of each of ``rounds`` calls of ``fn``."""
    out = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        out.append((time.process_time() - t0) * 1e3)
    return out


def eager_prefill(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """The last logits [1, V] of ``prompt`` read eagerly into a fresh cache of its length (the engine's default)."""
    cache = model.new_cache(1, len(prompt), mtp=False)
    return prefill(model, torch.tensor([prompt]), cache, DEFAULT_PREFILL_CHUNK, None, 1).logits[:, -1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run, checkpoint or Hugging Face export")
    ap.add_argument("--lengths", default="1,5,8,9,16", help="prompt lengths in tokens (default: %(default)s)")
    ap.add_argument("--buckets", type=int, default=2, help="--prefill-buckets N (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=40, help="timed calls of each path (default: %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = load_as_kunlunbaize(args.checkpoint)
    model.eval()
    lengths = [int(n) for n in args.lengths.split(",")]
    filler = PromptFiller(model, fill_buckets(model.config.max_seq_len, args.buckets), CompileOptions())
    print(f"{args.checkpoint}: buckets {filler.lengths}, torch {torch.__version__}, 1 thread")
    with torch.inference_mode():
        for n in filler.lengths:
            t0 = time.perf_counter()
            filler.fill([1] * n)
            print(f"bucket {n}: compiled in {time.perf_counter() - t0:.1f} s")
        print("| prompt tokens | bucket | eager ms | bucket ms | eager / bucket | max logit diff |")
        print("|---:|---:|---:|---:|---:|---:|")
        for length in lengths:
            if filler.bucket(length) is None:
                print(f"| {length} | – | | | | (longer than every bucket) |")
                continue
            prompt = torch.randint(1, model.config.vocab_size, (length,)).tolist()

            eager = partial(eager_prefill, model, prompt)
            bucket = partial(filler.fill, prompt)
            diff = (eager() - bucket()[1]).abs().max().item()
            a, b = [], []
            for _ in range(args.rounds // 5):  # interleaved rounds of 5 calls each
                a += cpu_ms(eager, 5)
                b += cpu_ms(bucket, 5)
            ea, eb = statistics.median(a), statistics.median(b)
            print(f"| {length} | {filler.bucket(length)} | {ea:.1f} | {eb:.1f} | {ea / eb:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
