"""One-GPU suite: correctness, training throughput and MFU, dense-residual overhead, decoding, a short `kunlun train`.

Made for a machine with one NVIDIA GPU and no network (PyTorch, transformers and tokenizers installed). It runs
the sections below one after another, each inside its own time budget (a section that runs out of time is
stopped and reported as SKIPPED with what it measured so far; one that raises is reported as FAILED with the
reason, and the others still run), so that the whole suite ends within 9 minutes. It prints a Markdown table and
writes every figure to a JSON file.

1. correctness: a full forward's logits equal prefill + token-by-token cached decoding, in fp32 and in bf16
   (looser tolerance; both relative to the largest logit), and MTP self-speculative greedy decoding
   (`kunlunbaize.infer.speculative_generate`) is token-identical to plain greedy (`kunlunbaize.infer.generate`);
2. training throughput at the `125m` preset with bf16 autocast and `torch.compile` (each block, as
   `kunlun train --compile`), each step `kunlun train`'s own `kunlunbaize.train.step.train_step` with its model
   and optimiser builders: KunlunBaize (chunked loss, `model(x, labels=x, logits=False)`) vs. the matched HF
   transformers Llama of `kunlunbaize.arch.llama`; tokens/s, achieved TFLOP/s from the analytic FLOPs,
   MFU against the GPU's datasheet bf16 peak (`kunlunbaize.train.distributed.peak_flops`); rounds interleaved,
   medians;
3. dense-residual overhead at 48 layers (the `125m` width): training step time with and without it (goal <= 5%);
4. batch-1 decoding: plain cached greedy (eager, and through a `StaticDecoder`: the step compiled at fixed shapes,
   CUDA graphs by `mode="reduce-overhead"`) vs. MTP self-speculative greedy (draft D and adaptive) vs. transformers'
   `generate` of the same weights exported to HF (`benchmarks/decode.py`'s `hf_twin`); random weights, so the
   speculative figures show its cost with next to no accepted drafts (tokens per trunk forward reported);
5. `kunlun prepare` of part of the bundled corpus (the Python standard library) into a temporary folder at the
   start, then a short `kunlun train` on it as a subprocess of the CLI: its tokens/s, MFU and final validation loss.

The exit status is 1 when a correctness check failed (or the correctness section could not run), 2 on a usage
error (no GPU without ``--cpu-smoke``), 0 otherwise; speed goals that are missed are reported, not failed.

    bash benchmarks/gpu_suite.sh                                    # on the GPU machine: <= 9 min
    bash benchmarks/gpu_suite.sh --out runs/gpu_suite.json --sections correctness decode
    bash benchmarks/gpu_suite.sh --cpu-smoke --out /tmp/gpu_suite_smoke.json   # every section, tiny sizes, CPU
    python benchmarks/gpu_suite.py --help                           # the same, with PYTHONPATH=src
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kunlunbaize import KunlunBaize, ModelConfig
from kunlunbaize.arch import BASELINE, DEFAULT, ArchSpec
from kunlunbaize.infer import StaticDecoder, generate, speculative_generate
from kunlunbaize.train.config import TrainConfig
from kunlunbaize.train.distributed import peak_flops
from kunlunbaize.train.models import build_model
from kunlunbaize.train.optim import build_optimizer
from kunlunbaize.train.step import precision, train_step

ROOT = Path(__file__).resolve().parent.parent
# The suite's clock starts when gpu_suite.sh started (it exports GPU_SUITE_T0), else when this module was imported.
T_START = time.monotonic() - max(0.0, time.time() - float(os.environ.get("GPU_SUITE_T0") or time.time()))


# ---------------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Profile:
    """Sizes, dtypes and time budgets of one mode of the suite (the GPU run or the CPU smoke run)."""

    mode: str
    device: str
    preset: str
    """Model preset of sections 1–4."""
    compile: bool
    amp_bf16: bool
    """bf16 autocast in the training sections (2, 3)."""
    total_s: float
    """Time limit of the whole run, counted from the start of the process."""
    budgets: dict[str, float]
    # 1. correctness
    eq_batch: int
    eq_len: int
    eq_prompt: int
    fp32_tol: float
    bf16_tol: float
    spec_prompts: int
    spec_prompt_len: int
    spec_new_tokens: int
    # 2. training throughput
    batch: int
    seq_len: int
    steps: int
    rounds: int
    warmup: int
    # 3. dense residual
    dense_layers: int
    # 4. decoding
    decode_dtype: str
    decode_prompts: int
    decode_prompt_len: int
    decode_new_tokens: int
    decode_rounds: int
    decode_static: str  # torch.compile backend of the static plain step ("inductor"; "eager" in the CPU smoke run)
    decode_static_mode: str | None  # its torch.compile mode ("reduce-overhead": CUDA graphs)
    # 5. corpus and kunlun train
    prepare_bytes: int
    prepare_vocab: int
    prepare_workers: int
    train_preset: str
    train_tokens: int
    train_seq_len: int
    train_batch: int
    train_eval_every: int
    train_dtype: str


GPU = Profile(
    mode="gpu", device="cuda", preset="125m", compile=True, amp_bf16=True, total_s=525.0,
    budgets={"corpus": 35, "correctness": 45, "train_throughput": 125, "dense_residual": 95, "decode": 100,
             "cli_train": 105},
    eq_batch=2, eq_len=96, eq_prompt=32, fp32_tol=1e-4, bf16_tol=5e-2,
    spec_prompts=3, spec_prompt_len=16, spec_new_tokens=64,
    batch=8, seq_len=1024, steps=5, rounds=5, warmup=2,
    dense_layers=48,
    decode_dtype="bf16", decode_prompts=2, decode_prompt_len=16, decode_new_tokens=128, decode_rounds=2,
    decode_static="inductor", decode_static_mode="reduce-overhead",
    prepare_bytes=8_000_000, prepare_vocab=8192, prepare_workers=8,
    # batch and length as in section 2, so the compiled blocks can come from inductor's cache
    train_preset="125m", train_tokens=1_500_000, train_seq_len=1024, train_batch=8, train_eval_every=40,
    train_dtype="bf16",
)

SMOKE = Profile(
    mode="cpu-smoke", device="cpu", preset="tiny", compile=False, amp_bf16=False, total_s=170.0,
    budgets={"corpus": 25, "correctness": 25, "train_throughput": 25, "dense_residual": 20, "decode": 25,
             "cli_train": 40},
    eq_batch=2, eq_len=32, eq_prompt=16, fp32_tol=1e-4, bf16_tol=5e-2,
    spec_prompts=2, spec_prompt_len=8, spec_new_tokens=16,
    batch=4, seq_len=64, steps=2, rounds=3, warmup=1,
    dense_layers=4,
    decode_dtype="fp32", decode_prompts=2, decode_prompt_len=8, decode_new_tokens=16, decode_rounds=2,
    decode_static="eager", decode_static_mode=None,
    prepare_bytes=200_000, prepare_vocab=512, prepare_workers=1,
    train_preset="tiny", train_tokens=4096, train_seq_len=64, train_batch=8, train_eval_every=4,
    train_dtype="fp32",
)

# (name, title) in the order they run and are printed; the corpus is prepared first, for section 5.
SECTIONS: list[tuple[str, str]] = [
    ("corpus", "5a. corpus (kunlun prepare)"),
    ("correctness", "1. correctness"),
    ("train_throughput", "2. training throughput"),
    ("dense_residual", "3. dense residual overhead"),
    ("decode", "4. decoding, batch 1"),
    ("cli_train", "5b. kunlun train"),
]
PRINT_ORDER = ["correctness", "train_throughput", "dense_residual", "decode", "corpus", "cli_train"]


# ---------------------------------------------------------------------------------------------------- runner
class BudgetExceeded(BaseException):
    """Raised inside a section when its time budget is spent (a BaseException so no ``except Exception`` eats it)."""


class SectionSkipped(Exception):
    """Raised by a section that cannot run (e.g. what it needs failed); reported as SKIPPED with the message."""


@dataclass
class Section:
    """What one section measured: figures for the JSON, rows for the table, checks for the exit status."""

    name: str
    title: str
    budget_s: float
    status: str = "ok"
    """ok, FAILED (it raised) or SKIPPED (out of time, or could not run)."""
    reason: str = ""
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[list[str]] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    deadline: float = math.inf

    def remaining(self) -> float:
        """Seconds left of this section's budget."""
        return self.deadline - time.monotonic()

    def row(self, measurement: str, value: str, status: str = "") -> None:
        """Add a row to the table."""
        self.rows.append([measurement, value, status])

    def check(self, name: str, passed: bool, measurement: str, value: str) -> None:
        """Record a correctness check (pass/fail decides the exit status) and its row."""
        self.checks[name] = bool(passed)
        self.row(measurement, value, "pass" if passed else "FAIL")

    def to_json(self) -> dict[str, Any]:
        """The section's record in the JSON output."""
        return {"title": self.title, "status": self.status, "reason": self.reason, "seconds": round(self.seconds, 2),
                "budget_s": self.budget_s, "figures": self.figures, "checks": self.checks, "notes": self.notes,
                "rows": self.rows}


