"""One training loop for one CPU process, one GPU, and torchrun with DDP, FSDP2, tensor and pipeline parallelism.

Per optimiser step: the batch-size ramp decides the global batch, split into micro-batches over ranks
and accumulation steps (:mod:`.plan`); the LR schedule sets the learning rate; the layout's runner
(:mod:`.runner`: :func:`.step.train_step`, or :func:`.step.pipeline_step` under ``--pp``, whose pipeline
micro-batches are the accumulation micro-batches) back-propagates the joint loss (eq. 22), clips the gradients and
skips a step whose loss or gradient is not finite. Logging (:mod:`.metrics`), validation and checkpoints
(:mod:`.resume`) happen every N steps and on SIGTERM/SIGINT (:mod:`.stop`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import ArchSpec, get_arch
from ..data.format import load_meta
from .config import DEFAULT_DATA, TrainConfig
from .data import LongDocWindows, validation_batches
from .distributed import DistEnv, any_rank, init_distributed, peak_flops
from .errors import TrainingError, TrainingInterrupted
from .extend import build_extension, write_parent_record
from .logging import RunLogger
from .metrics import MetricsWindow
from .models import build_model, model_config
from .parallel.layout import Layout, LayoutError, check_microbatches, check_model, check_pipeline, resolve_layout
from .plan import BatchPlan, lr_schedule, plan_batches, set_lr
from .resume import CheckpointContext, RunProgress, resume_run, save_training_checkpoint
from .run_data import RunData, open_run_data, resolve_data
from .run_dir import RunLock, prepare_run_dir
from .runner import Runner, place
from .schedule import LRSchedule
from .step import StepResult, resolve_dtype, train_step
from .stop import StopFlag
from .summary import write_summary

# what the CLI, ablate, posttrain and the benchmarks import from here
__all__ = ["DEFAULT_DATA", "RunLock", "TrainConfig", "Trainer", "TrainingError", "TrainingInterrupted", "build_model",
           "train", "train_step"]

EVAL_BATCH = 8  # validation sequences per forward


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; return a summary (steps, tokens, final losses, paths).

    Only one job trains in a run folder at a time (:class:`RunLock`). A Ctrl-C before training starts, or a
    third one during it, raises :class:`TrainingInterrupted`.
    """
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        data_path = resolve_data(cfg, env)
        _check_runnable(cfg, env, data_path)  # before the run folder is touched
        with RunLock(Path(cfg.out), env):
            return _train(cfg, env, data_path)
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted; {Path(cfg.out)} keeps its last complete checkpoint, if any "
                                  "(run the same command to resume from it)") from None


def _train(cfg: TrainConfig, env: DistEnv, data_path: Path) -> dict[str, Any]:
    trainer = Trainer.setup(cfg, env, data_path)
    try:
        try:
            finished = trainer.fit()
        finally:
            trainer.logger.close()
        return trainer.summary(finished)
    except KeyboardInterrupt:
        raise trainer.interrupted() from None
    finally:
        trainer.stop.restore()


