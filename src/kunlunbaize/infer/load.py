"""Load a trained KunlunBaize for inference from a run, checkpoint or export folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..arch import DEFAULT
from ..checkpoint import CheckpointError, check_keys, checkpoint_arch, read_config, read_weights, resolve_checkpoint
from ..checkpoint.keys import from_hf
from ..config import ModelConfig
from ..model import KunlunBaize


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[KunlunBaize, Path]:
    """The model of a checkpoint folder (``config.json`` + ``model.safetensors``, or a training checkpoint's DCP
    files when it was saved without them: a whole-model load), in eval mode.

    Reads both our training checkpoints and folders written by ``kunlun export --hf`` (transformers
    layout, possibly sharded), without needing transformers for either. A checkpoint of another architecture
    (the Llama baseline) is refused with a CheckpointError that says so (load it with
    :func:`kunlunbaize.infer.generator.load_for_generation`).
    """
    ckpt = resolve_checkpoint(path)
    raw = read_config(ckpt)
    cfg = checkpoint_model_config(ckpt, raw)
    hf = raw.get("model_type") == DEFAULT.hf_model_type
    return _build(ckpt, cfg, _model_state(ckpt, read_weights(ckpt, device), hf, cfg), device, dtype), ckpt


def checkpoint_model_config(ckpt: Path, raw: dict | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a KunlunBaize checkpoint or export (``raw``: its ``config.json``, read when
    None); a CheckpointError for another architecture or a config that does not describe a KunlunBaize model."""
    raw = read_config(ckpt) if raw is None else raw
    spec = checkpoint_arch(ckpt, raw)
    if spec is not DEFAULT:
        raise CheckpointError(f"{ckpt} is a {spec.note} checkpoint (`kunlun train --arch {spec.name}`), not a "
                              "KunlunBaize model — load it with kunlunbaize.infer.generator.load_for_generation; "
                              "`kunlun generate` and `kunlun export --hf` take it as it is")
    hf = raw.get("model_type") == DEFAULT.hf_model_type
    try:
        return ModelConfig.from_dict(_model_config_dict(raw) if hf else raw)
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'} does not describe a KunlunBaize model ({e}) — "
                              "use a checkpoint written by `kunlun train` or `kunlun export --hf`") from None


def load_as_kunlunbaize(path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> tuple[KunlunBaize, Path]:
    """Like :func:`load_model`, and a checkpoint or export of another architecture as the KunlunBaize that computes
    its logits, where its spec has that view (``ArchSpec.as_kunlunbaize``: the Llama baseline is KunlunBaize with
    all three switches off); a CheckpointError for an architecture without one."""
    ckpt = resolve_checkpoint(path)
    raw = read_config(ckpt)
    spec = checkpoint_arch(ckpt, raw)
    if spec is DEFAULT:
        return load_model(ckpt, device, dtype)
    if spec.as_kunlunbaize is None:
        raise CheckpointError(f"{ckpt} is a {spec.note} checkpoint, which has no KunlunBaize form")
    try:
        cfg, state = spec.as_kunlunbaize(raw, read_weights(ckpt, device))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{ckpt} ({spec.note}) cannot be loaded as a KunlunBaize decoder: {e}") from None
    return _build(ckpt, cfg, state, device, dtype), ckpt


def _build(ckpt: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device,
           dtype: torch.dtype) -> KunlunBaize:
    """The KunlunBaize of ``cfg`` holding ``state`` (the weights of ``ckpt``, named as KunlunBaize names them)."""
    with torch.device("meta"):
        model = KunlunBaize(cfg)
    check_keys(ckpt, model.state_dict().keys(), state.keys())
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shapes differ
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise CheckpointError(f"the weights in {ckpt} do not match its config.json ({detail}) — the folder mixes "
                              "files of different models; use a checkpoint written as a whole by `kunlun train`"
                              ) from None
    model.rope.inv_freq = model.rope._inv_freq(torch.device(device))  # not saved: rebuilt off the meta device
    return model.to(device=device, dtype=dtype).eval()


def _model_state(ckpt: Path, state: dict[str, torch.Tensor], hf: bool, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights with :class:`KunlunBaize` names (an export's are renamed), without a tied head's copy."""
    if hf:
        try:
            state = from_hf(state)
        except KeyError as e:
            raise CheckpointError(f"{ckpt} is not a KunlunBaize export: {e}") from None
    if cfg.tie_embeddings:
        state.pop("head.weight", None)
    return state


def _model_config_dict(hf_config: dict) -> dict:
    """The :class:`ModelConfig` fields of an exported transformers ``config.json``."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    d = {k: v for k, v in hf_config.items() if k in names}
    d["tie_embeddings"] = bool(hf_config.get("tie_word_embeddings", False))
    return d