def _on_alarm(signum: int, frame: Any) -> None:
    raise BudgetExceeded


def run_section(sec: Section, fn: Callable[[Section], None], fail: bool = False) -> Section:
    """Run ``fn(sec)`` within ``sec.budget_s`` seconds: a hard timer stops it when the budget is spent (SKIPPED, the
    figures so far kept), an exception marks it FAILED with the reason; neither propagates."""
    sec.deadline = time.monotonic() + sec.budget_s
    t0 = time.monotonic()
    use_alarm = hasattr(signal, "setitimer") and sec.budget_s > 0
    previous = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
    try:
        try:
            if sec.budget_s <= 1:
                raise SectionSkipped("no time left in the suite's limit")
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, sec.budget_s)
            if fail:
                raise RuntimeError("failure injected with --fail-section")
            fn(sec)
        finally:  # the timer stops before any handler below runs, so none of them can be interrupted
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except BudgetExceeded:
        sec.status, sec.reason = "SKIPPED", f"exceeded its budget of {sec.budget_s:.0f} s (figures so far kept)"
    except SectionSkipped as e:
        sec.status, sec.reason = "SKIPPED", str(e)
    except Exception as e:
        sec.status, sec.reason = "FAILED", f"{type(e).__name__}: {_one_line(str(e))}"
        sec.notes.append(traceback.format_exc(limit=6))
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, previous)
        sec.seconds = time.monotonic() - t0
    _free_memory()
    return sec


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def correctness_passed(sections: dict[str, Section]) -> bool | None:
    """True when the correctness section ran and every check passed; None when it was not selected."""
    sec = sections.get("correctness")
    if sec is None:
        return None
    return sec.status == "ok" and bool(sec.checks) and all(sec.checks.values())