@dataclass
class Trainer:
    """A training run's state (model, optimiser, plan, progress, logs) and the loop that advances it."""

    cfg: TrainConfig
    env: DistEnv
    data: RunData
    spec: ArchSpec
    """The model's architecture (what its training forward takes, how it checkpoints)."""
    model: nn.Module
    """The model as built (under ``--pp``, the model this rank's stages were cut from: read the stages through
    ``runner``)."""
    runner: Runner
    """How a step, a validation pass and a checkpoint run under the layout (the whole model, or pipeline stages)."""
    layout: Layout
    """How the ranks split into pipeline stages and data- and tensor-parallel groups."""
    plan: BatchPlan
    schedule: LRSchedule
    val_sets: list[torch.Tensor]
    logger: RunLogger
    window: MetricsWindow
    stop: StopFlag
    ckpt: CheckpointContext
    progress: RunProgress
    n_params: int
    resumed: Path | None
    skipped: int = 0
    """Non-finite steps skipped so far in this invocation."""
    bad_in_row: int = 0
    last_val: float = math.nan
    """The latest validation loss (NaN: none yet)."""
    first_step: int = field(init=False)
    """The step this invocation started at."""
    last_saved: int = field(init=False)
    """The step of the newest checkpoint (-1: none)."""
    final_ckpt: Path | None = field(init=False)

    def __post_init__(self) -> None:
        self.first_step = self.progress.step
        self.last_saved = self.progress.step if self.resumed else -1
        self.final_ckpt = self.resumed

    @classmethod
    def setup(cls, cfg: TrainConfig, env: DistEnv, data_path: Path) -> Trainer:
        """Open the data, build and place the model, resume, prepare the run folder and say what will run."""
        return _setup(cfg, env, data_path)

    def fit(self) -> bool:
        """Train until the token budget is spent or a stop is asked for; return whether the budget is spent."""
        cfg, progress = self.cfg, self.progress
        self.runner.train()
        if progress.step == 0 and self.val_sets:
            self._validate(step=0, tokens=0)
        while progress.tokens < cfg.tokens:
            lr, global_batch = self._advance()
            end = progress.tokens >= cfg.tokens
            if progress.step % cfg.log_every == 0 or end:
                self._log(lr, global_batch)
            if progress.step % cfg.eval_every == 0 or end:
                self._evaluate()
            stop_now = any_rank(self.env, self.stop.requested or (cfg.stop_at_step is not None
                                                                  and progress.step >= cfg.stop_at_step))
            if progress.step % cfg.ckpt_every == 0 or stop_now:
                self._save()
            if stop_now:
                why = f"received {self.stop.signal_name}" if self.stop.requested else f"stop_at_step={cfg.stop_at_step}"
                self.logger.message(f"{why}: saved a checkpoint at step {progress.step} in {self.ckpt.root}; run the "
                                    "same command again to resume")
                break
        finished = progress.tokens >= cfg.tokens
        if finished and self.last_saved != progress.step:
            self._save()
        return finished

    def _advance(self) -> tuple[float, int]:
        """One optimiser step at the scheduled batch size and learning rate; return both."""
        cfg, env, plan, progress = self.cfg, self.env, self.plan, self.progress
        fraction = progress.tokens / cfg.tokens
        global_batch = plan.ramp(fraction)
        lr = self.schedule(progress.step, fraction)
        set_lr(self.runner.optimizer, lr)
        dp_rank = self.layout.dp_rank(env.rank)  # the ranks of a tensor-parallel group train on the same batch
        batches = [self.data.sampler.batch(plan.first_sample(progress.consumed, m, dp_rank), plan.micro)
                   .to(env.device, non_blocking=True) for m in range(plan.accumulation(global_batch))]
        result = self.runner.step(batches, cfg.grad_clip)
        self._count_bad_steps(result)
        progress.consumed += global_batch
        progress.tokens += global_batch * cfg.seq_len
        progress.step += 1
        self.window.add(result, global_batch * cfg.seq_len)
        return lr, global_batch

    def _count_bad_steps(self, result: StepResult) -> None:
        """Report a skipped (non-finite) step; TrainingError after ``max_bad_steps`` of them in a row."""
        if result.finite:
            self.bad_in_row = 0
            return
        self.bad_in_row += 1
        self.skipped += 1
        step = self.progress.step
        self.logger.message(f"step {step}: non-finite loss or gradient (loss {result.losses[0].item():.4g}, "
                            f"grad norm {result.grad_norm.item():.4g}); step skipped ({self.bad_in_row} in a row)")
        if self.bad_in_row >= self.cfg.max_bad_steps:
            raise TrainingError(f"{self.bad_in_row} non-finite steps in a row at step {step}; stopping. Resume from "
                                f"the last checkpoint in {self.ckpt.root} with a lower --lr, or check the data")

    def _log(self, lr: float, global_batch: int) -> None:
        """Write the metrics window's record, update the progress bar and start a new window."""
        step = self.progress.step
        record = self.window.record(step=step, tokens=self.progress.tokens, lr=lr, batch_size=global_batch,
                                    skipped=self.skipped)
        self.logger.log(record)
        postfix = {"tokens": f"{self.progress.tokens:,}", "loss": f"{record['main_loss']:.3f}",
                   **({"val": f"{self.last_val:.3f}"} if self.val_sets else {}),
                   "lr": f"{lr:.2e}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
        self.logger.progress(step, postfix)
        self.window.reset()

    def _evaluate(self) -> None:
        """Validation losses (if there is validation) and the dense-residual weights (if the model has them)."""
        if self.val_sets:
            self._validate(step=self.progress.step, tokens=self.progress.tokens)
        weights = self.runner.dense_residual_weights()  # every rank: a collective under FSDP2
        if weights is not None:
            self.logger.log_matrix("dense_residual_weights", weights, self.progress.step)

    def _validate(self, step: int, tokens: int) -> None:
        vals = self.runner.evaluate(self.val_sets)
        self.last_val = vals["val_loss"]
        self.logger.log({"step": step, "tokens": tokens, **vals})

    def _save(self) -> None:
        """A checkpoint at the current step (a second Ctrl-C waits for it)."""
        with self.stop.saving_checkpoint():
            self.final_ckpt = save_training_checkpoint(self.ckpt, self.progress, self.runner.checkpoint_model(),
                                                       self.runner.optimizer)
        self.last_saved = self.progress.step

    def summary(self, finished: bool) -> dict[str, Any]:
        """The run's summary, written with its plots into the run folder."""
        return write_summary(self.cfg, self.env, self.runner.dense_residual_weights(), Path(self.cfg.out),
                             self.data.path, self.final_ckpt,
                             step=self.progress.step, tokens=self.progress.tokens, finished=finished,
                             last_val=self.last_val, validated=bool(self.val_sets), skipped=self.skipped,
                             n_params=self.n_params, steps_now=self.progress.step - self.first_step,
                             interrupted=self.stop.signal_name or None)

    def interrupted(self) -> TrainingInterrupted:
        """The error for a Ctrl-C that abandoned the run, saying which checkpoint is the last complete one."""
        if self.final_ckpt is not None and self.last_saved == self.progress.step:
            return TrainingInterrupted(f"interrupted after saving the checkpoint {self.final_ckpt} (run the same "
                                       "command to resume from it)")
        where = f"the last complete checkpoint is {self.final_ckpt}" if self.final_ckpt else "no checkpoint was saved"
        return TrainingInterrupted(f"interrupted at step {self.progress.step} without saving; {where} (run the same "
                                   "command to resume from it)")


def _resolve_layout(cfg: TrainConfig, env: DistEnv) -> Layout:
    """The run's parallel layout over the launched ranks (LayoutError when it does not fit them)."""
    return resolve_layout(env.world_size, cfg.parallel, cfg.dp_replicate, cfg.dp_shard, cfg.tp, cfg.cp, cfg.pp)


def _check_layout(cfg: TrainConfig, layout: Layout, mcfg: Any, plan: BatchPlan) -> None:
    """LayoutError when the model or the batch plan does not split over the layout (tensor-parallel sizes, pipeline
    stages, micro-batches per step at every batch size the ramp reaches)."""
    check_model(layout, mcfg, cfg.seq_len)
    check_pipeline(layout, mcfg.n_layers, cfg.pp_schedule, cfg.pp_stages_per_rank, cfg.pp_layers)
    if layout.pp > 1:
        counts = range(plan.accumulation(plan.start), plan.accumulation(cfg.batch_size) + 1)
        check_microbatches(cfg.pp_schedule, layout.pp, list(counts))


def _check_runnable(cfg: TrainConfig, env: DistEnv, data_path: Path) -> Layout:
    """The run's layout; LayoutError when it does not fit the ranks, the architecture, the model or the batch plan
    (a context extension's model is checked when its parent is loaded). Reads only the data's metadata: nothing is
    written."""
    layout = _resolve_layout(cfg, env)
    hooks = get_arch(cfg.arch).hooks
    for size, flag, hook, what in ((layout.tp, "--tp", "parallelize", "tensor-parallel plan"),
                                   (layout.cp, "--cp", "context_parallel", "context-parallel plan")):
        if size > 1 and hook not in hooks:
            raise LayoutError(f"--arch {cfg.arch} has no {what}; train it with {flag} 1")
    if layout.pp > 1 and cfg.arch != "kunlunbaize":
        raise LayoutError(f"--arch {cfg.arch} has no pipeline stages; train it with --pp 1")
    if cfg.init_from is None:
        _check_layout(cfg, layout, model_config(cfg, load_meta(data_path)["vocab_size"]), plan_batches(cfg, layout.dp))
    return layout


def _setup(cfg: TrainConfig, env: DistEnv, data_path: Path) -> Trainer:
    layout = _check_runnable(cfg, env, data_path)
    data = open_run_data(cfg, data_path)
    plan = plan_batches(cfg, layout.dp)
    model, mcfg, spec, parent = _build(cfg, data, layout, plan)
    if env.distributed:
        torch.manual_seed(cfg.seed + env.rank)
    n_params = sum(p.numel() for p in model.parameters())
    dtype = resolve_dtype(cfg.dtype, env.device)
    document_eot = int(data.meta["eot_id"]) if cfg.doc_mask else None
    runner = place(cfg, env, model, spec, layout, dtype, document_eot)  # allocates only what this rank holds
    if parent is not None:
        runner.load_weights(parent)
    run_dir = Path(cfg.out)
    notes: list[str] = []
    resumed, state = resume_run(cfg, env, run_dir / "checkpoints", data.path, data.meta, mcfg,
                                runner.checkpoint_model(), runner.optimizer, notes)
    progress = RunProgress.from_state(state)
    if env.is_main:
        notes += prepare_run_dir(run_dir, resumed, progress.step)
        if cfg.init_from is not None and resumed is None:
            notes.append(write_parent_record(cfg))
    peak, peak_how = (cfg.peak_tflops * 1e12, "given") if cfg.peak_tflops else peak_flops(
        env.device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    flops_per_token = spec.training_flops(mcfg, cfg.seq_len)
    logger = RunLogger(run_dir, plan.total_steps, progress.step, enabled=env.is_main, progress=cfg.progress)
    if env.is_main:
        (run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        (run_dir / "model_config.json").write_text(mcfg.to_json())
        spent = resumed is not None and progress.tokens >= cfg.tokens  # nothing to train: said once, below
        logger.message(_headline(cfg, env, data, plan, n_params, f"{layout.describe()} {dtype}", peak, peak_how)
                       + (f" | resumed from {resumed} at step {progress.step}" if resumed and not spent else ""))
        _say_notes(logger, cfg, data, notes, resumed, progress)
    stop = StopFlag(verbose=env.is_main)
    stop.install()
    return Trainer(
        cfg=cfg, env=env, data=data, spec=spec, model=model, runner=runner, layout=layout, plan=plan,
        schedule=lr_schedule(cfg, plan.warmup),
        val_sets=validation_batches(data.val, EVAL_BATCH, cfg.eval_batches) if data.val is not None else [],
        logger=logger, window=MetricsWindow(spec.loss_terms(mcfg), flops_per_token, peak, env.world_size,
                                            env.device),
        stop=stop, ckpt=_checkpoint_context(cfg, env, data, spec.checkpoint_config(mcfg), n_params), progress=progress,
        n_params=n_params, resumed=resumed)


def _build(cfg: TrainConfig, data: RunData, layout: Layout,
           plan: BatchPlan) -> tuple[nn.Module, Any, ArchSpec, dict[str, torch.Tensor] | None]:
    """The run's model (on the meta device when its architecture initialises by name: :func:`.runner.place`
    materialises it), its config, its spec and, for a context-extension stage, the parent's weights to load."""
    torch.manual_seed(cfg.seed)  # an architecture built whole on the CPU: every rank builds the same model
    if cfg.init_from is None:
        return (*build_model(cfg, data.meta["vocab_size"], meta=True), None)
    # a context-extension stage: the parent's model and weights at the new context
    model, mcfg, spec, parent = build_extension(cfg, data.meta["vocab_size"], data.path, meta=True)
    _check_layout(cfg, layout, mcfg, plan)
    return model, mcfg, spec, parent


def _checkpoint_context(cfg: TrainConfig, env: DistEnv, data: RunData,
                        model_config: dict[str, Any], n_params: int) -> CheckpointContext:
    return CheckpointContext(root=Path(cfg.out) / "checkpoints", cfg=cfg, world_size=env.world_size,
                             model_config=model_config, vocab_size=data.meta["vocab_size"],
                             data=data.identity, tokenizer_files=data.tokenizer_files, n_params=n_params)


def _headline(cfg: TrainConfig, env: DistEnv, data: RunData, plan: BatchPlan, n_params: int, how: str,
              peak: float, peak_how: str) -> str:
    """The first line a run prints: model, data, devices, budget and the MFU peak."""
    val_tokens = f"{data.val.total:,} val tokens" if data.val is not None else "no validation"
    return (f"{cfg.arch} {cfg.preset}: {n_params:,} parameters | data {data.path} ({data.train.total:,} train / "
            f"{val_tokens}) | {env.world_size} x {env.device.type} {how} | "
            f"budget {cfg.tokens:,} tokens = {plan.total_steps} steps, batch {plan.start}->{cfg.batch_size} x "
            f"{cfg.seq_len} | MFU peak {peak / 1e12:.2f} TFLOP/s ({peak_how})")


def _say_notes(logger: RunLogger, cfg: TrainConfig, data: RunData, notes: list[str], resumed: Path | None,
               progress: RunProgress) -> None:
    """What the user should know before training starts: resume notes, no validation, nothing to train."""
    for note in notes:
        logger.message(note)
    if isinstance(data.train, LongDocWindows):
        logger.message(data.train.describe())
    if data.val is None:
        logger.message(f"no validation: {data.no_val_reason}; no validation loss will be reported")
    if resumed is not None and progress.tokens >= cfg.tokens:
        logger.message(f"nothing to train: {resumed} (step {progress.step}) has already seen {progress.tokens:,} "
                       f"tokens, the whole budget of {cfg.tokens:,}; pass a larger --tokens to train further")
