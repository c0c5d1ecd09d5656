"""A context-extension stage (``kunlun train --init-from RUN --seq-len N --rope yarn --rope-factor F``): a new run
whose model is the parent checkpoint's, at a longer context and with a RoPE scaling, starting from its weights.

The parent's config fixes the shapes; the stage sets ``max_seq_len`` (at least ``--seq-len``) and ``rope_scaling``
(``--rope``; left out: the parent's own; ``none``: none). The factor defaults to the new context over the original
one, and the original context stays the pre-training one across stages (4K → 32K → 128K all scale from 4K, as
DeepSeek-V3's YaRN stages do). Everything else (schedule, loss curve, checkpoints) is the new run's own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import ArchSpec, get_arch
from ..checkpoint import (
    CheckpointError,
    check_keys,
    checkpoint_arch,
    is_export,
    read_config,
    read_trainer_state,
    read_weights,
    resolve_checkpoint,
    tokenizer_digest,
)
from ..config import ModelConfig
from ..rope_scaling import ORIGINAL
from .config import TrainConfig
from .models import build

PARENT_FILE = "parent.json"
"""In the run folder of an extension stage: the parent checkpoint, its step and its model config."""


def parent_checkpoint(cfg: TrainConfig) -> Path:
    """The training checkpoint ``cfg.init_from`` names (a run folder: its newest); CheckpointError otherwise."""
    path = resolve_checkpoint(cfg.init_from)
    if is_export(path):
        raise CheckpointError(f"--init-from {cfg.init_from} is an exported model; give the run folder or "
                              "<run>/checkpoints/step_N it was exported from")
    return path


def parent_model_config(parent: Path, arch: str) -> ModelConfig:
    """The parent's model config; CheckpointError when it is of another architecture than the run's ``--arch``."""
    saved = read_config(parent)
    spec = checkpoint_arch(parent, saved)
    if spec.name != arch:
        raise CheckpointError(f"--init-from {parent} holds a {spec.title} model (--arch {spec.name}), not --arch "
                              f"{arch}; pass --arch {spec.name}")
    try:
        return ModelConfig.from_dict(spec.model_config(saved))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{parent / 'config.json'} is not a model config this version reads ({e})") from None


def extension_config(cfg: TrainConfig, parent: ModelConfig, vocab_size: int) -> ModelConfig:
    """The stage's model config: the parent's with ``--set`` overrides, ``max_seq_len`` ≥ ``--seq-len`` and the
    chosen RoPE scaling. ValueError for a vocabulary other than the data's, or a factor that does not extend."""
    if parent.vocab_size != vocab_size:
        raise CheckpointError(f"--init-from checkpoint has a vocabulary of {parent.vocab_size} tokens but the "
                              f"dataset has {vocab_size}; train on data prepared with the parent's tokenizer")
    original = (parent.rope_scaling or {}).get(ORIGINAL) or parent.max_seq_len
    max_seq_len = max(cfg.model_overrides.get("max_seq_len", parent.max_seq_len), cfg.seq_len)
    scaling: dict[str, Any] | None = parent.rope_scaling
    if cfg.rope == "none":
        scaling = None
    elif cfg.rope is not None:
        factor = cfg.rope_factor if cfg.rope_factor is not None else max_seq_len / original
        if factor <= 1:
            raise ValueError(f"--rope {cfg.rope}: the factor {factor:g} must be > 1 (the context {max_seq_len} "
                             f"does not exceed the original {original}); pass --rope-factor or a longer --seq-len")
        scaling = {"rope_type": cfg.rope, "factor": float(factor), ORIGINAL: original}
    overrides = {**cfg.model_overrides, "max_seq_len": max_seq_len, "rope_scaling": scaling}
    return dataclasses.replace(parent, **overrides)


def check_parent_tokenizer(parent: Path, data_path: Path) -> None:
    """CheckpointError when the parent was trained with another tokenizer than the data's."""
    trained = read_trainer_state(parent).get("data", {}).get("tokenizer_sha256") or tokenizer_digest(parent)
    current = tokenizer_digest(data_path)
    if trained and current and trained != current:
        raise CheckpointError(f"--init-from {parent} was trained with another tokenizer than {data_path} "
                              "(tokenizer.json differs), so its token ids would mean other tokens; train on data "
                              "prepared with the parent's tokenizer (kunlun prepare --tokenizer <parent run>)")


def parent_weights(model: nn.Module, parent: Path) -> dict[str, torch.Tensor]:
    """The parent's weights, checked to fit ``model`` (its names and shapes: a model on the meta device will do);
    CheckpointError when they do not."""
    state = read_weights(parent)
    own = model.state_dict()
    check_keys(parent, own.keys(), state.keys())
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"--init-from {parent}: its weights do not fit the model ({wrong[0]}"
                              + (f", and {len(wrong) - 1} more" if len(wrong) > 1 else "")
                              + "); an extension keeps the parent's shapes, so drop the --set that changes them")
    return state


def build_extension(cfg: TrainConfig, vocab_size: int, data_path: Path,
                    meta: bool = False) -> tuple[nn.Module, ModelConfig, ArchSpec, dict[str, torch.Tensor]]:
    """The stage's model (as :func:`.models.build` makes it: ``meta`` asks for the meta device), its config, its
    architecture's spec and the parent's weights, checked to fit it: load them into the placed model
    (``Runner.load_weights``)."""
    parent = parent_checkpoint(cfg)
    if parent.resolve().is_relative_to((Path(cfg.out) / "checkpoints").resolve()):
        raise CheckpointError(f"--init-from {cfg.init_from} is a checkpoint of --out {cfg.out} itself; an extension "
                              "stage is a new run: give it another --out folder")
    check_parent_tokenizer(parent, data_path)
    parent_cfg = parent_model_config(parent, cfg.arch)
    mcfg = extension_config(cfg, parent_cfg, vocab_size)
    spec = get_arch(cfg.arch)
    model = build(spec, mcfg, meta)
    return model, mcfg, spec, parent_weights(model, parent)


def write_parent_record(cfg: TrainConfig) -> str:
    """``parent.json`` in the run folder: which checkpoint (and step) the stage started from; return the line
    that says so."""
    parent = parent_checkpoint(cfg)
    step = read_trainer_state(parent).get("step")
    record = {"init_from": cfg.init_from, "checkpoint": str(parent.resolve()), "step": step,
              "model_config": read_config(parent)}
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PARENT_FILE).write_text(json.dumps(record, indent=2))
    return f"context extension: initialised from {parent} (step {step}); recorded in {run_dir / PARENT_FILE}"
