"""One training loop for one CPU process, one GPU, and torchrun with DDP or FSDP2.

Per optimiser step: the batch-size ramp decides the global batch, split into micro-batches over ranks
and accumulation steps; the LR schedule sets the learning rate; the joint loss (eq. 22) is
back-propagated; gradients are clipped; a non-finite loss or gradient skips the step. Logging,
validation and checkpoints happen every N steps and on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..data.format import DataError, is_prepared, load_meta
from ..model import KunlunBaize
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import TokenWindows, TrainSampler, validation_batches
from .distributed import DistEnv, all_reduce_mean, gradient_sync, init_distributed, peak_flops, wrap_model
from .logging import RunLogger, read_metrics
from .optim import build_optimizer
from .plots import plot_dense_weights, plot_losses
from .schedule import PAPER_TOKENS, BatchRamp, LRSchedule

DEFAULT_DATA = "data/stdlib"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EVAL_BATCH = 8  # validation sequences per forward


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


@dataclass
class TrainConfig:
    """Everything about a run except the model shape (that is ``preset`` + ``model_overrides``)."""

    data: str = DEFAULT_DATA
    out: str = "runs/small"
    preset: str = "small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    arch: str = "kunlunbaize"  # or "llama": transformers' LlamaForCausalLM with matched width/depth/params
    seq_len: int = 256
    tokens: int = 500_000  # the token budget; the schedules are fractions of it
    batch_size: int = 16  # global sequences per step at the end of the ramp
    batch_size_start: int | None = None  # None: batch_size × 3072/15360, the paper's ratio
    batch_ramp: float = 469e9 / PAPER_TOKENS
    micro_batch_size: int | None = None  # per rank; None: the largest that lets the ramp start at its start
    lr: float = 2e-3  # peak; the paper uses 2.2e-4 at 405B scale
    warmup_steps: int | None = None  # None: 2% of the steps, at least 10 (at most a tenth of the run)
    decay_start: float = 10.0e12 / PAPER_TOKENS
    decay_end: float = 11.8e12 / PAPER_TOKENS
    final_start: float = (11.8e12 + 333e9) / PAPER_TOKENS
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_last: int = 2
    resume: str = "auto"  # "auto": newest checkpoint in <out> if any; "none": fresh; or a checkpoint path
    parallel: str = "auto"  # none | ddp | fsdp; auto: ddp under torchrun, none otherwise
    device: str = "auto"
    dtype: str = "auto"  # fp32 | bf16; auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False
    max_bad_steps: int = 5
    peak_tflops: float | None = None
    stop_at_step: int | None = None  # stop (with a checkpoint) after this step, as if preempted
    progress: bool = True

    def validate(self) -> None:
        checks = [
            ("seq_len", self.seq_len >= 2), ("tokens", self.tokens >= 1), ("batch_size", self.batch_size >= 1),
            ("lr", self.lr > 0), ("grad_clip", self.grad_clip > 0), ("log_every", self.log_every >= 1),
            ("eval_every", self.eval_every >= 1), ("ckpt_every", self.ckpt_every >= 1),
            ("max_bad_steps", self.max_bad_steps >= 1), ("arch", self.arch in ("kunlunbaize", "llama")),
            ("parallel", self.parallel in ("auto", "none", "ddp", "fsdp")), ("dtype", self.dtype in
                                                                             ("auto", "fp32", "bf16")),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)!r} is invalid")


def plan_steps(cfg: TrainConfig, ramp: BatchRamp) -> int:
    """Number of optimiser steps the token budget takes under the batch ramp."""
    tokens, steps = 0, 0
    while tokens < cfg.tokens:
        tokens += ramp(tokens / cfg.tokens) * cfg.seq_len
        steps += 1
    return steps


def default_micro_batch(per_rank: int, start_per_rank: int) -> int:
    """The largest divisor of the per-rank batch not above the ramp's starting per-rank batch."""
    return max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= max(1, start_per_rank))


def resolve_data(cfg: TrainConfig, env: DistEnv) -> Path:
    """The prepared dataset; the embedded default corpus is prepared on first use."""
    path = Path(cfg.data)
    if not is_prepared(path):
        if cfg.data != DEFAULT_DATA:
            raise DataError(f"no prepared dataset at {path}; run `kunlun prepare SOURCES --out {path}` first")
        if env.is_main:
            from ..data.prepare import prepare

            print(f"preparing the embedded corpus (Python standard library) into {path} …", flush=True)
            prepare(sources=[], out=path)
        if env.distributed:
            torch.distributed.barrier()
    return path


