"""Training-step throughput of KunlunBaize vs. the all-switches-off LLaMA-style baseline, side by side.

Every variant has the same width, depth and vocabulary and trains through ``kunlun train``'s own step
(``kunlunbaize.train.step.train_step``, its optimiser builder and its precision: bf16 autocast on a GPU, fp32 on
the CPU, or ``--dtype``) and loss path (``--loss chunked``: eq. 22 without [B, T, V] logits; ``--loss logits``
for the logits path). Rounds
interleave the variants so machine noise hits them alike; the median over rounds is reported. Achieved
FLOP/s uses the analytic training FLOPs per token of ``ModelConfig.flops_per_token``.

A second table times the dense residual at depth (``--deep``, default 48 layers): the full model with
and without it, to measure its overhead. ``--profile`` adds a ``torch.profiler`` breakdown of one step
of the full model and of the baseline, by kind of work.

    python benchmarks/model_step.py                       # small preset, CPU
    python benchmarks/model_step.py --preset tiny --rounds 3 --deep 8
    python benchmarks/model_step.py --profile --deep 0
    python benchmarks/model_step.py --compile --deep 0    # + the full model and the baseline, blocks compiled

With ``--compile`` the compiled rows race in the same rounds as the eager ones; their "vs LLaMA" columns are
relative to the compiled baseline (like for like).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import defaultdict

import torch

from kunlunbaize import KunlunBaize, ModelConfig
from kunlunbaize.train.optim import build_optimizer
from kunlunbaize.train.step import precision, resolve_dtype, train_step

VARIANTS = {
    "full KunlunBaize": {},
    "- dense residual": {"dense_residual": False},
    "- TransformerX": {"transformerx": False},
    "- MTP": {"mtp_depth": 0},
    "all off (LLaMA)": {"dense_residual": False, "transformerx": False, "mtp_depth": 0},
}
BASELINE = "all off (LLaMA)"

# torch.profiler op names → the kind of work, for the breakdown (first match wins; the rest is "other"). An op
# matches a name ending in "::", "_", "." or " " by prefix, any other name exactly (up to a trailing "_": in-place).
KINDS = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention (SDPA)", ("aten::_scaled_dot_product_", "aten::scaled_dot_product_attention")),
    ("convolution", ("aten::convolution", "aten::_convolution", "aten::mkldnn_convolution",
                     "aten::convolution_backward", "aten::_conv_depthwise2d")),
    ("loss: softmax, exp, log", ("aten::_softmax", "aten::_log_softmax", "aten::logsumexp", "aten::exp", "aten::amax",
                                 "aten::nll_loss_", "_LinearCrossEntropy")),
    ("optimizer", ("Optimizer.", "aten::_foreach_", "aten::lerp", "aten::addcdiv", "aten::addcmul")),
    ("norms", ("aten::_fused_rms_norm", "aten::rms_norm", "aten::_fused_rms_norm_backward")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::sigmoid", "aten::silu", "aten::neg",
                     "aten::pow", "aten::sum", "aten::where", "aten::fill", "aten::zero", "aten::clamp", "aten::sqrt",
                     "aten::sigmoid_backward", "aten::silu_backward")),
    ("inductor's fused kernels (compiled)", ("## Call CompiledFxGraph ",)),
    ("copies / layout", ("aten::copy", "aten::cat", "aten::stack", "aten::clone", "aten::contiguous",
                         "aten::index", "aten::embedding", "aten::_to_copy", "aten::unfold")),
]


def kind_of(op: str) -> str:
    name = op.rstrip("_") if not op.endswith("__") else op
    for kind, names in KINDS:
        if any(name.startswith(n) if n.endswith(("::", "_", ".", " ")) else name == n for n in names):
            return kind
    return "other"


def build(preset: str, seq_len: int, batch_size: int, device: torch.device, compile: bool = False,
          dtype: str = "auto", **overrides) -> dict:
    """A model of ``preset`` with ``overrides``, its optimiser, precision and a batch of random tokens."""
    cfg = ModelConfig.preset(preset, max_seq_len=max(seq_len, 8), **overrides)
    torch.manual_seed(0)
    model = KunlunBaize(cfg).to(device)
    if compile:  # as `kunlun train --compile`: each block compiled (regional compilation)
        for block in model.blocks:
            block.compile()
    opt = build_optimizer(model, lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device)
    return dict(cfg=cfg, model=model, opt=opt, x=x, rates=[],
                autocast=precision(device, resolve_dtype(dtype, device)))


def step(r: dict, chunked: bool) -> None:
    """One optimiser step of ``kunlun train`` on the run's batch."""
    train_step(r["model"], r["opt"], [r["x"]], grad_clip=1.0, autocast=r["autocast"],
               loss_kwargs={"logits": not chunked})