# ---------------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions (fp32 equivalence must compare fp32 arithmetic)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _fmt(x: float, digits: int = 3) -> str:
    """A number for the table: thousands separators for large ones, scientific for tiny ones."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) < 10 ** -(digits - 1):
        return f"{x:.1e}"
    return f"{x:.{digits}g}"


def _load_benchmark(name: str) -> Any:
    """A sibling script of ``benchmarks/`` as a module (to reuse its functions)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interleaved(runs: dict[str, Callable[[], None]], steps: int, rounds: int, warmup: int, device: torch.device,
                sec: Section) -> dict[str, list[float]]:
    """Seconds per call of each run, one entry per round, rounds interleaving the runs (after ``warmup`` calls each,
    which compile; their time goes to ``sec.figures["warmup_s"]``). Stops early, keeping at least one round, when the
    next round would not fit the budget."""
    for name, fn in runs.items():
        t0 = time.monotonic()
        for _ in range(warmup):
            fn()
        _sync(device)
        sec.figures.setdefault("warmup_s", {})[name] = time.monotonic() - t0
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        t_round = time.monotonic()
        for name, fn in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
        spent = time.monotonic() - t_round
        if r + 1 < rounds and sec.remaining() < 1.5 * spent + 2:
            sec.notes.append(f"stopped after {r + 1} of {rounds} rounds to stay in the budget")
            break
    return times


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, amp: bool,
                spec: ArchSpec) -> Callable[[], None]:
    """One optimizer step on ``x``: ``kunlun train``'s own ``train_step`` (forward with the training loss of
    ``spec``'s architecture, backward, clip, AdamW), in bf16 autocast when ``amp``."""
    autocast = precision(x.device, "bf16" if amp else "fp32")

    def step() -> None:
        train_step(model, opt, [x], grad_clip=1.0, autocast=autocast, loss_kwargs=spec.train_kwargs())

    return step


def _compile_blocks(model: torch.nn.Module) -> None:
    for block in model.blocks:
        block.compile()


