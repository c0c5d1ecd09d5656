"""``kunlun export --hf``: a training checkpoint → a transformers folder (safetensors + config + tokenizer)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import has_full_weights, resolve_checkpoint
from ..infer.load import checkpoint_model_config, load_model
from .folder import (  # noqa: F401 (ExportError and the folder helpers: this module's names too)
    ExportError,
    _export_tokenizer,
    check_out,
    export_tokenizer,
    no_progress_bars,
    verify_tokenizer,
    write_folder,
)

PROBE_TOKENS = 16


def export_hf(checkpoint: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32,
              overwrite: bool = False, verify: bool = True, chat_template: bool = False,
              max_shard_size: int | str | None = None, log: Callable[[str], None] = print) -> Path:
    """Write ``checkpoint`` (a run or checkpoint folder) as a transformers model folder at ``out``.

    ``chat_template`` adds KunlunBaize's chat template (``chat_template.jinja``; the tokenizer must have the role
    tokens, as every ``kunlun prepare`` tokenizer does). Leave it off for a model that was not trained on chats:
    ``kunlun eval`` applies a folder's template when there is one.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer`` once
    :mod:`kunlunbaize` is imported. With ``verify`` it is loaded back and must give logits identical to the
    checkpoint's. Written to a temporary sibling and renamed, so ``out`` is either complete or untouched.

    A checkpoint saved without ``model.safetensors`` (``kunlun train --full-weights never``) is streamed from its
    DCP files tensor by tensor into transformers' sharded layout (:mod:`.export_stream`; ``max_shard_size``,
    default 5GB), and verified tensor by tensor instead. ``max_shard_size`` otherwise goes to ``save_pretrained``
    (default: transformers' own).
    """
    from transformers import AutoModelForCausalLM

    from .modeling import KunlunBaizeForCausalLM

    out = check_out(out, overwrite)
    ckpt = resolve_checkpoint(checkpoint)
    if not has_full_weights(ckpt):
        from .export_stream import export_streaming

        return export_streaming(ckpt, out, checkpoint_model_config(ckpt), dtype=dtype, verify=verify,
                                chat_template=chat_template, max_shard_size=max_shard_size, log=log)
    model, ckpt = load_model(ckpt)
    tokenizer = export_tokenizer(ckpt, model.config, chat_template)
    hf = KunlunBaizeForCausalLM.from_kunlunbaize(model, eos_token_id=tokenizer.eos_token_id,
                                                 pad_token_id=tokenizer.pad_token_id, bos_token_id=None).to(dtype)
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}

    def write(tmp: Path) -> None:
        hf.save_pretrained(str(tmp), **shards)
        tokenizer.save_pretrained(str(tmp))
        verify_tokenizer(tmp, tokenizer)
        if verify:
            _verify(model.to(dtype), tmp, AutoModelForCausalLM, dtype)

    write_folder(out, write)
    log(f"exported {ckpt} → {out} ({sum(p.numel() for p in hf.parameters()):,} parameters, {dtype})"
        + (": reloaded logits identical" if verify else ""))
    return out



@torch.no_grad()
def _verify(model: torch.nn.Module, folder: Path, auto_cls: type, dtype: torch.dtype) -> None:
    """Reload ``folder`` through the Auto class and require logits identical to ``model``'s."""
    reloaded = auto_cls.from_pretrained(str(folder), dtype=dtype).eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, min(PROBE_TOKENS, cfg.max_seq_len)), generator=gen)
    want = model(ids, mtp=True)
    got = reloaded(ids, mtp=True, use_cache=False)
    pairs = [(want.logits, got.logits), *zip(want.mtp_logits, got.mtp_logits or (), strict=True)]
    for a, b in pairs:
        if not torch.equal(a, b):
            raise ExportError(f"the exported model does not reproduce the checkpoint (max |Δlogit| = "
                              f"{(a - b).abs().max().item():.3g}); nothing was written")
