"""Serving throughput: ``kunlun serve`` at concurrency 1, 4 and 16 against one-at-a-time ``generate``.

The same greedy requests (code prompts, mixed lengths) are answered three ways, in one run:

1. sequentially with the project's cached ``generate`` in this process (the baseline: what a user gets without the
   server), every answer kept as the reference;
2. through ``kunlun serve`` (a subprocess on a free loopback port) by C client threads with the ``openai`` client,
   streaming, each thread sending its share of the requests one after another, for C in ``--concurrency``;
3. the same at concurrency 1 with ``--speculative`` (MTP self-speculative decoding of a lone request).

Every served answer is checked against its reference (the script stops on a difference). Reported: aggregate
completion tokens/s and its ratio to the sequential baseline, time to first token (p50/p95), request latency
(p50/p95).

    python benchmarks/serve.py --checkpoint runs/small
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from kunlunbaize.checkpoint import load_tokenizer
from kunlunbaize.infer.generate import generate
from kunlunbaize.infer.load import load_model

PROMPTS = ["def parse_args(argv):\n", "class Cache:\n    def __init__(self", "import os\nimport sys\n\n",
           "    for i in range(len(", "# Copyright", "if __name__ == '__main__':\n", "def main():\n    ",
           "    return self."]
LENGTHS = (32, 64, 96)


def requests(count: int) -> list[tuple[str, int]]:
    return [(PROMPTS[i % len(PROMPTS)], LENGTHS[i % len(LENGTHS)]) for i in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def sequential(checkpoint: str, jobs: list[tuple[str, int]]) -> tuple[list[str], dict[str, float]]:
    model, ckpt = load_model(checkpoint)
    tok, eos = load_tokenizer(ckpt, model.config.vocab_size)
    generate(model, [tok.encode(PROMPTS[0]).ids], 8, eos_id=eos)  # warm-up
    texts, tokens, latencies = [], 0, []
    start = time.perf_counter()
    for prompt, n in jobs:
        t0 = time.perf_counter()
        out = generate(model, [tok.encode(prompt, add_special_tokens=False).ids], n, eos_id=eos).tokens[0]
        latencies.append(time.perf_counter() - t0)
        tokens += len(out)
        texts.append(tok.decode(out, skip_special_tokens=False))
    wall = time.perf_counter() - start
    return texts, {"tokens": tokens, "wall": wall, "tokens_per_s": tokens / wall,
                   "latency_p50": statistics.median(latencies), "latency_p95": percentile(latencies, 0.95)}


class Server:
    """``kunlun serve`` in a subprocess on a free port."""

    def __init__(self, checkpoint: str, extra: list[str]) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "kunlunbaize.cli", "serve", "--checkpoint", checkpoint, "--port",
               str(self.port), "--model-name", "bench", "--log-level", "warning", "--max-batch", "16", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        if "on http://" not in line:
            self.proc.kill()
            raise SystemExit(f"kunlun serve did not start: {line}{self.proc.stdout.read()}")
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def served(url: str, jobs: list[tuple[str, int]], concurrency: int) -> tuple[list[str], dict[str, float]]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    client.completions.create(model="bench", prompt=PROMPTS[0], max_tokens=8, temperature=0)  # warm-up
    texts: list[str] = [""] * len(jobs)
    ttft: list[float] = []
    latencies: list[float] = []
    tokens = [0]

    def worker(w: int) -> None:
        for i in range(w, len(jobs), concurrency):
            prompt, n = jobs[i]
            t0 = time.perf_counter()
            first = None
            parts = []
            for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=n, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}):
                if chunk.usage is not None:
                    tokens[0] += chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].text:
                    if first is None:
                        first = time.perf_counter() - t0
                    parts.append(chunk.choices[0].text)
            latencies.append(time.perf_counter() - t0)
            ttft.append(first if first is not None else latencies[-1])
            texts[i] = "".join(parts)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - start
    return texts, {"tokens": tokens[0], "wall": wall, "tokens_per_s": tokens[0] / wall,
                   "ttft_p50": statistics.median(ttft), "ttft_p95": percentile(ttft, 0.95),
                   "latency_p50": statistics.median(latencies), "latency_p95": percentile(latencies, 0.95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/small", help="run, checkpoint or export folder")
    ap.add_argument("--requests", type=int, default=48, help="requests per setting (default: %(default)s)")
    ap.add_argument("--concurrency", default="1,4,16", help="client threads, comma-separated (default: %(default)s)")
    ap.add_argument("--server-threads", type=int, default=None,
                    help="the server's torch threads (kunlun serve --threads; default: torch's)")
    args = ap.parse_args()
    jobs = requests(args.requests)
    levels = [int(c) for c in args.concurrency.split(",")]

    reference, base = sequential(args.checkpoint, jobs)
    rows = [("sequential `generate`, one at a time", base)]
    threads = ["--threads", str(args.server_threads)] if args.server_threads else []
    for extra, label, settings in (([], "kunlun serve", levels), (["--speculative"], "kunlun serve --speculative",
                                                                    [1])):
        server = Server(args.checkpoint, extra + threads)
        try:
            for c in settings:
                texts, stats = served(server.url, jobs, c)
                wrong = [i for i, (a, b) in enumerate(zip(texts, reference, strict=True)) if a != b]
                if wrong:
                    raise SystemExit(f"{label}, concurrency {c}: {len(wrong)} answers differ from sequential greedy "
                                     f"(first: request {wrong[0]}: {texts[wrong[0]]!r} vs {reference[wrong[0]]!r})")
                rows.append((f"{label}, concurrency {c}", stats))
        finally:
            server.close()

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}, "
          f"{args.requests} greedy requests ({', '.join(map(str, LENGTHS))} new tokens, cycled), "
          f"checkpoint {args.checkpoint}; every served answer equals its sequential greedy answer\n")
    print("| setting | tokens/s | vs sequential | TTFT p50 | TTFT p95 | latency p50 | latency p95 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, s in rows:
        ttft = (f"{s['ttft_p50'] * 1000:.0f} ms | {s['ttft_p95'] * 1000:.0f} ms" if "ttft_p50" in s else "– | –")
        print(f"| {label} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / base['tokens_per_s']:.2f}x | {ttft} | "
              f"{s['latency_p50']:.2f} s | {s['latency_p95']:.2f} s |")


if __name__ == "__main__":
    main()
