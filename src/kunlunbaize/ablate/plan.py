"""The ablation study's plan (paper Table 4): which runs, with which switches, seeds and token budgets.

Variants: the full model, each single-component ablation (no learnable dense residual, no TransformerX, no MTP)
and the parameter-matched Hugging Face Llama. Every run of a study shares the data, schedule, batch, validation
windows and evaluation; a run differs from another only in its variant's switch, its seed, or (equal-FLOPs
comparison) its token budget.

Two comparisons:

* **equal tokens** (the paper's): every variant trains ``tokens`` tokens;
* **equal training FLOPs**: every variant trains ``tokens × F_full / F_variant`` tokens, where ``F`` is the analytic
  training FLOPs per token, so a cheaper variant sees more data for the full model's compute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch import BASELINE, DEFAULT, get_arch
from ..config import PRESETS, ModelConfig


@dataclass(frozen=True)
class Variant:
    name: str
    arch: str  # the name of its architecture (kunlunbaize.arch)
    switch: dict[str, Any]  # the model-config change that defines it
    label: str


FULL = Variant("full", DEFAULT.name, {}, "KunlunBaize (full)")
BASE = Variant(BASELINE.name, BASELINE.name, {}, BASELINE.title)
"""The matched baseline every variant is also compared against (named after its architecture)."""
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    FULL,
    Variant("no_dense", DEFAULT.name, {"dense_residual": False}, "− dense residual"),
    Variant("no_transformerx", DEFAULT.name, {"transformerx": False}, "− TransformerX"),
    Variant("no_mtp", DEFAULT.name, {"mtp_depth": 0}, "− MTP"),
    BASE,
)}
MATCHES = ("tokens", "flops", "both")


@dataclass
class StudyConfig:
    """A whole study; the per-run training settings are shared by every run."""

    out: str = "runs/ablation"
    data: str = "data/stdlib"
    preset: str = "small"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # applied to every variant, before its switch
    tokens: int = 500_000
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = tuple(VARIANTS)
    match: str = "both"
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    dense_lr_mult: float = 1.0  # the dense-residual logits' learning rate / lr
    eval_every: int = 25
    eval_tasks: tuple[str, ...] = ("bpb", "arith")
    eval_limit: int | None = None
    jobs: int = 1  # runs trained at once, each in its own process
    device: str = "auto"
    dtype: str = "auto"

    def validate(self) -> None:
        problems = []
        if self.preset not in PRESETS:
            problems.append(f"preset {self.preset!r}: one of {', '.join(PRESETS)}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            problems.append(f"variants {', '.join(unknown) or '(none)'}: choose from {', '.join(VARIANTS)}")
        elif len(set(self.variants)) != len(self.variants):
            problems.append("a variant is listed twice")
        if self.match not in MATCHES:
            problems.append(f"match {self.match!r}: one of {', '.join(MATCHES)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            problems.append(f"seeds {list(self.seeds)}: give distinct seeds >= 0")
        if self.tokens < 1 or self.jobs < 1 or self.eval_every < 1:
            problems.append("tokens, jobs and eval_every must be >= 1")
        if not self.dense_lr_mult > 0:
            problems.append(f"dense_lr_mult {self.dense_lr_mult}: must be > 0")
        if self.match != "tokens" and "full" not in self.variants:
            problems.append("the equal-FLOPs comparison is measured against the full model: include variant full")
        if problems:
            raise ValueError("invalid study: " + "; ".join(problems))
        for name in self.variants:  # every variant's config must be valid
            model_config(self, VARIANTS[name])


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    name: str  # folder name: <variant>-s<seed> or <variant>-flops-s<seed>
    variant: str
    seed: int
    tokens: int
    match: str  # "tokens" or "flops"
    flops_per_token: float  # analytic training FLOPs per token

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def variant_overrides(cfg: StudyConfig, variant: Variant) -> dict[str, Any]:
    """The model-config overrides of a variant: the study's, then the variant's switch."""
    overrides = {**cfg.model_overrides, **variant.switch}
    if overrides.get("mtp_depth") == 0:
        overrides.pop("mtp_loss_weights", None)  # weights for depths that no longer exist
    return overrides


def model_config(cfg: StudyConfig, variant: Variant) -> ModelConfig:
    """The variant's model config: the preset, the study's overrides, then the variant's switch."""
    return ModelConfig.preset(cfg.preset, **variant_overrides(cfg, variant))


def training_flops_per_token(cfg: StudyConfig, variant: Variant) -> float:
    """Analytic training FLOPs per token (forward + backward) of the variant at the study's sequence length."""
    return get_arch(variant.arch).training_flops(model_config(cfg, variant), cfg.seq_len)


def plan(cfg: StudyConfig) -> list[RunSpec]:
    """Every run of the study, seed by seed (so a partial study already compares whole seeds): first the
    equal-token runs, then the equal-FLOPs runs of the variants whose budget differs from the full model's."""
    cfg.validate()
    flops = {v: training_flops_per_token(cfg, VARIANTS[v]) for v in cfg.variants}
    runs = []
    for seed in cfg.seeds:
        if cfg.match in ("tokens", "both"):
            runs += [RunSpec(f"{v}-s{seed}", v, seed, cfg.tokens, "tokens", flops[v]) for v in cfg.variants]
        if cfg.match in ("flops", "both"):
            budget = cfg.tokens * flops["full"]
            for v in cfg.variants:
                tokens = max(1, round(budget / flops[v]))
                if cfg.match == "both" and tokens == cfg.tokens:
                    continue  # the same run as its equal-token one (the full model itself)
                name = f"{v}-s{seed}" if v == "full" else f"{v}-flops-s{seed}"
                runs.append(RunSpec(name, v, seed, tokens, "flops", flops[v]))
    return runs


def train_config(cfg: StudyConfig, spec: RunSpec, run_dir: str) -> dict[str, Any]:
    """The ``TrainConfig`` fields of a run (a JSON-able dict)."""
    variant = VARIANTS[spec.variant]
    out = {"data": cfg.data, "out": run_dir, "preset": cfg.preset, "model_overrides": variant_overrides(cfg, variant),
           "arch": variant.arch, "seq_len": cfg.seq_len, "tokens": spec.tokens, "batch_size": cfg.batch_size,
           "lr": cfg.lr, "seed": spec.seed, "eval_every": cfg.eval_every, "ckpt_every": max(1, cfg.eval_every * 2),
           "keep_last": 1, "resume": "auto", "device": cfg.device, "dtype": cfg.dtype, "progress": False}
    if cfg.dense_lr_mult != 1.0:  # only when set, so studies made before the option keep their specs
        out["dense_lr_mult"] = cfg.dense_lr_mult
    return out


def run_dir(cfg: StudyConfig, spec: RunSpec) -> Path:
    """The folder of one run of the study: ``<out>/runs/<name>``."""
    return Path(cfg.out) / "runs" / spec.name
