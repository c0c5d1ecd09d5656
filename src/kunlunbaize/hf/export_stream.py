"""``kunlun export --hf`` of a checkpoint saved without full weights: the transformers folder written tensor by
tensor from its DCP files, never holding the model.

The weights go into transformers' sharded layout (``model-0000i-of-0000N.safetensors`` and
``model.safetensors.index.json``, or one ``model.safetensors`` when they fit one shard), planned by
``huggingface_hub.split_torch_state_dict_into_shards`` on the shapes alone, as ``save_pretrained`` plans them. Each
shard is filled by reading its tensors one at a time (:class:`~kunlunbaize.checkpoint.dcp_weights.DcpWeights`), so
the peak memory is one output shard (``--max-shard-size``) plus one tensor. ``config.json`` and
``generation_config.json`` are those ``save_pretrained`` writes, from the model built on the meta device.
Verification reads every written tensor back and compares its bytes with what was read from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, check_keys
from ..checkpoint.dcp_weights import DcpWeights
from ..checkpoint.keys import to_hf
from ..config import ModelConfig
from .folder import ExportError, export_tokenizer, verify_tokenizer, write_folder

DEFAULT_SHARD_SIZE = "5GB"
"""The largest safetensors file of a streamed export (a single tensor larger than it gets a file of its own)."""


def export_streaming(ckpt: Path, out: Path, cfg: ModelConfig, *, dtype: torch.dtype, verify: bool,
                     chat_template: bool, max_shard_size: int | str | None, log: Callable[[str], None]) -> Path:
    """Write the KunlunBaize checkpoint ``ckpt`` (config ``cfg``, weights in its DCP files only) as a transformers
    folder at ``out`` (checked by the caller), streaming the weights."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from .modeling import KunlunBaizeForCausalLM

    tokenizer = export_tokenizer(ckpt, cfg, chat_template)
    weights = DcpWeights(ckpt)
    hf = _meta_model(KunlunBaizeForCausalLM, cfg, tokenizer, dtype)
    source = _hf_sources(ckpt, weights, hf)
    plan = {name: torch.empty(tuple(weights.meta(src).shape), dtype=dtype, device="meta")
            for name, src in source.items()}
    split = split_torch_state_dict_into_shards(plan, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size or DEFAULT_SHARD_SIZE)

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        digests = _write_shards(tmp, split.filename_to_tensors, source, weights, dtype)
        if split.is_sharded:
            index = {"metadata": {"total_parameters": hf.num_parameters(), **split.metadata},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        hf.config.dtype = str(dtype).split(".")[1]  # what save_pretrained records
        hf.config.architectures = [type(hf).__name__]
        hf.config.save_pretrained(str(tmp))
        if hf.can_generate():
            hf.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        verify_tokenizer(tmp, tokenizer)
        if verify:
            _verify_shards(tmp, split.filename_to_tensors, digests)

    write_folder(out, write)
    files = len(split.filename_to_tensors)
    log(f"exported {ckpt} → {out} ({hf.num_parameters():,} parameters, {dtype}, streamed from its DCP files into "
        f"{files} safetensors file{'s' if files > 1 else ''})" + (": reloaded tensors identical" if verify else ""))
    return out


def _meta_model(cls: type, cfg: ModelConfig, tokenizer, dtype: torch.dtype) -> torch.nn.Module:
    """The transformers model of ``cfg`` on the meta device (its names, shapes and configs; no memory)."""
    from .configuration import KunlunBaizeConfig

    config = KunlunBaizeConfig.from_model_config(cfg, eos_token_id=tokenizer.eos_token_id,
                                                 pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    with torch.device("meta"):
        return cls(config).to(dtype).eval()


def _hf_sources(ckpt: Path, weights: DcpWeights, hf: torch.nn.Module) -> dict[str, str]:
    """For each tensor the export holds (the transformers names ``save_pretrained`` writes, in its order), the
    checkpoint tensor it is; a CheckpointError when names or shapes differ from the config's model."""
    names = weights.names()
    if hf.config.tie_word_embeddings:
        names = [n for n in names if n != "head.weight"]
    by_hf: dict[str, str] = to_hf({n: n for n in names})  # type: ignore[dict-item]  # transformers name -> ours
    expected = hf.state_dict()
    tied = ("lm_head.weight",) if hf.config.tie_word_embeddings else ()
    check_keys(ckpt, expected.keys(), by_hf.keys(), optional=tied)
    wrong = [k for k, src in by_hf.items() if tuple(weights.meta(src).shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(f"the weights in {ckpt} do not match its config.json ({wrong[0]} is "
                              f"{tuple(weights.meta(by_hf[wrong[0]]).shape)}, the config's model has "
                              f"{tuple(expected[wrong[0]].shape)}) — use a checkpoint written as a whole by "
                              "`kunlun train`")
    return {k: by_hf[k] for k in expected if k in by_hf}


def _digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes, its dtype and shape."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _write_shards(folder: Path, shards: dict[str, list[str]], source: dict[str, str], weights: DcpWeights,
                  dtype: torch.dtype) -> dict[str, str]:
    """Each shard file of ``shards``, its tensors read one at a time; the digest of each tensor written."""
    from safetensors.torch import save_file

    digests = {}
    for file, names in shards.items():
        shard = {}
        for name in names:
            shard[name] = weights.read([source[name]])[source[name]].to(dtype).contiguous()
            digests[name] = _digest(shard[name])
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        del shard
    return digests


def _verify_shards(folder: Path, shards: dict[str, list[str]], digests: dict[str, str]) -> None:
    """Every tensor of the written files, read back one at a time, must be the bytes that were written."""
    from safetensors import safe_open

    for file, names in shards.items():
        with safe_open(str(folder / file), framework="pt") as f:
            if set(f.keys()) != set(names):
                raise ExportError(f"the exported {file} reloads with other tensors than were written; nothing was "
                                  "written")
            for name in names:
                if _digest(f.get_tensor(name)) != digests[name]:
                    raise ExportError(f"the exported {name} reloads with other values than the checkpoint's; "
                                      "nothing was written")