# ---------------------------------------------------------------------------------------------------- 1. correctness
@torch.inference_mode()
def cache_equivalence(model: KunlunBaize, x: torch.Tensor, prompt_len: int) -> dict[str, float]:
    """Max |full-forward logits − (prefill of ``prompt_len`` tokens + one token at a time with the cache)|, the
    largest |logit| and the share of positions whose argmax agrees."""
    full = model(x, mtp=False).logits.float()
    cache = model.new_cache(x.shape[0], x.shape[1], mtp=False)
    parts = [model(x[:, :prompt_len], cache=cache, mtp=False).logits]
    for t in range(prompt_len, x.shape[1]):
        parts.append(model(x[:, t:t + 1], cache=cache, mtp=False).logits)
    inc = torch.cat(parts, 1).float()
    diff = (full - inc).abs().max().item()
    scale = full.abs().max().item()
    agree = (full.argmax(-1) == inc.argmax(-1)).float().mean().item()
    return {"max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / max(scale, 1e-12), "argmax_agree": agree}


def section_correctness(sec: Section, prof: Profile) -> None:
    """Cache equivalence in fp32 and bf16; speculative greedy == plain greedy (fp32)."""
    dev = torch.device(prof.device)
    cfg = ModelConfig.preset(prof.preset)
    torch.manual_seed(0)
    model = KunlunBaize(cfg).to(dev).eval()
    x = torch.randint(0, cfg.vocab_size, (prof.eq_batch, prof.eq_len), device=dev)
    sec.figures["model"] = {"preset": prof.preset, "params": model.num_params(), "batch": prof.eq_batch,
                            "tokens": prof.eq_len, "prefill": prof.eq_prompt}
    with _exact_fp32():
        r = cache_equivalence(model, x, prof.eq_prompt)
        sec.figures["cache_fp32"] = {**r, "tolerance_relative": prof.fp32_tol}
        sec.check("cache_fp32", r["relative"] <= prof.fp32_tol,
                  f"cache equivalence fp32 ({prof.eq_prompt}-token prefill + {prof.eq_len - prof.eq_prompt} "
                  "cached steps vs. full forward): max abs diff (relative to max logit; tolerance)",
                  f"{_fmt(r['max_abs_diff'])} ({_fmt(r['relative'])}; {prof.fp32_tol:g})")

        spec = speculative_equivalence(model, prof, dev)
        sec.figures["speculative"] = spec
        sec.check("speculative_greedy", spec["identical"] == spec["runs"],
                  f"MTP self-speculative greedy == plain greedy, fp32 ({spec['prompts']} prompts x "
                  f"{prof.spec_new_tokens} tokens; draft 1..{cfg.mtp_depth} and adaptive)",
                  f"{spec['identical']}/{spec['runs']} identical; {spec['tokens_per_trunk_forward']:.2f} "
                  "tokens / trunk forward (random weights)")

    model = model.to(torch.bfloat16)
    r = cache_equivalence(model, x, prof.eq_prompt)
    sec.figures["cache_bf16"] = {**r, "tolerance_relative": prof.bf16_tol}
    sec.check("cache_bf16", r["relative"] <= prof.bf16_tol,
              "cache equivalence bf16 (weights and cache in bf16): max abs diff (relative to max logit; tolerance); "
              "argmax agreement",
              f"{_fmt(r['max_abs_diff'])} ({_fmt(r['relative'])}; {prof.bf16_tol:g}); {r['argmax_agree']:.3f}")


def speculative_equivalence(model: KunlunBaize, prof: Profile, dev: torch.device) -> dict[str, Any]:
    """Decode random prompts with plain greedy and with speculative greedy at every draft length and adaptive."""
    D = model.config.mtp_depth
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (prof.spec_prompt_len,), generator=gen).tolist()
               for _ in range(prof.spec_prompts)]
    runs = identical = 0
    tpf: list[float] = []
    for p in prompts:
        ref = generate(model, [p], prof.spec_new_tokens).tokens[0]
        for k in [*range(1, D + 1), "adaptive"]:
            adaptive = k == "adaptive"
            out = speculative_generate(model, p, prof.spec_new_tokens, draft_len=None if adaptive else k,
                                       adaptive=adaptive)
            runs += 1
            identical += out.tokens[0] == ref
            tpf.append(out.stats["tokens_per_trunk_forward"])
    return {"prompts": len(prompts), "runs": runs, "identical": identical,
            "tokens_per_trunk_forward": statistics.mean(tpf) if tpf else float("nan")}


