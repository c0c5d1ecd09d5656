"""The on-disk layout of runs, checkpoints and exports, and reading it.

A run folder ``runs/NAME/`` holds ``checkpoints/step_00000100/`` folders (see :mod:`.state` for their files); a
checkpoint is complete once its ``trainer_state.json`` exists. Its full weights (``model.safetensors``) are optional:
without them the weights are read from its DCP files (:mod:`.dcp_weights`). An export (``kunlun export --hf``, a
post-trained model) is a transformers folder: ``config.json`` with a ``model_type`` and ``model.safetensors`` (or
shards listed in ``model.safetensors.index.json``). Every command that takes a model takes any of the three.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from ..arch import ARCHS, DEFAULT, ArchSpec
from .errors import CheckpointDamaged, CheckpointError

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
DCP_METADATA = ".metadata"  # the model and optimiser state of a training checkpoint (see .state, .dcp_weights)
_STEP_DIR = re.compile(r"step_\d+$")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def is_training_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a complete ``kunlun train`` checkpoint (it can be resumed from)."""
    return (path / STATE_FILE).is_file()


def is_export(path: Path) -> bool:
    """Whether ``path`` is a transformers folder: a config.json and its weights, and no training state (complete
    or, in a save interrupted part-way, without its ``trainer_state.json``)."""
    has_weights = has_full_weights(path)
    training = is_training_checkpoint(path) or (path / DCP_METADATA).is_file()
    return has_weights and (path / CONFIG_FILE).is_file() and not training


def has_full_weights(path: Path) -> bool:
    """Whether ``path`` holds its weights as safetensors (``model.safetensors`` or an index of shards); a training
    checkpoint saved without them has its weights only in its DCP files."""
    return (path / WEIGHTS_FILE).is_file() or (path / WEIGHTS_INDEX).is_file()


def resolve_checkpoint(path: str | Path, *, resumable: bool = False) -> Path:
    """The checkpoint ``path`` names: a complete checkpoint or an export folder itself, else the newest complete
    checkpoint of a run folder (or of its ``checkpoints/`` folder). ``resumable``: refuse an export (it has no
    optimiser state to resume training from)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}: {p} does not exist; give a run folder (e.g. runs/small), a "
                              "checkpoint folder (<run>/checkpoints/step_N) or an exported model folder")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file, not a checkpoint folder; give a run folder, <run>/checkpoints/step_N "
                              "or an exported model folder")
    if is_training_checkpoint(p):
        return p
    if is_export(p):
        if resumable:
            raise CheckpointError(f"{p} is an exported model, not a training checkpoint: it has no optimiser state "
                                  "to resume from; give <run>/checkpoints/step_N, or --resume none")
        return p
    for root in (p / "checkpoints", p):
        newest = latest_checkpoint(root)
        if newest is not None:
            return newest
    raise CheckpointError(f"{p} holds no complete checkpoint (no {STATE_FILE}: not trained yet, or a save "
                          "interrupted part-way); train first with `kunlun train`, or give an earlier checkpoint")


def read_json(file: Path, what: str) -> dict[str, Any]:
    """A JSON object file of a checkpoint; CheckpointDamaged naming it when it is missing, damaged or not an object."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: a checkpoint folder holds {file.name} next to its weights — use "
                              "a checkpoint written by `kunlun train` or `kunlun export --hf`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointDamaged(f"{file} is unreadable or truncated ({e}) — use another checkpoint of the run, or "
                                f"copy {file.name} from the run's other checkpoints") from None
    if not isinstance(raw, dict):
        raise CheckpointDamaged(f"{file} holds a JSON {type(raw).__name__}, not {what} — use another checkpoint "
                                "of the run")
    return raw


