"""Atomic, resumable training checkpoints: Distributed Checkpoint for model + optimiser, safetensors for export.

One folder per checkpoint, ``<run>/checkpoints/step_00000100/``:

    .metadata, __*_*.distcp    model and optimiser state (DCP; sharded under FSDP2, re-shardable on load)
    model.safetensors          full model weights (rank 0), for inference and export — optional (see below)
    config.json                the model config
    tokenizer.json, …          the dataset's tokenizer (a PreTrainedTokenizerFast folder)
    rng_<rank>.pt              each rank's RNG states
    trainer_state.json         step, samples and tokens consumed, … — written last

Everything is written into ``step_…tmp`` and renamed into place, so a run killed mid-save leaves no
folder that looks complete; a checkpoint without ``trainer_state.json`` is never resumed from. Files get the
usual permissions (``0666`` less the umask), ``model.safetensors`` included.

``model.safetensors`` gathers the whole model onto rank 0's CPU: ``kunlun train --full-weights`` decides whether a
run writes it (``auto``: up to :data:`FULL_WEIGHTS_AUTO_MAX` parameters), and ``trainer_state.json`` records the
choice (``full_weights``). Without it every reader takes the weights from the DCP files (:mod:`.dcp_weights`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .errors import CheckpointDamaged
from .folder import STATE_FILE, checkpoint_dirs, damaged, read_trainer_state, resolve_checkpoint


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _root_logger_off():
    # DCP logs its own tracebacks on the root logger when a checkpoint is unreadable; the CheckpointError says it.
    root = logging.getLogger()
    was = root.disabled
    root.disabled = True
    try:
        yield
    finally:
        root.disabled = was


def _quiet(fn, *args, **kwargs):
    # DCP warns that it runs without a process group in single-process runs; that is intended here.
    with warnings.catch_warnings(), _root_logger_off():
        warnings.filterwarnings("ignore", message=".*process group.*")
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, **kwargs)


def honour_umask(path: Path) -> None:
    """Give ``path`` (a file, or every file under a folder) the mode a plain ``open`` would: ``0666`` less the umask.

    Some writers (safetensors' ``save_file``) create files ``0600`` through a private temporary file.
    """
    mask = os.umask(0)
    os.umask(mask)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in files:
        os.chmod(f, 0o666 & ~mask)


FULL_WEIGHTS_POLICIES = ("auto", "always", "never")
FULL_WEIGHTS_AUTO_MAX = 2_000_000_000
"""The most parameters for which ``--full-weights auto`` writes ``model.safetensors`` (8 GB in fp32 on rank 0's
CPU at each checkpoint); a larger model's weights stay in the DCP files only."""


def writes_full_weights(policy: str, n_params: int) -> bool:
    """Whether a checkpoint of a model of ``n_params`` parameters gets ``model.safetensors`` under ``policy``
    (one of :data:`FULL_WEIGHTS_POLICIES`)."""
    if policy not in FULL_WEIGHTS_POLICIES:
        raise ValueError(f"full weights policy {policy!r}: use one of {', '.join(FULL_WEIGHTS_POLICIES)}")
    return policy == "always" or (policy == "auto" and n_params <= FULL_WEIGHTS_AUTO_MAX)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded model weights on CPU (a collective under FSDP2: call on every rank)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write weights with safetensors, keeping one copy of tensors that share storage (tied weights)."""
    from safetensors.torch import save_file

    seen: dict[tuple[int, int], str] = {}
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp), metadata=metadata)
    honour_umask(tmp)
    os.replace(tmp, path)


@runtime_checkable
class TrainState(Protocol):
    """A model and optimiser that are not one module and one optimiser (a pipeline rank's stages), as checkpoints
    save and load them: under the keys one process's ``get_state_dict(model, optimizer)`` gives, so a checkpoint
    loads under any layout."""

    def checkpoint_state(self) -> dict[str, Any]:
        """``{"model": …, "optim": …}`` of this rank (DCP saves it; a load fills it in place)."""

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Put a loaded :meth:`checkpoint_state` into the model and optimiser."""

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The whole model's unsharded weights on CPU on rank 0, empty elsewhere (a collective: every rank)."""


class _ModuleState:
    """One module and its optimiser (plain, DDP or FSDP2) as a :class:`TrainState`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def checkpoint_state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_weights(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.model)


def train_state(model: nn.Module | TrainState, optimizer: torch.optim.Optimizer | None) -> TrainState:
    """``model`` when it is a :class:`TrainState` already, else the module and ``optimizer`` as one."""
    return model if isinstance(model, TrainState) else _ModuleState(model, optimizer)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model: nn.Module | TrainState, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict[str, Any], model_config: dict[str, Any] | None, keep_last: int,
                    extra_files: list[Path] = (), full_weights: bool = True) -> Path:
    """Save atomically to ``root/step_<step>`` on every rank; prune to the newest ``keep_last``.

    ``extra_files`` (the tokenizer) are copied in, so a checkpoint folder is self-contained. ``model`` may be a
    :class:`TrainState` (then ``optimizer`` is its own). ``full_weights``: also gather the whole model onto rank 0
    and write ``model.safetensors`` (the same on every rank: it is a collective).
    """
    state = train_state(model, optimizer)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    _quiet(dcp.save, state.checkpoint_state(), checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_{_rank()}.pt")
    weights = state.full_weights() if full_weights else {}
    if _rank() == 0:
        if full_weights:
            save_safetensors(weights, tmp / "model.safetensors", {"format": "pt"})
        if model_config is not None:
            (tmp / "config.json").write_text(json.dumps(model_config, indent=2))
        for f in extra_files:
            shutil.copyfile(f, tmp / f.name)
    _barrier()
    if _rank() == 0:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))  # last file: marks it complete
        old = root / f"step_{step:08d}.old"
        if final.exists():  # re-saving a step (resumed from an earlier checkpoint): never without a complete one
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for old in checkpoint_dirs(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module | TrainState,
                    optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore model, optimiser and this rank's RNG from ``path``; return the trainer state. ``model`` may be a
    :class:`TrainState` (then ``optimizer`` is its own).

    Raises CheckpointError naming the damaged file; the model and optimiser may then be partly overwritten
    (load another checkpoint into them, or rebuild them).
    """
    path = resolve_checkpoint(path, resumable=True)
    trainer_state = read_trainer_state(path)
    try:
        target = train_state(model, optimizer)
        state = target.checkpoint_state()
        _quiet(dcp.load, state, checkpoint_id=str(path))
        target.load_checkpoint_state(state)
    except (Exception, CheckpointException) as e:  # damaged or mismatched files (DCP's is a BaseException)
        raise CheckpointDamaged(damaged(path, "its model/optimiser state (.metadata, *.distcp)", e)) from e
    rng = path / f"rng_{_rank()}.pt"
    if rng.is_file():  # absent when resuming on more ranks than saved: those ranks keep their seeded RNG
        try:
            _set_rng_state(torch.load(rng, weights_only=False))
        except Exception as e:  # UnpicklingError, PytorchStreamReader's RuntimeError, a wrong structure …
            raise CheckpointDamaged(damaged(path, rng, e)) from e
    return trainer_state