# ---------------------------------------------------------------------------------------------------- 2. throughput
def section_train_throughput(sec: Section, prof: Profile) -> None:
    """KunlunBaize (chunked loss) vs. the matched HF Llama: tokens/s, TFLOP/s, MFU, interleaved rounds."""
    dev = torch.device(prof.device)
    base = ModelConfig.preset(prof.preset)
    peak, peak_how = peak_flops(dev, torch.bfloat16 if prof.amp_bf16 else torch.float32)
    x = torch.randint(0, base.vocab_size, (prof.batch, prof.seq_len), device=dev)
    models: dict[str, dict[str, Any]] = {}
    for name, arch in (("KunlunBaize", DEFAULT.name), ("HF Llama (matched)", BASELINE.name)):
        torch.manual_seed(0)  # the model as `kunlun train` builds it
        model, cfg, spec = build_model(TrainConfig(preset=prof.preset, arch=arch, seq_len=prof.seq_len),
                                       base.vocab_size)
        model = model.to(dev).train()
        if prof.compile:
            _compile_blocks(model)
        opt = build_optimizer(model, lr=1e-4)
        models[name] = {"arch": arch, "step": _train_step(model, opt, x, prof.amp_bf16, spec),
                        "params": sum(p.numel() for p in model.parameters()),
                        "flops_per_token": spec.training_flops(cfg, prof.seq_len)}
    sec.figures["setup"] = {"preset": prof.preset, "batch": prof.batch, "seq_len": prof.seq_len,
                            "bf16_autocast": prof.amp_bf16, "compile": prof.compile, "peak_flops": peak,
                            "peak_source": peak_how}
    times = interleaved({n: m["step"] for n, m in models.items()}, prof.steps, prof.rounds, prof.warmup, dev, sec)
    tokens = prof.batch * prof.seq_len
    for name, m in models.items():
        step_s = statistics.median(times[name])
        tps = tokens / step_s
        flops = tps * m["flops_per_token"]
        mfu = flops / peak if peak and math.isfinite(peak) else float("nan")
        sec.figures[name] = {"params": m["params"], "train_flops_per_token": m["flops_per_token"],
                             "step_s": step_s, "tokens_per_s": tps, "tflops": flops / 1e12, "mfu": mfu,
                             "rounds": len(times[name])}
        sec.row(f"{name}: {m['params'] / 1e6:.1f}M params, {_fmt(m['flops_per_token'] / 1e9)} GFLOP/token (train)",
                f"{_fmt(tps)} tokens/s; {flops / 1e12:.3g} TFLOP/s; MFU {mfu:.1%}")
    k, ll = sec.figures["KunlunBaize"], sec.figures["HF Llama (matched)"]
    sec.figures["mfu_ratio"] = k["mfu"] / ll["mfu"] if ll["mfu"] else float("nan")
    sec.figures["tokens_per_s_ratio"] = k["tokens_per_s"] / ll["tokens_per_s"]
    sec.row("KunlunBaize / Llama", f"MFU {sec.figures['mfu_ratio']:.2f}x; tokens/s "
            f"{sec.figures['tokens_per_s_ratio']:.2f}x")
    warm = "; ".join(f"{n} {t:.0f} s" for n, t in sec.figures["warmup_s"].items())
    sec.row("setup", f"batch {prof.batch} x {prof.seq_len}, {'bf16 autocast' if prof.amp_bf16 else 'fp32'}, "
            f"{'torch.compile per block' if prof.compile else 'eager'}, median of {len(times['KunlunBaize'])} "
            f"rounds x {prof.steps} steps; peak {peak / 1e12:.3g} TFLOP/s ({peak_how}); warm-up ({prof.warmup} "
            f"steps{', compiling' if prof.compile else ''}): {warm}")


# ---------------------------------------------------------------------------------------------------- 3. dense
def section_dense_residual(sec: Section, prof: Profile) -> None:
    """Step time of the same config at ``dense_layers`` layers with and without the dense residual."""
    dev = torch.device(prof.device)
    batch = prof.batch
    while True:
        try:
            _dense_measure(sec, prof, dev, batch)
            return
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        _free_memory()  # outside the handler: its traceback no longer holds the models
        sec.notes.append(f"out of memory at batch {batch}: measured at batch {batch // 2}")
        batch //= 2


def _dense_measure(sec: Section, prof: Profile, dev: torch.device, batch: int) -> None:
    base = ModelConfig.preset(prof.preset)
    runs: dict[str, Callable[[], None]] = {}
    params: dict[str, int] = {}
    x = torch.randint(0, base.vocab_size, (batch, prof.seq_len), device=dev)
    for name, dense in (("dense residual on", True), ("dense residual off", False)):
        cfg = ModelConfig.preset(prof.preset, n_layers=prof.dense_layers, dense_residual=dense,
                                 max_seq_len=max(base.max_seq_len, prof.seq_len))
        torch.manual_seed(0)
        model = KunlunBaize(cfg).to(dev).train()
        if prof.compile:
            _compile_blocks(model)
        opt = build_optimizer(model, lr=1e-4)
        runs[name] = _train_step(model, opt, x, prof.amp_bf16, DEFAULT)
        params[name] = model.num_params()
    times = interleaved(runs, prof.steps, prof.rounds, prof.warmup, dev, sec)
    on, off = statistics.median(times["dense residual on"]), statistics.median(times["dense residual off"])
    overhead = on / off - 1
    sec.figures.update({"n_layers": prof.dense_layers, "preset_width": prof.preset, "batch": batch,
                        "seq_len": prof.seq_len, "step_s_on": on, "step_s_off": off, "ratio": on / off,
                        "overhead": overhead, "goal_overhead": 0.05, "goal_met": overhead <= 0.05,
                        "rounds": len(times["dense residual on"]), "params_on": params["dense residual on"],
                        "params_off": params["dense residual off"]})
    sec.row(f"step time, {prof.dense_layers} layers ({prof.preset} width), batch {batch} x {prof.seq_len}: on / off",
            f"{on * 1e3:.1f} ms / {off * 1e3:.1f} ms")
    sec.row("dense-residual overhead (goal <= 5%)", f"{overhead:+.1%} (ratio {on / off:.3f})",
            "goal met" if overhead <= 0.05 else "goal not met")


