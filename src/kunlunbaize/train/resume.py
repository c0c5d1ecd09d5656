"""Resuming a run from a checkpoint (refusing one of another tokenizer, model or optimiser layout; falling back
past damaged ones) and saving the training state into one."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import get_arch
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
from ..checkpoint.state import TrainState, load_checkpoint, save_checkpoint, writes_full_weights
from ..config import ModelConfig
from .config import TrainConfig
from .distributed import DistEnv, any_rank


@dataclass
class RunProgress:
    """How far a run has got: optimiser steps taken, samples (sequences) consumed and tokens trained on."""

    step: int = 0
    consumed: int = 0
    tokens: int = 0

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> RunProgress:
        """The progress a checkpoint's trainer state records (a fresh run: zero)."""
        if state is None:
            return cls()
        return cls(step=state["step"], consumed=state["consumed_samples"], tokens=state["tokens"])


@dataclass(frozen=True)
class CheckpointContext:
    """What every checkpoint of a run records beside the model and optimiser state."""

    root: Path
    """The run's ``checkpoints/`` folder."""
    cfg: TrainConfig
    world_size: int
    model_config: dict[str, Any]
    """The ``config.json`` of the checkpoint."""
    vocab_size: int
    data: dict[str, Any]
    """The dataset's identity: path, tokenizer digest, train tokens."""
    tokenizer_files: list[Path]
    n_params: int = 0
    """The model's parameters (``--full-weights auto`` decides by them)."""


def save_training_checkpoint(ctx: CheckpointContext, progress: RunProgress, model: nn.Module | TrainState,
                             optimizer: torch.optim.Optimizer | None) -> Path:
    """Save model, optimiser, RNG and trainer state at ``progress.step`` (every rank); return the folder. ``model``
    may be a pipeline rank's :class:`TrainState` (with its own optimisers)."""
    full = writes_full_weights(ctx.cfg.full_weights, ctx.n_params)
    state = {"step": progress.step, "consumed_samples": progress.consumed, "tokens": progress.tokens,
             "world_size": ctx.world_size, "train_config": dataclasses.asdict(ctx.cfg),
             "data_meta_vocab": ctx.vocab_size, "data": ctx.data, "full_weights": full}
    return save_checkpoint(ctx.root, progress.step, model, optimizer, state, ctx.model_config, ctx.cfg.keep_last,
                           ctx.tokenizer_files, full_weights=full)


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
        _check_arch(path, saved, arch)
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


def _check_arch(path: Path, saved: Any, arch: str) -> None:
    """Refuse a checkpoint of another architecture than the run's ``--arch``."""
    trained_as = checkpoint_arch(path, saved) if isinstance(saved, dict) else None
    if trained_as is not None and trained_as.name != arch:
        raise CheckpointError(f"checkpoint {path} holds a {trained_as.title} model (--arch {trained_as.name}), not "
                              f"--arch {arch}; resume with --arch {trained_as.name}, or train into another --out "
                              "folder")


def resume_run(cfg: TrainConfig, env: DistEnv, ckpt_root: Path, data_path: Path, meta: dict[str, Any],
            mcfg: ModelConfig, model: nn.Module | TrainState, optimizer: torch.optim.Optimizer | None,
            notes: list[str]) -> tuple[Path | None, dict[str, Any] | None]:
    """Load the checkpoint ``cfg.resume`` asks for into ``model`` and ``optimizer``; under ``auto``, fall back past
    damaged ones to the newest good. Return it and its trainer state (None, None: a fresh run); ``notes`` gets
    what the user should hear (fallbacks, another dataset)."""
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
        if any_rank(env, error is not None):
            error = error or CheckpointDamaged(f"could not load checkpoint {path} on another rank (see its message)")
            if not auto or i + 1 == len(candidates):
                raise error
            notes.append(f"{error}\n-> falling back to the previous checkpoint {candidates[i + 1]}")
            continue
        if note:
            notes.append(note)
        notes += _document_option_notes(path, state, cfg)
        return path, state
    return None, None


def _document_option_notes(path: Path, state: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Notes for ``--long-docs``/``--doc-mask`` given otherwise than in the run the checkpoint continues: the same
    sample position then reads other windows, or the windows are read otherwise."""
    saved = state.get("train_config") or {}
    notes = []
    for key, flag in (("long_docs", "--long-docs"), ("doc_mask", "--doc-mask")):
        was, now = bool(saved.get(key, False)), getattr(cfg, key)
        if was != now:
            notes.append(f"note: {path} was trained {'with' if was else 'without'} {flag}, this run is "
                         f"{'with' if now else 'without'} it; training continues from the same sample position")
    return notes


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
