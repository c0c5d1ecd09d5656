"""Serving throughput: ``kunlun serve`` side by side with vLLM's OpenAI server, and one-at-a-time ``generate``.

The same streamed greedy requests (code prompts, ``--max-tokens`` new tokens each) are answered, one server at a
time, in one run:

1. sequentially with the project's cached ``generate`` in this process (the baseline: what a user gets without a
   server), every answer kept as the reference;
2. through ``kunlun serve`` (a subprocess on a free loopback port) by C client threads with the ``openai`` client,
   streaming, each thread sending its share of the requests one after another, for C in ``--concurrency``; once per
   ``--engines`` value (``process``: the engine in its own process, the default; ``thread``: in the server's);
3. the same at concurrency 1 with ``--speculative`` (MTP self-speculative decoding of a lone request);
4. through vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``) from the environment of
   ``--vllm-python`` (``scripts/setup-vllm.sh`` makes it), serving the same weights as a ``kunlun export --hf`` folder
   (made in a temporary folder unless ``--export`` names one), float32, at the same concurrencies.

Every answer is compared with its reference; a row says how many are identical. Reported per row: completion
tokens/s, TTFT p50/p95 (time to the first streamed text), the server's CPU-seconds (all its processes) and tokens per
CPU-second, the ratio of ``kunlun serve`` to vLLM at the same concurrency, and the load average over the row (the
machine may be shared).

    python benchmarks/serve.py --checkpoint runs/small                    # ~5 min on 2 cores
    python benchmarks/serve.py --checkpoint runs/small --engines process,process:2,thread --no-vllm
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from kunlunbaize.checkpoint import load_tokenizer
from kunlunbaize.infer.generate import generate
from kunlunbaize.infer.load import load_as_kunlunbaize

PROMPTS = ["def parse_args(argv):\n", "class Cache:\n    def __init__(self", "import os\nimport sys\n\n",
           "    for i in range(len(", "# Copyright", "if __name__ == '__main__':\n", "def main():\n    ",
           "    return self."]
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    label: str
    concurrency: int
    stats: dict[str, float]
    identical: int = 0
    total: int = 0
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after
    extra: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def sequential(folder: str, jobs: list[str], max_tokens: int) -> tuple[list[str], dict[str, float]]:
    """Each prompt alone through ``generate`` (greedy, cached): the reference texts and the baseline's speed."""
    model, ckpt = load_as_kunlunbaize(folder)
    tok, eos = load_tokenizer(ckpt, model.config.vocab_size)
    generate(model, [tok.encode(PROMPTS[0]).ids], 8, eos_id=eos)  # warm-up
    texts, tokens = [], 0
    cpu, start = time.process_time(), time.perf_counter()
    for prompt in jobs:
        out = generate(model, [tok.encode(prompt, add_special_tokens=False).ids], max_tokens, eos_id=eos).tokens[0]
        tokens += len(out)
        texts.append(tok.decode(out, skip_special_tokens=False))
    wall = time.perf_counter() - start
    return texts, {"tokens": tokens, "wall": wall, "tokens_per_s": tokens / wall, "cpu": time.process_time() - cpu}


class Server:
    """An OpenAI-compatible server in a subprocess on a free port, ready when ``/health`` answers 200."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str], start_timeout: float) -> None:
        self.port = port
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (open while the server runs)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}/v1"
        began = time.monotonic()
        deadline = began + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}): {cmd}\n{self.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        self.start_s = time.monotonic() - began  # until /health answered (compiling included)
                        print(f"{cmd[2]} answered after {self.start_s:.0f} s", file=sys.stderr, flush=True)
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.close()
        raise SystemExit(f"the server did not answer within {start_timeout:.0f} s: {cmd}\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def cpu_seconds(self) -> float:
        """User + system CPU-seconds of the server and every process under it, so far."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def kunlun_server(folder: str, extra: list[str]) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "kunlunbaize.cli", "serve", "--checkpoint", folder, "--port", str(port),
           "--model-name", "bench", "--log-level", "warning", "--max-batch", "16", *extra]
    return Server(cmd, port, {**os.environ, "PYTHONUNBUFFERED": "1"}, 1800)  # it compiles its step at start