# ---------------------------------------------------------------------------------------------------- 4. decoding
def section_decode(sec: Section, prof: Profile) -> None:
    """Batch-1 tokens/s of plain greedy, speculative greedy (draft D, adaptive) and HF generate, same weights."""
    dev = torch.device(prof.device)
    dtype = _dtype(prof.decode_dtype)
    torch.manual_seed(0)
    model = KunlunBaize(ModelConfig.preset(prof.preset)).to(dev).eval()
    D = model.config.mtp_depth
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    hf = _load_benchmark("decode").hf_twin(model, prof.device)
    model = model.to(dtype)
    if hf is not None:
        hf = hf.to(dtype)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, model.config.vocab_size, (prof.decode_prompt_len,), generator=gen).tolist()
               for _ in range(prof.decode_prompts)]
    n = prof.decode_new_tokens
    stats: dict[str, list[dict[str, float]]] = {}

    def plain(p: list[int]) -> list[int]:
        return generate(model, [p], n).tokens[0]

    def spec(p: list[int], adaptive: bool, name: str) -> list[int]:
        out = speculative_generate(model, p, n, adaptive=adaptive)
        stats.setdefault(name, []).append(out.stats)
        return out.tokens[0]

    variants: dict[str, Callable[[list[int]], list[int]]] = {"plain cached greedy": plain}
    static = StaticDecoder(model, 1, mode=prof.decode_static_mode, backend=prof.decode_static)
    static_name = f"plain greedy, static compiled ({prof.decode_static_mode or prof.decode_static})"
    variants[static_name] = lambda p: generate(model, [p], n, decoder=static).tokens[0]
    if D:
        variants[f"MTP speculative greedy, draft {D}"] = lambda p: spec(p, False, f"MTP speculative greedy, draft {D}")
        variants["MTP speculative greedy, adaptive"] = lambda p: spec(p, True, "MTP speculative greedy, adaptive")
    if hf is not None:
        def hf_generate(p: list[int]) -> list[int]:
            ids = torch.tensor([p], device=dev)
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   do_sample=False)[0, len(p):].tolist()
        variants["HF generate (exported model)"] = hf_generate
    else:
        sec.notes.append("transformers missing: no HF generate figure")

    reference = {i: plain(p) for i, p in enumerate(prompts)}  # also the warm-up
    try:  # compile (and, with CUDA graphs, record) the static step first: its failure must not cost the others
        variants[static_name](prompts[0][:4])
    except Exception as e:
        del variants[static_name]
        sec.notes.append(f"static compiled decoding failed: {_one_line(f'{type(e).__name__}: {e}')}")
    for fn in variants.values():
        fn(prompts[0][:4])
    stats.clear()
    same = {name: True for name in variants}
    counts: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(prof.decode_rounds):
        t_round = time.monotonic()
        for name, fn in variants.items():
            _sync(dev)
            t0, count = time.perf_counter(), 0
            for i, p in enumerate(prompts):
                tokens = fn(p)
                same[name] &= tokens == reference[i]
                count += len(tokens)
            _sync(dev)
            counts[name].append(count / (time.perf_counter() - t0))
        if r + 1 < prof.decode_rounds and sec.remaining() < 1.5 * (time.monotonic() - t_round) + 2:
            sec.notes.append(f"stopped after {r + 1} of {prof.decode_rounds} rounds to stay in the budget")
            break
    base = statistics.median(counts["plain cached greedy"])
    for name in variants:
        rate = statistics.median(counts[name])
        tpf = statistics.mean(s["tokens_per_trunk_forward"] for s in stats[name]) if name in stats else 1.0
        sec.figures[name] = {"tokens_per_s": rate, "vs_plain": rate / base, "tokens_per_trunk_forward": tpf,
                             "identical_to_plain": same[name], "rounds": len(counts[name])}
        sec.row(name, f"{_fmt(rate)} tokens/s ({rate / base:.2f}x plain); {tpf:.2f} tokens / trunk forward",
                "" if same[name] else "output differs from plain greedy")
    sec.figures["setup"] = {"preset": prof.preset, "dtype": prof.decode_dtype, "prompts": len(prompts),
                            "prompt_len": prof.decode_prompt_len, "new_tokens": n, "weights": "random"}
    sec.row("setup", f"{prof.preset} random weights, {prof.decode_dtype}, {len(prompts)} prompts x {n} new tokens, "
            "median of rounds; random weights accept almost no drafts (speculation shows its cost only: a "
            "trained checkpoint is needed for its speed-up, e.g. benchmarks/decode.py --checkpoint)")


# ---------------------------------------------------------------------------------------------------- 5. kunlun train
def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run_cli(args: list[str], sec: Section, log: Path) -> subprocess.CompletedProcess:
    """``python -m kunlunbaize.cli ARGS`` with the section's remaining time as timeout; output to ``log``."""
    timeout = sec.remaining() - 3  # the subprocess's own timeout comes before the section's timer
    if timeout <= 1:
        raise BudgetExceeded
    with log.open("w") as fh:
        try:
            proc = subprocess.run([sys.executable, "-m", "kunlunbaize.cli", *args], stdout=fh,
                                  stderr=subprocess.STDOUT, env=_child_env(), cwd=ROOT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise BudgetExceeded from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"kunlun {args[0]} exited {proc.returncode}: {' | '.join(tail)}")
    return proc


