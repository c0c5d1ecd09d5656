"""Load a trained model and its tokenizer for inference from a run folder or a checkpoint folder."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
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


def read_config(ckpt: Path) -> dict:
    """The checkpoint's ``config.json`` as a dict; a LoadError naming the file when it is missing or damaged."""
    file = ckpt / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(f"{file} is missing: a checkpoint folder holds config.json next to model.safetensors — "
                        "use a checkpoint written by `kunlun train` or `kunlun export --hf`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{file} is unreadable or truncated ({e}) — use another checkpoint of the run, "
                        "or copy config.json from the run's other checkpoints") from None
    if not isinstance(raw, dict):
        raise LoadError(f"{file} holds a JSON {type(raw).__name__}, not a model config — "
                        "use another checkpoint of the run")
    return raw


def checkpoint_arch(ckpt: Path, config: dict | None = None) -> str:
    """``"kunlunbaize"`` or ``"llama"`` (the baseline of ``kunlun train --arch llama``) for a checkpoint folder.

    Said by ``config.json`` (``arch``, or ``model_type`` of an export); for checkpoints written before the
    architecture was recorded there, by ``trainer_state.json`` or else by the weight names (``hf.model.…``).
    """
    from ..train.llama_baseline import ARCH_KEY

    raw = read_config(ckpt) if config is None else config
    if raw.get(ARCH_KEY) in ("kunlunbaize", "llama"):
        return raw[ARCH_KEY]
    if raw.get("model_type") in ("kunlunbaize", "llama"):
        return raw["model_type"]
    try:
        arch = json.loads((ckpt / "trainer_state.json").read_text())["train_config"]["arch"]
        if arch in ("kunlunbaize", "llama"):
            return arch
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return "llama" if any(k.startswith("hf.model.") for k in weight_names(ckpt)) else "kunlunbaize"


def training_data(ckpt: Path) -> str | None:
    """The prepared data folder a ``kunlun train`` checkpoint was trained on (as given to it), or None if unknown."""
    try:
        return str(json.loads((ckpt / "trainer_state.json").read_text())["train_config"]["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def weight_names(ckpt: Path) -> list[str]:
    """Tensor names of the checkpoint's safetensors files (headers only); empty when they cannot be read."""
    from safetensors import safe_open

    files = [ckpt / "model.safetensors"]
    index = ckpt / "model.safetensors.index.json"
    try:
        if index.is_file():
            return list(json.loads(index.read_text())["weight_map"])
        with safe_open(str(files[0]), framework="pt") as f:
            return list(f.keys())
    except Exception:  # any damage: no names (the loader reports it properly)
        return []


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[KunlunBaize, Path]:
    """The model of a checkpoint folder (``config.json`` + ``model.safetensors``), in eval mode.

    Reads both our training checkpoints and folders written by ``kunlun export --hf`` (transformers
    layout, possibly sharded), without needing transformers for either. A Llama baseline checkpoint is
    refused with a LoadError that says so (load it with :func:`kunlunbaize.infer.llama.load_llama`).
    """
    ckpt = resolve_checkpoint(path)
    raw = read_config(ckpt)
    if checkpoint_arch(ckpt, raw) == "llama":
        raise LoadError(f"{ckpt} is a Llama baseline checkpoint (`kunlun train --arch llama`: transformers' "
                        "LlamaForCausalLM), not a KunlunBaize model — load it with kunlunbaize.infer.llama.load_llama; "
                        "`kunlun generate` and `kunlun export --hf` take it as it is")
    try:
        hf = raw.get("model_type") == "kunlunbaize"
        cfg = ModelConfig.from_dict(_model_config_dict(raw) if hf else raw)
    except (ValueError, TypeError, AttributeError) as e:
        raise LoadError(f"{ckpt / 'config.json'} does not describe a KunlunBaize model ({e}) — "
                        "use a checkpoint written by `kunlun train` or `kunlun export --hf`") from None
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
    check_keys(ckpt, model.state_dict().keys(), state.keys())
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shapes differ
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise LoadError(f"the weights in {ckpt} do not match its config.json ({detail}) — the folder mixes files "
                        "of different models; use a checkpoint written as a whole by `kunlun train`") from None
    model.rope.inv_freq = model.rope._inv_freq(torch.device(device))  # not saved: rebuilt off the meta device
    return model.to(device=device, dtype=dtype).eval(), ckpt


@dataclass
class Generator:
    """A checkpoint of either architecture, ready to generate from."""

    model: torch.nn.Module  # KunlunBaize, or transformers' LlamaForCausalLM for the Llama baseline
    checkpoint: Path
    arch: str  # "kunlunbaize" or "llama"
    generate: Callable  # kunlunbaize.infer.generate or kunlunbaize.infer.llama.generate_llama (same signature)
    context: int  # the model's maximum sequence length
    vocab_size: int
    mtp_depth: int  # MTP depths to draft with (0 for Llama)


def load_for_generation(path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> Generator:
    """The model of a run, checkpoint or export folder, KunlunBaize or the Llama baseline, with its generate
    function. A Llama checkpoint without transformers installed is a LoadError that says what to install."""
    ckpt = resolve_checkpoint(path)
    if checkpoint_arch(ckpt) == "llama":
        try:
            from .llama import generate_llama, load_llama
        except ImportError as e:
            raise LoadError(f"{ckpt} is a Llama baseline checkpoint, which needs transformers ({e}) — "
                            "pip install 'kunlunbaize[hf]'") from None
        model, ckpt = load_llama(ckpt, device, dtype)
        return Generator(model, ckpt, "llama", generate_llama, int(model.config.max_position_embeddings),
                         int(model.config.vocab_size), 0)
    from .generate import generate

    model, ckpt = load_model(ckpt, device, dtype)
    cfg = model.config
    return Generator(model, ckpt, "kunlunbaize", generate, cfg.max_seq_len, cfg.vocab_size, cfg.mtp_depth)


def check_keys(ckpt: Path, expected, found, optional: tuple[str, ...] = ()) -> None:
    """A short LoadError when the weight names differ from the model's (counts and a few examples, not all)."""
    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    if not missing and not unexpected:
        return

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f", … ({len(keys)} in all)" if len(keys) > 3 else "")

    parts = ([f"{len(missing)} missing ({few(missing)})"] if missing else []) + (
        [f"{len(unexpected)} unexpected ({few(unexpected)})"] if unexpected else [])
    raise LoadError(f"the weights in {ckpt} do not match its config.json: {'; '.join(parts)} — the folder mixes "
                    "files of different models; use a checkpoint written as a whole by `kunlun train`")


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
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on damaged files
        raise LoadError(f"{file} is unreadable or truncated ({e}) — copy tokenizer.json from the training data "
                        "(the `kunlun prepare` folder) or another checkpoint of the run") from None
    if tok.get_vocab_size() != vocab_size:
        raise LoadError(f"tokenizer {file} has {tok.get_vocab_size()} tokens but the model has {vocab_size}: "
                        "they were not trained together")
    eot = next((tok.token_to_id(t) for t in EOT_CANDIDATES if tok.token_to_id(t) is not None), None)
    return tok, eot
