"""Long-prompt prefill: peak memory and tokens/s of one forward over the prompt against chunked prefill.

Variants, each on the same seeded model and prompt:

* ``one-shot``: ``model(ids, cache=cache, mtp=False)``, how generation prefilled before ``--prefill-chunk`` (logits
  of every prompt position);
* ``one-shot, last logits``: :func:`kunlunbaize.model.prefill` with ``chunk=None`` (one forward, the head applied
  to the last position only);
* ``chunk N``: :func:`kunlunbaize.model.prefill` with ``chunk=N``.

Each variant runs in a fresh child process (peak memory cannot be reset inside one process on a CPU). On a CPU the
peak is the child's peak resident set size minus its resident size just before the prefill, when the weights and the
cache (written once, so its pages are resident) are in place: the prefill's working memory. The cache, the same for
every variant, is reported beside it. On a GPU it is the allocator's peak minus what is allocated before. Every
variant's last-position logits and a slice of its cache (layer 0's self-attention keys, the last layer's conv
history or keys) are compared with the one-shot run's in the same invocation.

    python benchmarks/long_prefill.py                                  # small preset at 8K, CPU
    python benchmarks/long_prefill.py --seq-len 16384 --chunks 512 --variants one-shot,chunk
    python benchmarks/long_prefill.py --report results/long-prefill/RECORD.json   # the table of a kept record
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def child(args: argparse.Namespace) -> None:
    """Run one variant; print its record as JSON and save its outputs to ``args.save``."""
    from kunlunbaize import KunlunBaize, ModelConfig
    from kunlunbaize.model import prefill

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset, max_seq_len=args.seq_len)
    model = KunlunBaize(cfg).to(dev).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.inference_mode():
        cache = model.new_cache(1, args.seq_len, mtp=False)
        for t in cache.buffers():  # resident before the measurement starts
            t.fill_(1 if t.dtype == torch.bool else 0)
        cache_bytes = sum(t.numel() * t.element_size() for t in cache.buffers())
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        if args.child == "one-shot":
            last = model(ids, cache=cache, mtp=False).logits[:, -1]
        else:
            last = prefill(model, ids, cache, args.chunk).logits[:, -1]
        if dev.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        seconds = time.perf_counter() - t0
    layer = cache.layers[-1]
    probe = layer.conv_history.x if layer.conv_history is not None else layer.self_attn.k
    torch.save({"logits": last.float().cpu(), "k0": cache.layers[0].self_attn.k.float().cpu(),
                "last": probe.float().cpu()}, args.save)
    print(json.dumps({"seconds": seconds, "tokens_per_s": args.seq_len / seconds, "peak_bytes": peak,
                      "cache_bytes": cache_bytes, "params": model.num_params()}))


def run_variant(args: argparse.Namespace, variant: str, chunk: int | None, save: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--save", str(save), "--preset", args.preset,
           "--seq-len", str(args.seq_len), "--device", args.device]
    cmd += ["--chunk", str(chunk)] if chunk else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def variants(args: argparse.Namespace) -> list[tuple[str, str, int | None]]:
    """(label, child variant, chunk) for every variant asked for."""
    out = []
    for v in args.variants.split(","):
        if v == "one-shot":
            out.append(("one-shot (all logits)", "one-shot", None))
        elif v == "one-shot-last":
            out.append(("one-shot, last logits", "prefill", None))
        elif v == "chunk":
            out += [(f"chunk {c}", "prefill", c) for c in args.chunks]
        else:
            raise SystemExit(f"unknown variant {v!r}: one-shot, one-shot-last, chunk")
    return out


def measure(args: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = None
        for label, variant, chunk in variants(args):
            save = Path(tmp) / f"{len(rows)}.pt"
            rec = run_variant(args, variant, chunk, save)
            outs = torch.load(save)
            ref = ref or outs
            rec.update(variant=label, chunk=chunk,
                       max_abs_logit_diff=float((outs["logits"] - ref["logits"]).abs().max()),
                       max_abs_cache_diff=max(float((outs[k] - ref[k]).abs().max()) for k in ("k0", "last")))
            rows.append(rec)
            print(json.dumps(rec), file=sys.stderr)
    return {"preset": args.preset, "seq_len": args.seq_len, "device": args.device, "threads": args.threads
            or torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or
            platform.machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows}


def table(record: dict) -> str:
    """The record as a markdown table, each variant relative to the first (one-shot)."""
    rows = record["rows"]
    base = rows[0]
    mib = 1 << 20
    lines = [f"{record['preset']} at T={record['seq_len']:,} on {record['device']} ({record['threads']} threads), "
             f"cache {base['cache_bytes'] / mib:,.0f} MiB",
             "", "| variant | tokens/s | speed vs one-shot | prefill peak memory | memory vs one-shot | "
             "max abs logit diff | max abs cache diff |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
                     f" | {r['peak_bytes'] / mib:,.0f} MiB | {r['peak_bytes'] / base['peak_bytes']:.2f}x | "
                     f"{r['max_abs_logit_diff']:.1e} | {r['max_abs_cache_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset; its max_seq_len is raised to --seq-len")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--chunks", type=lambda s: [int(c) for c in s.split(",")], default=[512, 2048])
    p.add_argument("--variants", default="one-shot,one-shot-last,chunk")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="write the record (JSON) here, e.g. results/long-prefill/DATE-small-8k.json")
    p.add_argument("--report", metavar="RECORD", help="print the table of a kept record and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.report:
        return print(table(json.loads(Path(args.report).read_text())))
    record = measure(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(table(record))


if __name__ == "__main__":
    main()
