"""The matrix products of batch-1 decoding in both orientations: ``x @ W.T`` (``F.linear``) and ``(W @ x.T).T``.

For each row count (1 token decoding; k + 1 tokens verifying k drafts) times, side by side in interleaved rounds,
one pass over the weights of one decoding step of a preset: every projection of every block, of the MTP depths
and the output head, each multiplied by ``rows`` fresh activations. Reports microseconds per pass (median) and
the cost relative to one row, for both orientations of the same product, and which one
:func:`kunlunbaize.model.layers.linear` picks (docs/reports/BENCHMARKS.md, "Small-row matrix products").

    python benchmarks/small_gemm.py                       # small preset, rows 1-8
    python benchmarks/small_gemm.py --preset tiny --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kunlunbaize import ModelConfig
from kunlunbaize.model import KunlunBaize, layers


def decode_weights(cfg: ModelConfig) -> list[torch.Tensor]:
    """The 2-D weights one decoding step multiplies (every matrix of the model but the embedding)."""
    model = KunlunBaize(cfg)
    embed = model.embed.weight
    return [p.detach() for n, p in model.named_parameters() if p.dim() == 2 and p is not embed] + (
        [embed.detach()] if cfg.tie_embeddings else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20, help="passes timed per orientation per row count per round")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset)
    weights = decode_weights(cfg)
    mb = sum(w.numel() * w.element_size() for w in weights) / 1e6

    def one_pass(fn, xs: dict[int, torch.Tensor]) -> None:
        for w in weights:
            fn(xs[w.shape[1]], w)

    def streamed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.mm(w, x.t()).t().contiguous()  # layers.linear's form for 2..SMALL_ROWS rows

    kinds = {"F.linear": F.linear, "(W @ x.T).T": streamed}
    times: dict[tuple[str, int], list[float]] = {(k, r): [] for k in kinds for r in args.rows}
    inputs = {r: {d: torch.randn(r, d) for d in {w.shape[1] for w in weights}} for r in args.rows}
    for _ in range(2):  # warm-up
        for fn in kinds.values():
            for r in args.rows:
                one_pass(fn, inputs[r])
    for _ in range(args.rounds):
        for r in args.rows:
            for kind, fn in kinds.items():
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    one_pass(fn, inputs[r])
                times[(kind, r)].append((time.perf_counter() - t0) / args.reps)
    med = {key: statistics.median(v) * 1e6 for key, v in times.items()}
    print(f"preset {args.preset}: {len(weights)} weight matrices, {mb:.1f} MB fp32 per pass; "
          f"{args.rounds} rounds x {args.reps} passes; {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| rows | x @ W.T (F.linear), µs | vs 1 row | (W @ x.T).T, µs | vs 1 row | (W @ x.T).T / F.linear | "
          "layers.linear uses |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    first, second = kinds
    for r in args.rows:
        cells = " | ".join(f"{med[(k, r)]:,.0f} | {med[(k, r)] / med[(k, args.rows[0])]:.2f}x" for k in kinds)
        used = "(W @ x.T).T" if 1 < r <= layers.SMALL_ROWS else "F.linear"
        print(f"| {r} | {cells} | {med[(second, r)] / med[(first, r)]:.2f}x | {used} |")

if __name__ == "__main__":
    main()