def section_corpus(sec: Section, prof: Profile, work: Path) -> None:
    """``kunlun prepare`` of the first ``prepare_bytes`` of the bundled corpus (Python standard library)."""
    data = work / "data"
    t0 = time.monotonic()
    workers = min(prof.prepare_workers, os.cpu_count() or 1)
    _run_cli(["prepare", "--out", str(data), "--max-bytes", str(prof.prepare_bytes), "--vocab-size",
              str(prof.prepare_vocab), "--workers", str(workers)], sec, work / "prepare.log")
    meta = json.loads((data / "meta.json").read_text())
    sec.figures.update({"data": str(data), "seconds": time.monotonic() - t0, "vocab_size": meta["vocab_size"],
                        "train_tokens": meta["splits"]["train"]["tokens"],
                        "val_tokens": meta["splits"].get("val", {}).get("tokens", 0),
                        "max_bytes": prof.prepare_bytes})
    sec.row(f"Python standard library, first {prof.prepare_bytes / 1e6:g} MB, BPE vocabulary {meta['vocab_size']}",
            f"{_fmt(sec.figures['train_tokens'])} train / {_fmt(sec.figures['val_tokens'])} val tokens in "
            f"{sec.figures['seconds']:.1f} s")


def section_cli_train(sec: Section, prof: Profile, work: Path, corpus: Section | None) -> None:
    """A short ``kunlun train`` subprocess on the prepared corpus: tokens/s, MFU, final validation loss."""
    if corpus is None or corpus.status != "ok":
        raise SectionSkipped(f"no corpus (section corpus: {corpus.status if corpus else 'not run'})")
    run = work / "run"
    args = ["train", "--data", corpus.figures["data"], "--out", str(run), "--preset", prof.train_preset,
            "--tokens", str(prof.train_tokens), "--seq-len", str(prof.train_seq_len),
            "--batch-size", str(prof.train_batch), "--batch-size-start", str(prof.train_batch),
            "--eval-every", str(prof.train_eval_every), "--eval-batches", "4", "--log-every", "5",
            "--ckpt-every", str(10**9), "--no-progress", "--sample-tokens", "0", "--device", prof.device,
            "--dtype", prof.train_dtype, *(["--compile"] if prof.compile else [])]
    sec.figures["command"] = "kunlun " + " ".join(args)
    t0 = time.monotonic()
    try:
        _run_cli(args, sec, work / "train.log")
    finally:
        sec.figures["wall_s"] = time.monotonic() - t0
        _train_figures(sec, run)
        if not (run / "summary.json").is_file() and "tokens_per_s" in sec.figures:
            sec.row("until it was stopped (no summary)", f"{_fmt(sec.figures['tokens_per_s'])} tokens/s; MFU "
                    f"{_pct(sec.figures.get('mfu'))}; wall {sec.figures['wall_s']:.0f} s")
    summary = json.loads((run / "summary.json").read_text())
    sec.figures.update({"val_loss": summary.get("val_loss"), "first_val_loss": summary.get("first_val_loss"),
                        "steps": summary.get("step"), "tokens": summary.get("tokens"), "params": summary.get("params")})
    f = sec.figures
    sec.row(f"{prof.train_preset}, {_fmt(f['tokens'])} tokens ({f['steps']} steps of {prof.train_batch} x "
            f"{prof.train_seq_len}), {prof.train_dtype}{', --compile' if prof.compile else ''}",
            f"{_fmt(f.get('tokens_per_s'))} tokens/s (median after the first log window); MFU "
            f"{_pct(f.get('mfu'))}; wall {f['wall_s']:.0f} s")
    sec.row("validation loss, first → final (nats/token)", f"{_fmt(f['first_val_loss'], 4)} → {_fmt(f['val_loss'], 4)}")


def _pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.1%}"