def build_model(cfg: TrainConfig, vocab_size: int) -> tuple[nn.Module, ModelConfig]:
    overrides = dict(cfg.model_overrides)
    overrides["vocab_size"] = vocab_size
    base = ModelConfig.preset(cfg.preset)
    overrides["max_seq_len"] = max(overrides.get("max_seq_len", base.max_seq_len), cfg.seq_len)
    mcfg = ModelConfig.preset(cfg.preset, **overrides)
    if cfg.arch == "llama":
        from .llama_baseline import LlamaBaseline

        return LlamaBaseline(mcfg), mcfg
    return KunlunBaize(mcfg), mcfg


def training_flops(arch: str, model: nn.Module, mcfg: ModelConfig, seq_len: int) -> float:
    if arch == "llama":
        hf = model.hf_config
        plain = dataclasses.replace(mcfg, transformerx=False, dense_residual=False, mtp_depth=0,
                                    mtp_loss_weights=None, ffn_hidden=hf.intermediate_size)
        return plain.flops_per_token(seq_len, training=True)
    return mcfg.flops_per_token(seq_len, training=True)


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it after each step, saves and exits."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. inside some test runners)
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C: give up on the clean save
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; return a summary (steps, tokens, final losses, paths)."""
    cfg.validate()
    env = init_distributed(cfg.device)
    data_path = resolve_data(cfg, env)
    meta = load_meta(data_path)
    torch.manual_seed(cfg.seed + env.rank)

    train_windows = TokenWindows(data_path, "train", cfg.seq_len)
    val_windows = TokenWindows(data_path, "val", cfg.seq_len)
    sampler = TrainSampler(train_windows, cfg.seed)

    tokenizer_files = [data_path / n for n in TOKENIZER_FILES if (data_path / n).is_file()]
    model, mcfg = build_model(cfg, meta["vocab_size"])
    n_params = sum(p.numel() for p in model.parameters())
    model.to(env.device)
    if cfg.activation_checkpointing:
        if cfg.arch == "llama":
            model.set_activation_checkpointing(True)
        else:
            model.gradient_checkpointing = True
    blocks = list(model.blocks)
    if cfg.compile:
        for block in blocks:
            block.compile()
    mode = cfg.parallel if cfg.parallel != "auto" else ("ddp" if env.distributed else "none")
    wrapped = wrap_model(model, blocks, env, mode)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if env.device.type == "cuda" else "fp32")
    autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext())
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))

    if cfg.batch_size % env.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the number of ranks {env.world_size}")
    start_bs = cfg.batch_size_start or max(env.world_size, round(cfg.batch_size * 3072 / 15360))
    micro = cfg.micro_batch_size or default_micro_batch(cfg.batch_size // env.world_size,
                                                        max(1, start_bs // env.world_size))
    granularity = micro * env.world_size
    if cfg.batch_size % granularity:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of micro_batch_size × ranks = "
                         f"{micro} × {env.world_size}")
    start_bs = max(start_bs, granularity)
    ramp = BatchRamp(start=start_bs, end=cfg.batch_size, ramp=cfg.batch_ramp, granularity=granularity)
    total_steps = plan_steps(cfg, ramp)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(
        1, min(total_steps // 10, max(10, round(0.02 * total_steps))))
    schedule = LRSchedule(peak=cfg.lr, warmup_steps=warmup, decay_start=cfg.decay_start,
                          decay_end=cfg.decay_end, final_start=cfg.final_start)

    run_dir = Path(cfg.out)
    ckpt_root = run_dir / "checkpoints"
    step, consumed, tokens = 0, 0, 0
    resume_from = None
    if cfg.resume == "auto":
        resume_from = latest_checkpoint(ckpt_root)
    elif cfg.resume != "none":
        resume_from = Path(cfg.resume)
    elif latest_checkpoint(ckpt_root) is not None:
        raise CheckpointError(f"{run_dir} already holds checkpoints; resume it (--resume auto) or train into "
                              "another --out folder")
    if resume_from is not None:
        saved = json.loads((resume_from / "config.json").read_text()) if (resume_from / "config.json").is_file() \
            else None
        if saved is not None and saved != mcfg.to_dict():
            raise CheckpointError(f"checkpoint {resume_from} was trained with a different model config; "
                                  "resume with the same --preset/--set, or train into another --out folder")
        state = load_checkpoint(resume_from, model, optimizer)
        step, consumed, tokens = state["step"], state["consumed_samples"], state["tokens"]

    peak, peak_how = (cfg.peak_tflops * 1e12, "given") if cfg.peak_tflops else peak_flops(
        env.device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    flops_per_token = training_flops(cfg.arch, model, mcfg, cfg.seq_len)
    logger = RunLogger(run_dir, total_steps, step, enabled=env.is_main, progress=cfg.progress)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        (run_dir / "model_config.json").write_text(mcfg.to_json())
        logger.message(
            f"{cfg.arch} {cfg.preset}: {n_params:,} parameters | data {data_path} ({train_windows.total:,} train / "
            f"{val_windows.total:,} val tokens) | {env.world_size} x {env.device.type} {mode} {dtype} | "
            f"budget {cfg.tokens:,} tokens = {total_steps} steps, batch {start_bs}->{cfg.batch_size} x "
            f"{cfg.seq_len} | MFU peak {peak / 1e12:.2f} TFLOP/s ({peak_how})"
            + (f" | resumed from {resume_from} at step {step}" if resume_from else ""))

    stop = _StopFlag()
    stop.install()
    val_sets = validation_batches(val_windows, EVAL_BATCH, cfg.eval_batches)
    n_terms = 2 + mcfg.mtp_depth if cfg.arch == "kunlunbaize" else 2
    window = {"t0": time.perf_counter(), "tokens": 0, "sums": torch.zeros(n_terms), "steps": 0, "gnorm": 0.0}
    bad_in_row, skipped = 0, 0
    last_val = float("nan")
    last_saved = step if resume_from else -1

    def evaluate() -> dict[str, float]:
        wrapped.eval()
        sums = torch.zeros(n_terms - 1, device=env.device)
        with torch.no_grad(), autocast:
            for x in val_sets:
                out = wrapped(x.to(env.device), labels=x.to(env.device))
                sums += torch.stack([out.main_loss.float(), *[t.float() for t in out.mtp_losses]])
        wrapped.train()
        vals = (sums / len(val_sets)).tolist()
        return {"val_loss": vals[0], **{f"val_mtp_loss_{j}": v for j, v in enumerate(vals[1:], start=1)}}

    def checkpoint() -> Path:
        state = {"step": step, "consumed_samples": consumed, "tokens": tokens, "world_size": env.world_size,
                 "train_config": dataclasses.asdict(cfg), "data_meta_vocab": meta["vocab_size"]}
        return save_checkpoint(ckpt_root, step, model, optimizer, state, mcfg.to_dict(), cfg.keep_last,
                               tokenizer_files)

    wrapped.train()
    try:
        if step == 0:
            vals = evaluate()
            last_val = vals["val_loss"]
            logger.log({"step": 0, "tokens": 0, **vals})
        while tokens < cfg.tokens:
            fraction = tokens / cfg.tokens
            global_batch = ramp(fraction)
            accum = global_batch // granularity
            lr = schedule(step, fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_sums = torch.zeros(n_terms, device=env.device)
            for m in range(accum):
                first = consumed + (m * env.world_size + env.rank) * micro
                x = sampler.batch(first, micro).to(env.device, non_blocking=True)
                with gradient_sync(wrapped, m == accum - 1), autocast:
                    out = wrapped(x, labels=x)
                    (out.loss / accum).backward()
                terms = [out.loss, out.main_loss, *out.mtp_losses]
                step_sums += torch.stack([t.detach().float() for t in terms]) / accum
            step_sums = all_reduce_mean(step_sums, env)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if hasattr(gnorm, "full_tensor"):
                gnorm = gnorm.full_tensor()
            finite = bool(torch.isfinite(step_sums).all()) and bool(torch.isfinite(gnorm))
            if finite:
                optimizer.step()
                bad_in_row = 0
            else:
                bad_in_row += 1
                skipped += 1
                logger.message(f"step {step}: non-finite loss or gradient (loss {step_sums[0].item():.4g}, "
                               f"grad norm {gnorm.item():.4g}); step skipped ({bad_in_row} in a row)")
                if bad_in_row >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"{bad_in_row} non-finite steps in a row at step {step}; stopping. Resume from the last "
                        f"checkpoint in {ckpt_root} with a lower --lr, or check the data")
            optimizer.zero_grad(set_to_none=True)
            consumed += global_batch
            tokens += global_batch * cfg.seq_len
            step += 1

            if finite:
                window["sums"] += step_sums.cpu()
                window["steps"] += 1
                window["gnorm"] += float(gnorm)
            window["tokens"] += global_batch * cfg.seq_len
            if step % cfg.log_every == 0 or tokens >= cfg.tokens:
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - window["t0"]
                tps = window["tokens"] / dt
                n = max(1, window["steps"])
                avg = (window["sums"] / n).tolist()
                record = {"step": step, "tokens": tokens, "loss": avg[0], "main_loss": avg[1],
                          **{f"mtp_loss_{j}": v for j, v in enumerate(avg[2:], start=1)},
                          "lr": lr, "batch_size": global_batch, "grad_norm": window["gnorm"] / n,
                          "tokens_per_s": tps, "mfu": tps * flops_per_token / (peak * env.world_size),
                          "skipped_steps": skipped}
                logger.log(record)
                logger.progress(step, {"loss": f"{avg[1]:.3f}", "val": f"{last_val:.3f}", "lr": f"{lr:.2e}",
                                       "tok/s": f"{tps:,.0f}"})
                window = {"t0": time.perf_counter(), "tokens": 0, "sums": torch.zeros(n_terms), "steps": 0,
                          "gnorm": 0.0}
            if step % cfg.eval_every == 0 or tokens >= cfg.tokens:
                vals = evaluate()
                last_val = vals["val_loss"]
                logger.log({"step": step, "tokens": tokens, **vals})
                if isinstance(model, KunlunBaize) and model.dense is not None:  # every rank: a collective
                    logger.log_matrix("dense_residual_weights", model.dense_residual_weights(), step)
            stop_now = stop.requested or (cfg.stop_at_step is not None and step >= cfg.stop_at_step)
            if env.distributed:
                flag = torch.tensor([float(stop_now)], device=env.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop_now = bool(flag.item())
            if step % cfg.ckpt_every == 0 or stop_now:
                checkpoint()
                last_saved = step
            if stop_now:
                why = f"received {stop.signal_name}" if stop.requested else f"stop_at_step={cfg.stop_at_step}"
                logger.message(f"{why}: saved a checkpoint at step {step} in {ckpt_root}; run the same command "
                               "again to resume")
                break
        finished = tokens >= cfg.tokens
        final_ckpt = checkpoint() if finished and last_saved != step else latest_checkpoint(ckpt_root)
    finally:
        stop.restore()
        logger.close()

    summary = {"step": step, "tokens": tokens, "finished": finished, "val_loss": last_val,
               "checkpoint": str(final_ckpt) if final_ckpt else None, "run_dir": str(run_dir),
               "skipped_steps": skipped, "params": n_params}
    dense = model.dense_residual_weights() if isinstance(model, KunlunBaize) else None  # collective under FSDP2
    if env.is_main:
        records = _dedupe(read_metrics(run_dir / "metrics.jsonl"))
        summary["loss_plot"] = str(plot_losses(records, run_dir / "loss_curve.png",
                                               f"{cfg.arch} {cfg.preset} on {data_path.name}"))
        if dense is not None:
            summary["dense_plot"] = str(plot_dense_weights(dense, run_dir / "dense_residual_weights.png"))
        vals = [r for r in records if "val_loss" in r]
        if vals:
            summary["first_val_loss"] = vals[0]["val_loss"]
            if summary["val_loss"] != summary["val_loss"]:  # NaN: a finished run re-run, nothing evaluated now
                summary["val_loss"] = vals[-1]["val_loss"]
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the last record per (step, kind): a run killed without a checkpoint is replayed on resume."""
    seen: dict[tuple[int, str], dict[str, Any]] = {}
    for r in records:
        kind = "val" if "val_loss" in r else "train" if "loss" in r else "other"
        seen[(r["step"], kind)] = r
    return sorted(seen.values(), key=lambda r: (r["step"], "val_loss" in r))