def race(runs: dict[str, dict], rounds: int, steps: int, chunked: bool, device: torch.device) -> None:
    """Append tokens/s per round to each run's ``rates``, the variants interleaved within every round."""
    for r in runs.values():  # warm-up
        step(r, chunked)
    for _ in range(rounds):
        for r in runs.values():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(r, chunked)
            if device.type == "cuda":
                torch.cuda.synchronize()
            r["rates"].append(r["x"].numel() * steps / (time.perf_counter() - t0))


def breakdown(r: dict, chunked: bool) -> dict[str, float]:
    """Self time (ms) of one training step by kind of work."""
    from torch.profiler import ProfilerActivity, profile

    step(r, chunked)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(r, chunked)
    out: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        out[kind_of(ev.key)] += ev.self_cpu_time_total / 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--loss", choices=("chunked", "logits"), default="chunked")
    ap.add_argument("--deep", type=int, default=48, help="layers of the dense-residual overhead table (0: skip)")
    ap.add_argument("--deep-batch-size", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="a torch.profiler breakdown of one step")
    ap.add_argument("--compile", action="store_true",
                    help="also the full model and the baseline with each block compiled, as kunlun train --compile "
                         "(and the --deep table compiled)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                    help="as kunlun train --dtype (auto: bf16 autocast on a GPU, fp32 on the CPU)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    chunked = args.loss == "chunked"

    runs = {name: build(args.preset, args.seq_len, args.batch_size, dev, False, args.dtype, **o)
            for name, o in VARIANTS.items()}
    if args.compile:
        runs |= {f"{name}, compiled": build(args.preset, args.seq_len, args.batch_size, dev, True, args.dtype,
                                            **VARIANTS[name])
                 for name in ("full KunlunBaize", BASELINE)}
    race(runs, args.rounds, args.steps, chunked, dev)

    def baseline(name: str) -> str:
        return f"{BASELINE}, compiled" if name.endswith(", compiled") else BASELINE

    print(f"preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, {args.loss} loss, "
          f"{resolve_dtype(args.dtype, dev)}, "
          f"{'eager and compiled blocks, ' if args.compile else ''}{args.rounds} "
          f"rounds x {args.steps} steps, device {dev} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print()
    print("| variant | params | train GFLOP/token | tokens/s (median) | tokens/s vs LLaMA | achieved GFLOP/s "
          "| FLOP/s vs LLaMA |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        cfg: ModelConfig = r["cfg"]
        rate = statistics.median(r["rates"])
        fpt = cfg.flops_per_token(args.seq_len, training=True)
        base_rate = statistics.median(runs[baseline(name)]["rates"])
        base_flops = base_rate * runs[baseline(name)]["cfg"].flops_per_token(args.seq_len, training=True)
        print(f"| {name} | {cfg.num_params() / 1e6:.2f}M | {fpt / 1e9:.3f} | {rate:,.0f} | "
              f"{rate / base_rate:.2f}x | {rate * fpt / 1e9:.1f} | {rate * fpt / base_flops:.2f}x |")

    if args.profile:
        profiled = [name for name in runs if name.startswith(("full KunlunBaize", BASELINE))]
        parts = {name: breakdown(runs[name], chunked) for name in profiled}
        kinds = [k for k, _ in KINDS] + ["other"]
        print("\none training step by kind of work (torch.profiler self time, ms; profiler overhead included)\n")
        print("| kind | " + " | ".join(parts) + " |")
        print("|---|" + "---:|" * len(parts))
        for kind in kinds:
            print(f"| {kind} | " + " | ".join(f"{p[kind]:,.0f} ({p[kind] / sum(p.values()):.0%})"
                                               for p in parts.values()) + " |")
        print("| total | " + " | ".join(f"{sum(p.values()):,.0f}" for p in parts.values()) + " |")

    if args.deep:
        for r in runs.values():
            del r["model"], r["opt"]
        deep = {f"{args.deep} layers, {label}": build(args.preset, args.seq_len, args.deep_batch_size, dev,
                                                      args.compile, args.dtype, n_layers=args.deep,
                                                      dense_residual=on)
                for label, on in (("dense residual", True), ("identity skips", False))}
        race(deep, args.rounds, args.steps, chunked, dev)
        on, off = (r["rates"] for r in deep.values())
        paired = statistics.median(b / a for a, b in zip(on, off, strict=True))  # same round: same machine state
        print(f"\ndense residual at depth: full model, {args.deep} layers, batch {args.deep_batch_size} x "
              f"{args.seq_len}\n")
        print("| variant | tokens/s (median) | tokens/s per round |")
        print("|---|---:|---|")
        for name, r in deep.items():
            print(f"| {name} | {statistics.median(r['rates']):,.0f} | {', '.join(f'{x:,.0f}' for x in r['rates'])} |")
        print(f"\ndense-residual overhead at {args.deep} layers: {paired - 1:+.1%} of step time (median over rounds "
              "of the step-time ratio within a round)")


if __name__ == "__main__":
    main()
