"""Training-step throughput of KunlunBaize vs. the all-switches-off LLaMA-style baseline, side by side.

Every variant has the same width, depth and vocabulary; rounds interleave the variants so machine
noise hits them alike, and the median over rounds is reported. Achieved FLOP/s uses the analytic
training FLOPs per token of ``ModelConfig.flops_per_token``.

    python benchmarks/model_step.py                       # small preset, CPU
    python benchmarks/model_step.py --preset tiny --rounds 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from kunlunbaize import KunlunBaize, ModelConfig

VARIANTS = {
    "full KunlunBaize": {},
    "- dense residual": {"dense_residual": False},
    "- TransformerX": {"transformerx": False},
    "- MTP": {"mtp_depth": 0},
    "all off (LLaMA)": {"dense_residual": False, "transformerx": False, "mtp_depth": 0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    runs = {}
    for name, overrides in VARIANTS.items():
        cfg = ModelConfig.preset(args.preset, max_seq_len=max(args.seq_len, 8), **overrides)
        torch.manual_seed(0)
        model = KunlunBaize(cfg).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), device=dev)
        runs[name] = dict(cfg=cfg, model=model, opt=opt, x=x, rates=[])

    def step(r: dict) -> None:
        out = r["model"](r["x"], labels=r["x"])
        r["opt"].zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(r["model"].parameters(), 1.0)
        r["opt"].step()

    for r in runs.values():  # warm-up
        step(r)
    tokens = args.batch_size * args.seq_len * args.steps
    for _ in range(args.rounds):
        for r in runs.values():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(r)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            r["rates"].append(tokens / (time.perf_counter() - t0))

    base = runs["all off (LLaMA)"]
    base_rate = statistics.median(base["rates"])
    print(f"preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, {args.rounds} rounds x "
          f"{args.steps} steps, device {dev} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print()
    print("| variant | params | train GFLOP/token | tokens/s (median) | tokens/s vs LLaMA | achieved GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        cfg: ModelConfig = r["cfg"]
        rate = statistics.median(r["rates"])
        fpt = cfg.flops_per_token(args.seq_len, training=True)
        print(f"| {name} | {cfg.num_params() / 1e6:.2f}M | {fpt / 1e9:.3f} | {rate:,.0f} | "
              f"{rate / base_rate:.2f}x | {rate * fpt / 1e9:.1f} |")


if __name__ == "__main__":
    main()
