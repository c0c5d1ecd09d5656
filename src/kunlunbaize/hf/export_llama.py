"""``kunlun export --hf`` of a Llama baseline checkpoint (``kunlun train --arch llama``): a standard transformers
``LlamaForCausalLM`` folder and the tokenizer, loadable without :mod:`kunlunbaize`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..infer.llama import load_llama
from .export import PROBE_TOKENS
from .folder import ExportError, _export_tokenizer, check_out, verify_tokenizer, write_folder


def export_llama(checkpoint: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32,
                 overwrite: bool = False, verify: bool = True, max_shard_size: int | str | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Write the Llama baseline ``checkpoint`` as a ``LlamaForCausalLM`` folder at ``out``.

    A checkpoint saved without ``model.safetensors`` is read whole from its DCP files (the baseline is exported by
    loading it; ``max_shard_size`` goes to ``save_pretrained``, default transformers' own).

    With ``verify`` the folder is loaded back with ``AutoModelForCausalLM`` and must give logits identical to
    the checkpoint's. Written to a temporary sibling and renamed, so ``out`` is either complete or untouched.
    """
    from transformers import AutoModelForCausalLM

    out = check_out(out, overwrite)
    model, ckpt = load_llama(checkpoint, dtype=dtype)
    tokenizer = _export_tokenizer(ckpt, model.config.vocab_size, model.config.max_position_embeddings)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None

    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), **shards)
        tokenizer.save_pretrained(str(tmp))
        verify_tokenizer(tmp, tokenizer)
        if verify:
            _verify(model, tmp, AutoModelForCausalLM, dtype)

    write_folder(out, write)
    log(f"exported Llama baseline {ckpt} → {out} (LlamaForCausalLM, {model.num_parameters():,} parameters, {dtype})"
        + (": reloaded logits identical" if verify else ""))
    return out


@torch.no_grad()
def _verify(model: torch.nn.Module, folder: Path, auto_cls: type, dtype: torch.dtype) -> None:
    """Reload ``folder`` through the Auto class and require logits identical to ``model``'s."""
    reloaded = auto_cls.from_pretrained(str(folder), dtype=dtype).eval()
    if type(reloaded).__name__ != "LlamaForCausalLM":
        raise ExportError(f"the export reloads as {type(reloaded).__name__}, not LlamaForCausalLM; nothing was written")
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, min(PROBE_TOKENS, cfg.max_position_embeddings)), generator=gen)
    want = model(ids, use_cache=False).logits
    got = reloaded(ids, use_cache=False).logits
    if not torch.equal(want, got):
        raise ExportError(f"the exported model does not reproduce the checkpoint (max |Δlogit| = "
                          f"{(want - got).abs().max().item():.3g}); nothing was written")
