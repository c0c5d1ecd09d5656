"""Side by side on the same data and token budget: KunlunBaize vs. a matched HF Llama vs. each switch off.

Every variant runs through the same training loop (`kunlunbaize.train.train`) with the same seed,
schedule, batch and validation windows. Reports the final validation loss (next-token
cross-entropy, nats/token), training tokens/s and parameters, as a Markdown table and a figure.
One seed, one budget: `kunlun ablate` is the full study (several seeds, equal FLOPs, evaluation).

    python benchmarks/train_vs_llama.py                          # small preset, embedded corpus
    python benchmarks/train_vs_llama.py --tokens 200000 --variants full llama
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from kunlunbaize.ablate.plan import VARIANTS
from kunlunbaize.train.logging import read_metrics
from kunlunbaize.train.trainer import DEFAULT_DATA, TrainConfig, train

LABELS = {name: v.label for name, v in VARIANTS.items()}


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        vals = [x for x in r["records"] if "val_loss" in x]
        ax1.plot([x["tokens"] / 1e6 for x in vals], [x["val_loss"] for x in vals], "o-", ms=3, label=LABELS[name])
    ax1.set_xlabel("tokens (millions)")
    ax1.set_ylabel("validation loss (nats/token)")
    ax1.set_title("validation loss, same data and budget")
    ax1.grid(alpha=0.3)
    ax1.legend()
    names = list(results)
    finals = [results[n]["val_loss"] for n in names]
    ax2.bar([LABELS[n] for n in names], finals, color=["C0", "C1", "C2", "C3", "C4"][: len(names)])
    lo = min(finals)
    ax2.set_ylim(lo - 0.15 * (max(finals) - lo + 0.05), max(finals) + 0.05)
    for i, v in enumerate(finals):
        ax2.text(i, v, f"{v:.3f}", ha="center", va="bottom")
    ax2.set_ylabel("final validation loss")
    ax2.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--out", default="runs/train_vs_llama")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=TrainConfig.tokens)
    ap.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()

    out = Path(args.out)
    results: dict[str, dict] = {}
    for name in args.variants:
        arch, overrides = VARIANTS[name].arch, dict(VARIANTS[name].switch)
        run = out / name
        cfg = TrainConfig(data=args.data, out=str(run), preset=args.preset, model_overrides=overrides, arch=arch,
                          seq_len=args.seq_len, tokens=args.tokens, batch_size=args.batch_size, lr=args.lr,
                          eval_every=args.eval_every, ckpt_every=10**9, resume="auto", progress=False)
        t0 = time.time()
        summary = train(cfg)
        records = read_metrics(run / "metrics.jsonl")
        rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:] or [float("nan")]
        results[name] = {"val_loss": summary["val_loss"], "tokens_per_s": statistics.median(rates),
                         "wall_s": time.time() - t0, "records": records, "params": summary["params"]}
        print(f"{name}: val {summary['val_loss']:.4f}  {results[name]['tokens_per_s']:,.0f} tok/s", flush=True)

    base = results.get("llama") or next(iter(results.values()))
    print(f"\npreset {args.preset}, {args.tokens:,} tokens, batch {args.batch_size} x {args.seq_len}, lr {args.lr}, "
          f"data {args.data}; {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.machine()}\n")
    print("| variant | params | final val loss | Δ vs Llama | train tokens/s | tokens/s vs Llama |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {LABELS[name]} | {r['params'] / 1e6:.2f}M | {r['val_loss']:.4f} | "
              f"{r['val_loss'] - base['val_loss']:+.4f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
    plot(results, out / "train_vs_llama.png")
    print(f"\nfigure: {out / 'train_vs_llama.png'}")


if __name__ == "__main__":
    main()