def _train_figures(sec: Section, run: Path) -> None:
    """tokens/s and MFU from the run's metrics.jsonl (also after a timeout: what was logged so far)."""
    from kunlunbaize.train.logging import read_metrics

    records = [r for r in read_metrics(run / "metrics.jsonl") if "tokens_per_s" in r]
    steady = records[1:] or records  # the first window holds compilation and warm-up
    if steady:
        sec.figures["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
        sec.figures["mfu"] = statistics.median(r.get("mfu", float("nan")) for r in steady)
        sec.figures["train_loss_last"] = records[-1].get("loss")


# ---------------------------------------------------------------------------------------------------- output
def markdown(sections: dict[str, Section], meta: dict[str, Any]) -> str:
    """The Markdown report: a header line and one table of every section's rows."""
    verdict = {True: "passed", False: "FAILED", None: "not run"}[meta["correctness_passed"]]
    lines = [f"GPU suite ({meta['mode']}): {meta['device_name']}, torch {meta['torch']}, transformers "
             f"{meta['transformers']}, {meta['wall_s']:.0f} s of a {meta['time_limit_s']:.0f} s limit; correctness "
             f"{verdict}", "",
             "| section | measurement | value | status |", "|---|---|---|---|"]
    for name in PRINT_ORDER:
        sec = sections.get(name)
        if sec is None:
            continue
        for measurement, value, status in sec.rows:
            lines.append(f"| {sec.title} | {_cell(measurement)} | {_cell(value)} | {status} |")
        for note in sec.notes:
            if not note.startswith("Traceback"):
                lines.append(f"| {sec.title} | note | {_cell(note)} | |")
        status = "ok" if sec.status == "ok" else f"{sec.status}: {_cell(sec.reason)}"
        lines.append(f"| {sec.title} | section time (budget) | {sec.seconds:.1f} s ({sec.budget_s:.0f} s) | {status} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_suite(prof: Profile, names: list[str], fail: set[str], work: Path) -> dict[str, Section]:
    """Run the selected sections in order, each in its budget cut to what the suite's limit leaves."""
    titles = dict(SECTIONS)
    done: dict[str, Section] = {}
    fns: dict[str, Callable[[Section], None]] = {
        "corpus": lambda s: section_corpus(s, prof, work),
        "correctness": lambda s: section_correctness(s, prof),
        "train_throughput": lambda s: section_train_throughput(s, prof),
        "dense_residual": lambda s: section_dense_residual(s, prof),
        "decode": lambda s: section_decode(s, prof),
        "cli_train": lambda s: section_cli_train(s, prof, work, done.get("corpus")),
    }
    for i, (name, _) in enumerate(n for n in SECTIONS if n[0] in names):
        left = prof.total_s - (time.monotonic() - T_START)
        sec = Section(name, titles[name], budget_s=max(0.0, min(prof.budgets[name], left)))
        print(f"[{i + 1}/{len(names)}] {sec.title} (budget {sec.budget_s:.0f} s) …", file=sys.stderr, flush=True)
        run_section(sec, fns[name], fail=name in fail)
        extra = f": {sec.reason}" if sec.reason else ""
        print(f"    {sec.status} in {sec.seconds:.1f} s{extra}", file=sys.stderr, flush=True)
        done[name] = sec
    return done


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the suite, print the table, write the JSON; the exit status (see the module doc)."""
    names = [n for n, _ in SECTIONS]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_suite.json", help="JSON of every figure (default: %(default)s)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="every section end to end on CPU at tiny sizes (fp32, no compile): checks the suite, "
                         "measures nothing worth reporting")
    ap.add_argument("--sections", nargs="+", choices=names, default=names,
                    help="run only these (cli_train brings corpus along)")
    ap.add_argument("--no-compile", action="store_true", help="eager training steps (sections 2, 3, 5)")
    ap.add_argument("--compile", action="store_true", help="torch.compile also in --cpu-smoke")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds for the whole run (default: 525 on GPU, 170 with --cpu-smoke)")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply every section's time budget and the run's limit by this (a loaded machine, e.g. "
                         "the test suite's CPU smoke run beside other tests)")
    ap.add_argument("--fail-section", action="append", default=[], choices=names, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    prof = SMOKE if args.cpu_smoke else GPU
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; run it on a GPU machine, or pass --cpu-smoke to check it on CPU",
              file=sys.stderr)
        return 2
    if args.no_compile or args.compile:
        prof = dataclasses.replace(prof, compile=bool(args.compile and not args.no_compile))
    if args.budget_scale <= 0:
        ap.error(f"--budget-scale must be positive, got {args.budget_scale}")
    if args.budget_scale != 1.0:
        prof = dataclasses.replace(prof, total_s=prof.total_s * args.budget_scale,
                                   budgets={k: v * args.budget_scale for k, v in prof.budgets.items()})
    if args.time_limit:
        prof = dataclasses.replace(prof, total_s=args.time_limit)
    selected = set(args.sections) | ({"corpus"} if "cli_train" in args.sections else set())
    names = [n for n in names if n in selected]

    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    try:
        sections = run_suite(prof, names, set(args.fail_section), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    passed = correctness_passed(sections)
    meta = {"mode": prof.mode, "device": prof.device, "device_name": _device_name(prof.device),
            "torch": torch.__version__, "transformers": _version("transformers"), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": time.monotonic() - T_START, "time_limit_s": prof.total_s, "correctness_passed": passed}
    table = markdown(sections, meta)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "profile": dataclasses.asdict(prof), "sections": {n: s.to_json() for n, s in sections.items()},
           "table": table}
    out.write_text(json.dumps(_finite(doc), indent=2, default=str))
    print(f"\nfigures: {out}", file=sys.stderr)
    return 1 if passed is False else 0


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "not installed"


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
