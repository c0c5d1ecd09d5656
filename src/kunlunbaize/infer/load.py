"""Load a trained model and its tokenizer for inference from a run folder or a checkpoint folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model import KunlunBaize

EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class LoadError(ValueError):
    """The checkpoint or tokenizer cannot be used; the message says which file and what to do."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder: ``path`` itself, or the newest complete checkpoint of a run folder."""
    from ..train.checkpoint import latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise LoadError(f"no checkpoint at {p}: give a run folder (e.g. runs/small) or a checkpoint folder")
    if (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file():
        return p
    latest = latest_checkpoint(p / "checkpoints") if (p / "checkpoints").is_dir() else latest_checkpoint(p)
    if latest is None:
        raise LoadError(f"{p} holds no complete checkpoint (model.safetensors + trainer_state.json); "
                        "train first with `kunlun train`")
    return latest


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[KunlunBaize, Path]:
    """The model of a checkpoint folder (``config.json`` + ``model.safetensors``), in eval mode.

    Reads both our training checkpoints and folders written by ``kunlun export --hf`` (transformers
    layout, possibly sharded), without needing transformers for either.
    """
    ckpt = resolve_checkpoint(path)
    try:
        raw = json.loads((ckpt / "config.json").read_text())
        hf = raw.get("model_type") == "kunlunbaize"
        cfg = ModelConfig.from_dict(_model_config_dict(raw) if hf else raw)
    except (OSError, json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
        raise LoadError(f"{ckpt / 'config.json'} is missing or invalid ({e})") from None
    with torch.device("meta"):
        model = KunlunBaize(cfg)
    state = _read_safetensors(ckpt, device)
    if hf:
        from ..hf.keys import from_hf

        try:
            state = from_hf(state)
        except KeyError as e:
            raise LoadError(f"{ckpt} is not a KunlunBaize export: {e}") from None
    if cfg.tie_embeddings:
        state.pop("head.weight", None)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise LoadError(f"{ckpt / 'model.safetensors'} does not match {ckpt / 'config.json'}: {e}") from None
    model.rope.inv_freq = model.rope._inv_freq(torch.device(device))  # not saved: rebuilt off the meta device
    return model.to(device=device, dtype=dtype).eval(), ckpt


def _model_config_dict(hf_config: dict) -> dict:
    """The :class:`ModelConfig` fields of an exported transformers ``config.json``."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    d = {k: v for k, v in hf_config.items() if k in names}
    d["tie_embeddings"] = bool(hf_config.get("tie_word_embeddings", False))
    return d


def _read_safetensors(ckpt: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """``model.safetensors``, or every shard listed in ``model.safetensors.index.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = ckpt / "model.safetensors.index.json"
    try:
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(str(ckpt / shard), device=str(device)))
            return state
        return load_file(str(ckpt / "model.safetensors"), device=str(device))
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as e:
        raise LoadError(f"cannot read the weights in {ckpt} ({e}); the files are damaged or incomplete — "
                        "use another checkpoint of the run or export again") from None


def load_tokenizer(ckpt: Path, vocab_size: int):
    """The ``tokenizers.Tokenizer`` saved with a checkpoint, and its end-of-text id (None if it has none)."""
    from tokenizers import Tokenizer

    file = ckpt / "tokenizer.json"
    if not file.is_file():
        raise LoadError(f"{ckpt} has no tokenizer.json; copy the tokenizer of the training data "
                        "(the `kunlun prepare` folder) next to model.safetensors")
    tok = Tokenizer.from_file(str(file))
    if tok.get_vocab_size() != vocab_size:
        raise LoadError(f"tokenizer {file} has {tok.get_vocab_size()} tokens but the model has {vocab_size}: "
                        "they were not trained together")
    eot = next((tok.token_to_id(t) for t in EOT_CANDIDATES if tok.token_to_id(t) is not None), None)
    return tok, eot
