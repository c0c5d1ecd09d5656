"""Atomic, resumable checkpoints: Distributed Checkpoint for model + optimiser, safetensors for export.

One folder per checkpoint, ``<run>/checkpoints/step_00000100/``:

    .metadata, __*_*.distcp    model and optimiser state (DCP; sharded under FSDP2, re-shardable on load)
    model.safetensors          full model weights (rank 0), for inference and export
    config.json                the model config
    tokenizer.json, …          the dataset's tokenizer (a PreTrainedTokenizerFast folder)
    rng_<rank>.pt              each rank's RNG states
    trainer_state.json         step, samples and tokens consumed, … — written last

Everything is written into ``step_…tmp`` and renamed into place, so a run killed mid-save leaves no
folder that looks complete; a checkpoint without ``trainer_state.json`` is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

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

STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _quiet(fn, *args, **kwargs):
    # DCP warns that it runs without a process group in single-process runs; that is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*process group.*")
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, **kwargs)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
            and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


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
    os.replace(tmp, path)


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


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], model_config: dict[str, Any] | None, keep_last: int,
                    extra_files: list[Path] = ()) -> Path:
    """Save atomically to ``root/step_<step>`` on every rank; prune to the newest ``keep_last``.

    ``extra_files`` (the tokenizer) are copied in, so a checkpoint folder is self-contained.
    """
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _quiet(dcp.save, {"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_{_rank()}.pt")
    weights = full_state_dict(model)
    if _rank() == 0:
        save_safetensors(weights, tmp / "model.safetensors", {"format": "pt"})
        if model_config is not None:
            (tmp / "config.json").write_text(json.dumps(model_config, indent=2))
        for f in extra_files:
            shutil.copyfile(f, tmp / f.name)
    _barrier()
    if _rank() == 0:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))  # last file: marks it complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimiser and this rank's RNG from ``path``; return the trainer state."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE}); it was probably "
                              "interrupted while saving — resume from an earlier one")
    try:
        trainer_state = json.loads(state_file.read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        _quiet(dcp.load, state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (Exception, CheckpointException) as e:  # damaged or mismatched files (DCP's is a BaseException)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = lines[-1] if lines else ""
        raise CheckpointError(
            f"could not load checkpoint {path}: {type(e).__name__} {reason}. If its files are damaged, delete "
            "this folder to resume from the previous checkpoint, or start a fresh run in another --out folder"
        ) from e
    rng = path / f"rng_{_rank()}.pt"
    if rng.is_file():  # absent when resuming on more ranks than saved: those ranks keep their seeded RNG
        _set_rng_state(torch.load(rng, weights_only=False))
    return trainer_state
