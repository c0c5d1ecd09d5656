"""``kunlun export --hf`` of a Llama baseline checkpoint (``kunlun train --arch llama``): a standard transformers
``LlamaForCausalLM`` folder and the tokenizer, loadable without :mod:`kunlunbaize`."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..infer.llama import load_llama
from .export import PROBE_TOKENS, ExportError, _export_tokenizer, _verify_tokenizer


def export_llama(checkpoint: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32,
                 overwrite: bool = False, verify: bool = True, log: Callable[[str], None] = print) -> Path:
    """Write the Llama baseline ``checkpoint`` as a ``LlamaForCausalLM`` folder at ``out``.

    With ``verify`` the folder is loaded back with ``AutoModelForCausalLM`` and must give logits identical to
    the checkpoint's. Written to a temporary sibling and renamed, so ``out`` is either complete or untouched.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a folder path for the export")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty; choose another folder or pass --overwrite")
    model, ckpt = load_llama(checkpoint, dtype=dtype)
    tokenizer = _export_tokenizer(ckpt, model.config.vocab_size, model.config.max_position_embeddings)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None

    tmp = out.with_name(f"{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _verify_tokenizer(tmp, tokenizer)
        if verify:
            _verify(model, tmp, AutoModelForCausalLM, dtype)
        if out.exists():
            old = out.with_name(f"{out.name}.old-export")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