def vllm_server(python: str, export: str, kv_gib: int) -> Server:
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", export, "--served-model-name", "bench",
           "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--max-num-seqs", "16",
           "--uvicorn-log-level", "warning"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # its own environment, with its own kunlunbaize (the plugin)
    return Server(cmd, port, env, 600)


def served(server: Server, jobs: list[str], max_tokens: int, concurrency: int) -> tuple[list[str], dict[str, float]]:
    """Stream every job through ``server`` from ``concurrency`` client threads; the texts and the figures."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
    extra = {"skip_special_tokens": False}  # vLLM's default drops special tokens' text; kunlun serve keeps it
    client.completions.create(model="bench", prompt=PROMPTS[0], max_tokens=8, temperature=0, extra_body=extra)
    texts: list[str] = [""] * len(jobs)
    ttft: list[float] = []
    latencies: list[float] = []
    tokens = [0]

    def worker(w: int) -> None:
        for i in range(w, len(jobs), concurrency):
            t0 = time.perf_counter()
            first = None
            parts = []
            for chunk in client.completions.create(model="bench", prompt=jobs[i], max_tokens=max_tokens,
                                                   temperature=0, stream=True, extra_body=extra,
                                                   stream_options={"include_usage": True}):
                if chunk.usage is not None:
                    tokens[0] += chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].text:
                    if first is None:
                        first = time.perf_counter() - t0
                    parts.append(chunk.choices[0].text)
            latencies.append(time.perf_counter() - t0)
            ttft.append(first if first is not None else latencies[-1])
            texts[i] = "".join(parts)

    cpu, start = server.cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - start
    return texts, {"tokens": tokens[0], "wall": wall, "tokens_per_s": tokens[0] / wall,
                   "cpu": server.cpu_seconds() - cpu, "ttft_p50": statistics.median(ttft),
                   "ttft_p95": percentile(ttft, 0.95), "latency_p50": statistics.median(latencies),
                   "latency_p95": percentile(latencies, 0.95)}


def measure(label: str, server: Server, jobs: list[str], max_tokens: int, levels: list[int],
            reference: list[str]) -> list[Row]:
    """One server's rows, one per concurrency; an empty ``reference`` is filled with the first row's texts."""
    rows = []
    try:
        for c in levels:
            before = os.getloadavg()[0]
            texts, stats = served(server, jobs, max_tokens, c)
            if not reference:
                reference.extend(texts)
            same = sum(a == b for a, b in zip(texts, reference, strict=True))
            rows.append(Row(label, c, stats, same, len(jobs), (before, os.getloadavg()[0])))
            print(f"{label}, concurrency {c}: {stats['tokens_per_s']:.1f} tokens/s, {same}/{len(jobs)} identical",
                  file=sys.stderr, flush=True)
    finally:
        server.close()
    return rows


def table(rows: list[Row], base: Row | None) -> list[str]:
    vllm = {r.concurrency: r.stats["tokens_per_s"] for r in rows if r.label == "vLLM"}
    out = ["| server | concurrency | tokens/s | vs vLLM | TTFT p50 | TTFT p95 | server CPU-s | tokens/CPU-s | "
           "identical | load avg |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in [*([base] if base is not None else []), *rows]:
        s = r.stats
        ratio = f"{s['tokens_per_s'] / vllm[r.concurrency]:.2f}x" if r.concurrency in vllm else "–"
        ttft = f"{s['ttft_p50'] * 1000:.0f} ms | {s['ttft_p95'] * 1000:.0f} ms" if "ttft_p50" in s else "– | –"
        conc = str(r.concurrency) if r.concurrency else "–"
        out.append(f"| {r.label} | {conc} | {s['tokens_per_s']:.1f} | {ratio} | {ttft} | {s['cpu']:.1f} | "
                   f"{s['tokens'] / max(s['cpu'], 1e-9):.0f} | {r.identical}/{r.total} | "
                   f"{r.load[0]:.1f}→{r.load[1]:.1f} |")
    return out


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/small", help="run, checkpoint or export folder")
    ap.add_argument("--export", default=None, help="its `kunlun export --hf` folder for vLLM (default: made here)")
    ap.add_argument("--requests", type=int, default=48, help="requests per setting (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: %(default)s)")
    ap.add_argument("--concurrency", default="1,4,16", help="client threads, comma-separated (default: %(default)s)")
    ap.add_argument("--engines", default="process", help="kunlun serve --engine values, comma-separated, each with "
                    "an optional :THREADS (process:2) (default: %(default)s; empty: none)")
    ap.add_argument("--serve-flags", action="append", default=None,
                    help="more flags for kunlun serve, e.g. '--no-compile' (the eager step), '--compile-mode "
                         "max-autotune' (the slower-starting compile) or '--slot-buckets 1'; given more than once, "
                         "one kunlun serve per value, side by side in the same run (default: none: kunlun serve's "
                         "own defaults)")
    ap.add_argument("--server-threads", type=int, default=None,
                    help="the engine's torch threads (kunlun serve --threads; default: kunlun serve's)")
    ap.add_argument("--no-sequential", action="store_true",
                    help="leave out the sequential baseline (the first served row's texts are then the reference)")
    ap.add_argument("--sequential-threads", type=int, default=None,
                    help="torch threads of the sequential baseline (default: torch's)")
    ap.add_argument("--no-speculative", action="store_true", help="leave out the --speculative row")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                    help="python of the vLLM environment (default: %(default)s)")
    ap.add_argument("--no-vllm", action="store_true", help="leave out the vLLM rows")
    ap.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (default: %(default)s)")
    return ap.parse_args()


def main() -> None:
    args = parse()
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    levels = [int(c) for c in args.concurrency.split(",")]
    use_vllm = not args.no_vllm and Path(args.vllm_python).exists()
    if not args.no_vllm and not use_vllm:
        print(f"no vLLM environment at {args.vllm_python} (bash scripts/setup-vllm.sh makes it): no vLLM rows",
              file=sys.stderr)
    tmp = tempfile.TemporaryDirectory(prefix="serve-bench-")
    export = args.export
    if use_vllm and export is None:
        from kunlunbaize.hf.export import export_hf

        export = export_hf(args.checkpoint, Path(tmp.name) / "hf", log=lambda m: None)
    folder = str(export) if export is not None else args.checkpoint  # both servers read the same files

    reference: list[str] = []
    base = None
    if not args.no_sequential:
        if args.sequential_threads:
            torch.set_num_threads(args.sequential_threads)
        reference, stats = sequential(folder, jobs, args.max_tokens)
        base = Row("sequential `generate`, one at a time", 0, stats, len(jobs), len(jobs))
    rows: list[Row] = []
    threads = ["--threads", str(args.server_threads)] if args.server_threads else []
    settings = args.serve_flags or [""]
    for spec, extra in [(e, f) for e in args.engines.split(",") if e for f in settings]:
        engine, _, count = spec.partition(":")  # process:2: the engine's process with 2 torch threads
        label = "kunlun serve" if engine == "process" else f"kunlun serve --engine {engine}"
        flags = ["--engine", engine, *(["--threads", count] if count else threads), *shlex.split(extra)]
        if count:
            label += f" --threads {count}"
        label += f" {extra.strip()}" if extra.strip() else ""
        server = kunlun_server(folder, flags)
        rows += measure(label, server, jobs, args.max_tokens, levels, reference)
    if not args.no_speculative:
        extra = settings[0].strip()
        server = kunlun_server(folder, ["--speculative", *threads, *shlex.split(extra)])
        rows += measure(f"kunlun serve --speculative{' ' + extra if extra else ''}", server, jobs, args.max_tokens,
                        [1], reference)
    if use_vllm:
        rows += measure("vLLM", vllm_server(args.vllm_python, str(export), args.kv_cache_gib), jobs,
                        args.max_tokens, levels, reference)
    tmp.cleanup()

    cpu = platform.processor() or platform.machine()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\nmachine: {cpu}, {os.cpu_count()} CPU threads, torch {torch.__version__}, {args.requests} streamed "
          f"greedy requests of {args.max_tokens} new tokens, float32, {folder}; {when}\n")
    if base is None:
        print("identical: to the first kunlun serve row's texts (no sequential baseline)")
    print("\n".join(table(rows, base)))


if __name__ == "__main__":
    main()
