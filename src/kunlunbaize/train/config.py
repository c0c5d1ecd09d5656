"""The settings of a training run (``kunlun train``'s options), checked before anything starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..arch import ARCHS, DEFAULT
from ..config import PRESETS
from ..defaults import DEFAULT_DATA, TRAIN
from ..rope_scaling import ROPE_TYPES
from .parallel.layout import PP_SCHEDULES
from .schedule import PAPER_TOKENS

__all__ = ["DEFAULT_DATA", "TrainConfig"]


@dataclass
class TrainConfig:
    """Everything about a run except the model shape (that is ``preset`` + ``model_overrides``)."""

    data: str = DEFAULT_DATA
    out: str = "runs/small"
    preset: str = "small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    arch: str = DEFAULT.name  # a name in kunlunbaize.arch.ARCHS, e.g. the matched HF Llama baseline
    seq_len: int = TRAIN["seq_len"]
    tokens: int = TRAIN["tokens"]  # the token budget; the schedules are fractions of it
    batch_size: int = TRAIN["batch_size"]  # global sequences per step at the end of the ramp
    batch_size_start: int | None = None  # None: batch_size × 3072/15360, the paper's ratio
    batch_ramp: float = 469e9 / PAPER_TOKENS
    micro_batch_size: int | None = None  # per rank; None: the largest that lets the ramp start at its start
    lr: float = TRAIN["lr"]  # peak; the paper uses 2.2e-4 at 405B scale
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
    full_weights: str = "auto"  # model.safetensors in each checkpoint: auto (<= 2B parameters), always or never
    resume: str = "auto"  # "auto": newest checkpoint in <out> if any; "none": fresh; or a checkpoint path
    parallel: str = "auto"  # none | ddp | fsdp; auto: ddp under torchrun, none otherwise (all ranks data-parallel)
    dp_replicate: int | None = None  # data-parallel replicas (None: 1, or every rank under --parallel ddp/auto)
    dp_shard: int | None = None  # data-parallel (FSDP2) shards (None: the ranks left over)
    tp: int = 1  # tensor (+ sequence) parallel ranks
    cp: int = 1  # context-parallel ranks (each sequence split over them)
    pp: int = 1  # pipeline ranks (the trunk cut into pp × pp_stages_per_rank stages)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved1f1b
    pp_stages_per_rank: int = 1  # stages per pipeline rank (more than 1: interleaved1f1b only)
    pp_layers: list[int] | None = None  # layers of each stage (None: an even split)
    device: str = "auto"
    dtype: str = "auto"  # fp32 | bf16; auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False
    max_bad_steps: int = 5
    peak_tflops: float | None = None
    stop_at_step: int | None = None  # stop (with a checkpoint) after this step, as if preempted
    progress: bool = True
    init_from: str | None = None  # context extension: a new run starting from this run's / checkpoint's weights
    rope: str | None = None  # its RoPE scaling: linear, dynamic, yarn, llama3 or none (None: the parent's own)
    rope_factor: float | None = None  # None: the new context over the original one
    long_docs: bool = False  # train windows only inside documents of >= seq_len tokens (needs the document index)
    doc_mask: bool = False  # no attention, conv history or MTP target across documents inside a window

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
            ("full_weights", self.full_weights in ("auto", "always", "never"), "auto, always or never"),
            ("resume", bool(self.resume), "auto, none or a checkpoint path"),
            ("parallel", self.parallel in ("auto", "none", "ddp", "fsdp"), "auto, none, ddp or fsdp"),
            ("dp_replicate", opt(self.dp_replicate, lambda v: v >= 1), "None or >= 1"),
            ("dp_shard", opt(self.dp_shard, lambda v: v >= 1), "None or >= 1"),
            ("tp", self.tp >= 1, ">= 1"), ("cp", self.cp >= 1, ">= 1"), ("pp", self.pp >= 1, ">= 1"),
            ("pp_schedule", self.pp_schedule in PP_SCHEDULES, f"one of {', '.join(PP_SCHEDULES)}"),
            ("pp_stages_per_rank", self.pp_stages_per_rank >= 1, ">= 1"),
            ("pp_layers", opt(self.pp_layers, lambda v: len(v) > 0 and min(v) >= 1), "None or counts >= 1"),
            ("dtype", self.dtype in ("auto", "fp32", "bf16"), "auto, fp32 or bf16"),
            ("max_bad_steps", self.max_bad_steps >= 1, ">= 1"),
            ("peak_tflops", opt(self.peak_tflops, lambda v: real(v, 0, lo_open=True)), "None or > 0"),
            ("stop_at_step", opt(self.stop_at_step, lambda v: v >= 1), "None or >= 1"),
            ("rope", self.rope in (None, "none", *ROPE_TYPES), f"none or one of {', '.join(ROPE_TYPES)}"),
            ("rope", self.rope is None or self.init_from is not None,
             "left out without init_from (a context-extension stage starts from a trained checkpoint)"),
            ("rope_factor", opt(self.rope_factor, lambda v: real(v, 1, lo_open=True)), "None or > 1"),
            ("rope_factor", self.rope_factor is None or self.rope not in (None, "none"),
             "left out unless a RoPE scaling type is given (rope)"),
            ("doc_mask", not self.doc_mask or self.arch == DEFAULT.name,
             f"left out with arch {self.arch} (document masking is built into the {DEFAULT.name} model)"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)!r} is invalid: it must be {need}")