def read_config(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict."""
    return read_json(ckpt / CONFIG_FILE, "a model config")


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``path``; CheckpointDamaged when it is missing or damaged."""
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
        if not isinstance(state, dict) or not {"step", "consumed_samples", "tokens"} <= state.keys():
            raise ValueError("not a trainer state")
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(damaged(path, state_file, e)) from None
    return state


def damaged(path: Path, file: Path | str, e: BaseException) -> str:
    """The message for a checkpoint whose ``file`` cannot be read: what broke, and how to go on."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    reason = f"{type(e).__name__}: {lines[-1]}" if lines else type(e).__name__
    return (f"could not load checkpoint {path}: {file} is damaged or unreadable ({reason}). Resume from an "
            f"earlier checkpoint with --resume {path.parent}/step_N, or start afresh with --resume none in another "
            "--out folder")


def _train_config(ckpt: Path) -> dict[str, Any]:
    try:
        config = json.loads((ckpt / STATE_FILE).read_text())["train_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return config if isinstance(config, dict) else {}


def training_data(ckpt: Path) -> str | None:
    """The prepared data folder a ``kunlun train`` checkpoint was trained on (as given to it), or None if unknown."""
    data = _train_config(ckpt).get("data")
    return str(data) if data is not None else None


def checkpoint_arch(ckpt: Path, config: dict[str, Any] | None = None) -> ArchSpec:
    """The architecture of a checkpoint or export folder.

    Said by ``config.json`` (``arch``, or ``model_type`` of an export); for checkpoints written before the
    architecture was recorded there, by ``trainer_state.json`` or else by the weight names' prefix.
    """
    raw = read_config(ckpt) if config is None else config
    if raw.get("arch") in ARCHS:
        return ARCHS[raw["arch"]]
    by_type = {spec.hf_model_type: spec for spec in ARCHS.values()}
    if raw.get("model_type") in by_type:
        return by_type[raw["model_type"]]
    trained_as = _train_config(ckpt).get("arch")
    if trained_as in ARCHS:
        return ARCHS[trained_as]
    names = weight_names(ckpt)
    prefixed = [s for s in ARCHS.values() if s.weight_prefix and any(k.startswith(s.weight_prefix) for k in names)]
    return prefixed[0] if prefixed else DEFAULT


def weight_names(ckpt: Path) -> list[str]:
    """Tensor names of the checkpoint's safetensors files, else of its DCP files (headers and metadata only); empty
    when they cannot be read."""
    from safetensors import safe_open

    index = ckpt / WEIGHTS_INDEX
    try:
        if not has_full_weights(ckpt) and (ckpt / DCP_METADATA).is_file():
            from .dcp_weights import DcpWeights  # torch.distributed.checkpoint is slow to import: only here

            return DcpWeights(ckpt).names()
        if index.is_file():
            return list(json.loads(index.read_text())["weight_map"])
        with safe_open(str(ckpt / WEIGHTS_FILE), framework="pt") as f:
            return list(f.keys())
    except Exception:  # any damage: no names (the loader reports it properly)
        return []


def read_weights(ckpt: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """``model.safetensors``, or every shard listed in ``model.safetensors.index.json``; a training checkpoint
    saved without them: every model tensor of its DCP files (a whole-model load, in one process)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not has_full_weights(ckpt) and (ckpt / DCP_METADATA).is_file():
        from .dcp_weights import DcpWeights

        return DcpWeights(ckpt).read_all(device)
    index = ckpt / WEIGHTS_INDEX
    try:
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(str(ckpt / shard), device=str(device)))
            return state
        return load_file(str(ckpt / WEIGHTS_FILE), device=str(device))
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointDamaged(f"cannot read the weights in {ckpt} ({e}); the files are damaged or incomplete — "
                                "use another checkpoint of the run or export again") from None


def check_keys(ckpt: Path, expected, found, optional: tuple[str, ...] = ()) -> None:
    """A short CheckpointError when the weight names differ from the model's (counts and a few examples)."""
    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    if not missing and not unexpected:
        return

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f", … ({len(keys)} in all)" if len(keys) > 3 else "")

    parts = ([f"{len(missing)} missing ({few(missing)})"] if missing else []) + (
        [f"{len(unexpected)} unexpected ({few(unexpected)})"] if unexpected else [])
    raise CheckpointError(f"the weights in {ckpt} do not match its config.json: {'; '.join(parts)} — the folder "
                          "mixes files of different models; use a checkpoint written as a whole by `kunlun train`")


def tokenizer_digest(folder: Path) -> str | None:
    """SHA-256 of what fixes the token ids in ``folder/tokenizer.json`` (a dataset's or a checkpoint's): the model
    (vocabulary, merges), the added tokens, the normalizer and the pre-tokenizer; None when there is no file.

    Formatting and settings that do not change ids (padding, truncation, decoder) do not count.
    """
    file = folder / TOKENIZER_FILE
    if not file.is_file():
        return None
    data = file.read_bytes()
    try:
        tok = json.loads(data)
        added = [(t.get("id"), t.get("content"), t.get("special")) for t in tok.get("added_tokens") or []]
        data = json.dumps({"model": tok.get("model"), "added_tokens": added, "normalizer": tok.get("normalizer"),
                           "pre_tokenizer": tok.get("pre_tokenizer")}, sort_keys=True).encode()
    except (ValueError, AttributeError, TypeError):  # not the usual structure: compare the bytes
        pass
    return hashlib.sha256(data).hexdigest()
