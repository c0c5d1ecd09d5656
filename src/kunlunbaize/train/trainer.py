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
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import fcntl
except ImportError:  # not on POSIX: run folders are not locked
    fcntl = None

from ..arch import ARCHS, DEFAULT, get_arch
from ..checkpoint import (
    CheckpointDamaged,
    CheckpointError,
    checkpoint_arch,
    checkpoint_dirs,
    latest_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    tokenizer_digest,
)
from ..checkpoint.state import load_checkpoint, save_checkpoint
from ..config import PRESETS, ModelConfig
from ..data.format import DataError, is_prepared, load_meta
from ..model import KunlunBaize
from .data import TokenWindows, TrainSampler, validation_batches
from .distributed import DistEnv, all_reduce_mean, gradient_sync, init_distributed, peak_flops, wrap_model
from .logging import METRICS, RunLogger, move_into_new_folder, read_metrics, set_aside_logs, truncate_metrics
from .optim import build_optimizer
from .plots import plot_dense_weights, plot_losses
from .schedule import PAPER_TOKENS, BatchRamp, LRSchedule

DEFAULT_DATA = "data/stdlib"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EVAL_BATCH = 8  # validation sequences per forward


LOCK_FILE = ".lock"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row, or the run folder is in use)."""


class TrainingInterrupted(TrainingError):
    """Stopped by a repeated Ctrl-C without saving; the last complete checkpoint is untouched."""


@dataclass
class TrainConfig:
    """Everything about a run except the model shape (that is ``preset`` + ``model_overrides``)."""

    data: str = DEFAULT_DATA
    out: str = "runs/small"
    preset: str = "small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    arch: str = DEFAULT.name  # a name in kunlunbaize.arch.ARCHS, e.g. the matched HF Llama baseline
    seq_len: int = 256
    tokens: int = 500_000  # the token budget; the schedules are fractions of it
    batch_size: int = 16  # global sequences per step at the end of the ramp
    batch_size_start: int | None = None  # None: batch_size × 3072/15360, the paper's ratio
    batch_ramp: float = 469e9 / PAPER_TOKENS
    micro_batch_size: int | None = None  # per rank; None: the largest that lets the ramp start at its start
    lr: float = 2e-3  # peak; the paper uses 2.2e-4 at 405B scale
    dense_lr_mult: float = 1.0  # the dense-residual logits' learning rate / lr (1: the shared LR, the paper)
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
        """Raise ValueError naming the first setting that makes no sense."""
        def opt(value, ok) -> bool:
            return value is None or ok(value)

        def real(value, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> bool:
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return False
            return (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)

        checks = [
            ("preset", self.preset in PRESETS, f"one of {', '.join(PRESETS)}"),
            ("arch", self.arch in ARCHS, f"one of {', '.join(ARCHS)}"),
            ("seq_len", self.seq_len >= 2, ">= 2"), ("tokens", self.tokens >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("batch_size_start", opt(self.batch_size_start, lambda v: 1 <= v <= self.batch_size),
             "None or between 1 and batch_size"),
            ("batch_ramp", real(self.batch_ramp, 0, 1), "a fraction in [0, 1]"),
            ("micro_batch_size", opt(self.micro_batch_size, lambda v: v >= 1), "None or >= 1"),
            ("lr", real(self.lr, 0, lo_open=True), "> 0"),
            ("dense_lr_mult", real(self.dense_lr_mult, 0, lo_open=True), "> 0"),
            ("warmup_steps", opt(self.warmup_steps, lambda v: v >= 0), "None or >= 0"),
            ("decay_start", real(self.decay_start, 0, self.decay_end), "in [0, decay_end]"),
            ("decay_end", real(self.decay_end, self.decay_start, self.final_start), "in [decay_start, final_start]"),
            ("final_start", real(self.final_start, self.decay_end, 1), "in [decay_end, 1]"),
            ("weight_decay", real(self.weight_decay, 0), ">= 0"),
            ("beta1", real(self.beta1, 0, 1, hi_open=True), "in [0, 1)"),
            ("beta2", real(self.beta2, 0, 1, hi_open=True), "in [0, 1)"),
            ("grad_clip", real(self.grad_clip, 0, lo_open=True), "> 0"),
            ("log_every", self.log_every >= 1, ">= 1"), ("eval_every", self.eval_every >= 1, ">= 1"),
            ("eval_batches", self.eval_batches >= 0, ">= 0 (0: no validation)"),
            ("ckpt_every", self.ckpt_every >= 1, ">= 1"), ("keep_last", self.keep_last >= 0, ">= 0 (0: keep all)"),
            ("resume", bool(self.resume), "auto, none or a checkpoint path"),
            ("parallel", self.parallel in ("auto", "none", "ddp", "fsdp"), "auto, none, ddp or fsdp"),
            ("dtype", self.dtype in ("auto", "fp32", "bf16"), "auto, fp32 or bf16"),
            ("max_bad_steps", self.max_bad_steps >= 1, ">= 1"),
            ("peak_tflops", opt(self.peak_tflops, lambda v: real(v, 0, lo_open=True)), "None or > 0"),
            ("stop_at_step", opt(self.stop_at_step, lambda v: v >= 1), "None or >= 1"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)!r} is invalid: it must be {need}")


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
    return get_arch(cfg.arch).build(mcfg), mcfg


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it after each step, saves and exits.

    A second signal never interrupts a checkpoint being written (it says to wait); outside a save, a third one
    abandons the run without saving (:class:`TrainingInterrupted`), leaving the last complete checkpoint as it was.
    """

    def __init__(self, verbose: bool = True) -> None:
        self.requested = False
        self.signal_name = ""
        self.saving = False
        self.verbose = verbose
        self._extra = 0
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. inside some test runners)
                self._old[sig] = signal.signal(sig, self._handle)

    def _say(self, text: str) -> None:
        if self.verbose:
            print(f"\n{text}", file=sys.stderr, flush=True)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.requested:
            self.requested = True
            self.signal_name = name
            self._say(f"received {name}: finishing this step and saving a checkpoint …")
            return
        if self.saving:
            self._say(f"received {name} again: saving a checkpoint, please wait")
            return
        self._extra += 1
        if self._extra >= 2:
            raise KeyboardInterrupt
        self._say(f"received {name} again: stopping after this step with a checkpoint, please wait (once more "
                  "to quit at once without saving)")

    @contextlib.contextmanager
    def saving_checkpoint(self) -> Iterator[None]:
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


class RunLock:
    """One training job per run folder: rank 0 holds an exclusive ``flock`` on ``<out>/.lock`` while it runs.

    The operating system releases the lock when the process ends, however it ends (SIGKILL included), so a lock
    left by a dead run never blocks. The lock file holds the owner's pid, for the message.
    """

    def __init__(self, run_dir: Path, env: DistEnv) -> None:
        self.run_dir, self.env = run_dir, env
        self._file = None

    def __enter__(self) -> RunLock:
        busy = ""
        if self.env.is_main and fcntl is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            f = open(self.run_dir / LOCK_FILE, "a+")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                busy = f.read().strip() or "?"
                f.close()
            else:
                f.truncate(0)
                f.write(f"{os.getpid()}\n")
                f.flush()
                self._file = f
        if self.env.distributed:  # every rank of the job learns whether rank 0 got the folder
            flag = torch.tensor([float(bool(busy))], device=self.env.device)
            torch.distributed.broadcast(flag, src=0)
            busy = busy or ("?" if flag.item() else "")
        if busy:
            raise TrainingError(f"{self.run_dir} is in use by another `kunlun train` (pid {busy}); wait for it to "
                                "finish or stop it, or train into another --out folder")
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _agreed(env: DistEnv, failed: bool) -> bool:
    """Whether any rank failed (every rank gets the same answer)."""
    if not env.distributed:
        return failed
    flag = torch.tensor([float(failed)], device=env.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _check_resumable(path: Path, data_path: Path, meta: dict[str, Any], mcfg: ModelConfig,
                     arch: str) -> str | None:
    """Refuse a checkpoint trained on another tokenizer or model config; a note when only the data differs."""
    state = read_trainer_state(path)
    trained = state.get("data", {}).get("tokenizer_sha256") or tokenizer_digest(path)
    current = tokenizer_digest(data_path)
    if trained and current and trained != current:
        where = state.get("data", {}).get("path")
        raise CheckpointError(
            f"checkpoint {path} was trained on data with another tokenizer than {data_path} (tokenizer.json "
            f"differs), so the token ids would not mean the same; resume with the --data it was trained on"
            + (f" ({where})" if where else "") + ", or train into another --out folder")
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            saved = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointDamaged(f"could not load checkpoint {path}: {config_file} is damaged ({e}); resume "
                                    "from an earlier checkpoint, or --resume none in another --out folder") from None
        trained_as = checkpoint_arch(path, saved) if isinstance(saved, dict) else None
        if trained_as is not None and trained_as.name != arch:
            raise CheckpointError(f"checkpoint {path} holds a {trained_as.title} model (--arch {trained_as.name}), "
                                  f"not --arch {arch}; resume with --arch {trained_as.name}, or train into another "
                                  "--out folder")
        have, want = get_arch(arch).model_config(saved), mcfg.to_dict()
        if isinstance(have, dict):  # a field added after the checkpoint was written has its default there
            have = {**{k: v for k, v in ModelConfig().to_dict().items() if k not in have}, **have}
        if have != want:
            if isinstance(saved, dict) and saved.get("vocab_size") != mcfg.vocab_size:
                raise CheckpointError(f"checkpoint {path} has a vocabulary of {saved.get('vocab_size')} tokens but "
                                      f"the dataset {data_path} has {mcfg.vocab_size}; resume with the --data it was "
                                      "trained on, or train into another --out folder")
            differ = sorted(k for k in want if not isinstance(have, dict) or have.get(k) != want[k])
            raise CheckpointError(f"checkpoint {path} was trained with a different model config ({', '.join(differ)}); "
                                  "resume with the same --preset/--set, or train into another --out folder")
    data = state.get("data", {})
    if data.get("train_tokens") not in (None, meta["splits"]["train"]["tokens"]):
        return (f"note: {data_path} is not the dataset checkpoint {path} was trained on ({data.get('path')}); the "
                "tokenizer is the same, so training continues on it from the same sample position")
    return None


def _resume(cfg: TrainConfig, env: DistEnv, ckpt_root: Path, data_path: Path, meta: dict[str, Any],
            mcfg: ModelConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
            notes: list[str]) -> tuple[Path | None, dict[str, Any] | None]:
    """Load the checkpoint ``cfg.resume`` asks for; under ``auto``, fall back past damaged ones to the newest good."""
    if cfg.resume == "none":
        if latest_checkpoint(ckpt_root) is not None:
            raise CheckpointError(f"{ckpt_root.parent} already holds checkpoints; resume it (--resume auto) or "
                                  "train into another --out folder")
        return None, None
    auto = cfg.resume == "auto"
    candidates = (list(reversed(checkpoint_dirs(ckpt_root))) if auto
                  else [resolve_checkpoint(Path(cfg.resume), resumable=True)])
    for i, path in enumerate(candidates):
        error: CheckpointDamaged | None = None
        _check_dense_lr_mult(path, cfg)
        try:
            note = _check_resumable(path, data_path, meta, mcfg, cfg.arch)
            state = load_checkpoint(path, model, optimizer)
        except CheckpointDamaged as e:
            error = e
        if _agreed(env, error is not None):
            error = error or CheckpointDamaged(f"could not load checkpoint {path} on another rank (see its message)")
            if not auto or i + 1 == len(candidates):
                raise error
            notes.append(f"{error}\n-> falling back to the previous checkpoint {candidates[i + 1]}")
            continue
        if note:
            notes.append(note)
        return path, state
    return None, None


def _check_dense_lr_mult(path: Path, cfg: TrainConfig) -> None:
    """CheckpointError when the checkpoint was trained with another ``dense_lr_mult``: its optimiser has another
    layout (the dense logits in a group of their own or not), and its learning rates were another run's."""
    try:
        saved = json.loads((path / "trainer_state.json").read_text())["train_config"].get("dense_lr_mult", 1.0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # unreadable: the loader reports it
    if saved != cfg.dense_lr_mult:
        raise CheckpointError(f"{path} was trained with --dense-lr-mult {saved:g}, not {cfg.dense_lr_mult:g}: resume "
                              f"with --dense-lr-mult {saved:g}, or train with the new value into another --out folder")


def _set_aside_later_checkpoints(ckpt_root: Path, resumed: Path) -> Path | None:
    """Move the complete checkpoints after ``resumed`` into a new ``superseded-N/``, so that neither ``--resume auto``
    nor ``--keep-last`` pruning mixes them with the run that continues from ``resumed``; return it (None: none)."""
    return move_into_new_folder([p for p in checkpoint_dirs(ckpt_root) if p.name > resumed.name], ckpt_root,
                                "superseded")


def _val_windows(cfg: TrainConfig, data_path: Path, meta: dict[str, Any]) -> tuple[TokenWindows | None, str]:
    """The validation windows, or None and why there is no validation."""
    if cfg.eval_batches == 0:
        return None, "--eval-batches 0"
    if int(meta["splits"].get("val", {}).get("tokens", 0)) == 0:
        return None, f"{data_path} has no validation split (prepared with --val-fraction 0)"
    try:
        return TokenWindows(data_path, "val", cfg.seq_len), ""
    except DataError as e:
        raise DataError(f"{e}; or train without validation with --eval-batches 0") from None


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; return a summary (steps, tokens, final losses, paths).

    Only one job trains in a run folder at a time (:class:`RunLock`). A Ctrl-C before training starts, or a
    third one during it, raises :class:`TrainingInterrupted`.
    """
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        data_path = resolve_data(cfg, env)
        with RunLock(Path(cfg.out), env):
            return _train(cfg, env, data_path)
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted; {Path(cfg.out)} keeps its last complete checkpoint, if any "
                                  "(run the same command to resume from it)") from None


def _train(cfg: TrainConfig, env: DistEnv, data_path: Path) -> dict[str, Any]:
    meta = load_meta(data_path)
    torch.manual_seed(cfg.seed + env.rank)

    train_windows = TokenWindows(data_path, "train", cfg.seq_len)
    val_windows, no_val_reason = _val_windows(cfg, data_path, meta)
    sampler = TrainSampler(train_windows, cfg.seed)

    tokenizer_files = [data_path / n for n in TOKENIZER_FILES if (data_path / n).is_file()]
    data_identity = {"path": str(data_path.resolve()), "tokenizer_sha256": tokenizer_digest(data_path),
                     "train_tokens": meta["splits"]["train"]["tokens"]}
    model, mcfg = build_model(cfg, meta["vocab_size"])
    n_params = sum(p.numel() for p in model.parameters())
    model.to(env.device)
    spec = get_arch(cfg.arch)
    if cfg.activation_checkpointing:
        spec.set_activation_checkpointing(model, True)
    blocks = list(model.blocks)
    if cfg.compile:
        for block in blocks:
            block.compile()
    mode = cfg.parallel if cfg.parallel != "auto" else ("ddp" if env.distributed else "none")
    wrapped = wrap_model(model, blocks, env, mode)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if env.device.type == "cuda" else "fp32")
    autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext())
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                dense_lr_mult=cfg.dense_lr_mult)

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
    notes: list[str] = []
    resume_from, state = _resume(cfg, env, ckpt_root, data_path, meta, mcfg, model, optimizer, notes)
    if state is not None:
        step, consumed, tokens = state["step"], state["consumed_samples"], state["tokens"]
    first_step = step
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        same_run = resume_from is not None and resume_from.parent.resolve() == ckpt_root.resolve()
        if same_run:
            moved = _set_aside_later_checkpoints(ckpt_root, resume_from)
            if moved is not None:
                notes.append(f"note: resumed from step {step}, so the later checkpoint(s) of {ckpt_root} belong to "
                             f"the run being replaced; moved them to {moved} (delete it once you do not need them)")
            dropped = truncate_metrics(run_dir / METRICS, step)
            if dropped:
                notes.append(f"note: dropped {dropped} record(s) after step {step} from {run_dir / METRICS} "
                             "(trained again from the checkpoint)")
        else:
            aside = set_aside_logs(run_dir)
            if aside is not None:
                notes.append(f"note: moved the logs and plots of an earlier run in {run_dir} to {aside}")

    peak, peak_how = (cfg.peak_tflops * 1e12, "given") if cfg.peak_tflops else peak_flops(
        env.device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    flops_per_token = spec.training_flops(mcfg, cfg.seq_len)
    logger = RunLogger(run_dir, total_steps, step, enabled=env.is_main, progress=cfg.progress)
    if env.is_main:
        (run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        (run_dir / "model_config.json").write_text(mcfg.to_json())
        val_tokens = f"{val_windows.total:,} val tokens" if val_windows is not None else "no validation"
        logger.message(
            f"{cfg.arch} {cfg.preset}: {n_params:,} parameters | data {data_path} ({train_windows.total:,} train / "
            f"{val_tokens}) | {env.world_size} x {env.device.type} {mode} {dtype} | "
            f"budget {cfg.tokens:,} tokens = {total_steps} steps, batch {start_bs}->{cfg.batch_size} x "
            f"{cfg.seq_len} | MFU peak {peak / 1e12:.2f} TFLOP/s ({peak_how})"
            + (f" | resumed from {resume_from} at step {step}" if resume_from else ""))
        for note in notes:
            logger.message(note)
        if val_windows is None:
            logger.message(f"no validation: {no_val_reason}; no validation loss will be reported")
        if resume_from is not None and tokens >= cfg.tokens:
            logger.message(f"nothing to train: checkpoint {resume_from} has already seen {tokens:,} tokens, the "
                           f"whole budget of {cfg.tokens:,}; pass a larger --tokens to train further")

    stop = _StopFlag(verbose=env.is_main)
    stop.install()
    val_sets = validation_batches(val_windows, EVAL_BATCH, cfg.eval_batches) if val_windows is not None else []
    n_terms = spec.loss_terms(mcfg)
    window = {"t0": time.perf_counter(), "tokens": 0, "sums": torch.zeros(n_terms), "steps": 0, "gnorm": 0.0}
    bad_in_row, skipped = 0, 0
    # KunlunBaize's loss without [B, T, V] logits (model/fused_loss.py); the HF Llama baseline computes its own
    loss_only = spec.train_kwargs()
    last_val = float("nan")
    last_saved = step if resume_from else -1
    final_ckpt = resume_from

    def evaluate() -> dict[str, float]:
        wrapped.eval()
        sums = torch.zeros(n_terms - 1, device=env.device)
        with torch.no_grad(), autocast:
            for x in val_sets:
                out = wrapped(x.to(env.device), labels=x.to(env.device), **loss_only)
                sums += torch.stack([out.main_loss.float(), *[t.float() for t in out.mtp_losses]])
        wrapped.train()
        vals = (sums / len(val_sets)).tolist()
        return {"val_loss": vals[0], **{f"val_mtp_loss_{j}": v for j, v in enumerate(vals[1:], start=1)}}

    def checkpoint() -> Path:
        state = {"step": step, "consumed_samples": consumed, "tokens": tokens, "world_size": env.world_size,
                 "train_config": dataclasses.asdict(cfg), "data_meta_vocab": meta["vocab_size"], "data": data_identity}
        with stop.saving_checkpoint():
            return save_checkpoint(ckpt_root, step, model, optimizer, state, spec.checkpoint_config(mcfg),
                                   cfg.keep_last, tokenizer_files)

    wrapped.train()
    try:
        try:
            if step == 0 and val_sets:
                vals = evaluate()
                last_val = vals["val_loss"]
                logger.log({"step": 0, "tokens": 0, **vals})
            while tokens < cfg.tokens:
                fraction = tokens / cfg.tokens
                global_batch = ramp(fraction)
                accum = global_batch // granularity
                lr = schedule(step, fraction)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_mult", 1.0)
                step_sums = torch.zeros(n_terms, device=env.device)
                for m in range(accum):
                    first = consumed + (m * env.world_size + env.rank) * micro
                    x = sampler.batch(first, micro).to(env.device, non_blocking=True)
                    with gradient_sync(wrapped, m == accum - 1), autocast:
                        out = wrapped(x, labels=x, **loss_only)
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
                    postfix = {"loss": f"{avg[1]:.3f}", **({"val": f"{last_val:.3f}"} if val_sets else {}),
                               "lr": f"{lr:.2e}", "tok/s": f"{tps:,.0f}"}
                    logger.progress(step, postfix)
                    window = {"t0": time.perf_counter(), "tokens": 0, "sums": torch.zeros(n_terms), "steps": 0,
                              "gnorm": 0.0}
                if step % cfg.eval_every == 0 or tokens >= cfg.tokens:
                    if val_sets:
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
                    final_ckpt = checkpoint()
                    last_saved = step
                if stop_now:
                    why = f"received {stop.signal_name}" if stop.requested else f"stop_at_step={cfg.stop_at_step}"
                    logger.message(f"{why}: saved a checkpoint at step {step} in {ckpt_root}; run the same command "
                                   "again to resume")
                    break
            finished = tokens >= cfg.tokens
            if finished and last_saved != step:
                final_ckpt = checkpoint()
        finally:
            logger.close()
        return _finish(cfg, env, model, run_dir, data_path, final_ckpt, step=step, tokens=tokens, finished=finished,
                       last_val=last_val, validated=bool(val_sets), skipped=skipped, n_params=n_params,
                       steps_now=step - first_step, interrupted=stop.signal_name or None)
    except KeyboardInterrupt:
        if final_ckpt is not None and last_saved == step:
            raise TrainingInterrupted(f"interrupted after saving the checkpoint {final_ckpt} (run the same command "
                                      "to resume from it)") from None
        where = f"the last complete checkpoint is {final_ckpt}" if final_ckpt else "no checkpoint was saved"
        raise TrainingInterrupted(f"interrupted at step {step} without saving; {where} (run the same command to "
                                  "resume from it)") from None
    finally:
        stop.restore()


def _finish(cfg: TrainConfig, env: DistEnv, model: nn.Module, run_dir: Path, data_path: Path,
            final_ckpt: Path | None, *, step: int, tokens: int, finished: bool, last_val: float, validated: bool,
            skipped: int, n_params: int, steps_now: int, interrupted: str | None) -> dict[str, Any]:
    """The run's summary (also written to summary.json) and its plots. ``steps_now``: steps this invocation trained;
    ``interrupted``: the signal that stopped it early, if one did."""
    summary = {"step": step, "tokens": tokens, "finished": finished, "steps_now": steps_now, "interrupted": interrupted,
               "val_loss": last_val if validated and math.isfinite(last_val) else None,
               "checkpoint": str(final_ckpt) if final_ckpt else None, "run_dir": str(run_dir),
               "skipped_steps": skipped, "params": n_params}
    dense = model.dense_residual_weights() if isinstance(model, KunlunBaize) else None  # collective under FSDP2
    if env.is_main:
        records = _dedupe(read_metrics(run_dir / METRICS))
        summary["loss_plot"] = str(plot_losses(records, run_dir / "loss_curve.png",
                                               f"{cfg.arch} {cfg.preset} on {data_path.name}"))
        if dense is not None:
            summary["dense_plot"] = str(plot_dense_weights(dense, run_dir / "dense_residual_weights.png"))
        vals = [r for r in records if "val_loss" in r]
        if vals and validated:
            summary["first_val_loss"] = vals[0]["val_loss"]
            if summary["val_loss"] is None:  # a finished run re-run: nothing evaluated now
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
