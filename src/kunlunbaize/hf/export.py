"""``kunlun export --hf``: a training checkpoint → a transformers folder (safetensors + config + tokenizer)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, has_full_weights, resolve_checkpoint
from ..checkpoint.state import honour_umask
from ..config import ModelConfig
from ..data.chat import CHAT_TEMPLATE, missing_chat_tokens
from ..infer.load import checkpoint_model_config, load_model

PROBE_TOKENS = 16


class ExportError(RuntimeError):
    """The export could not be completed or did not reproduce the checkpoint; nothing was left at OUT."""


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


def export_tokenizer(ckpt: Path, cfg: ModelConfig, chat_template: bool):
    """The checkpoint's tokenizer as the export writes it (:func:`_export_tokenizer`), with KunlunBaize's chat
    template when asked (an ExportError when the tokenizer lacks the role tokens)."""
    tokenizer = _export_tokenizer(ckpt, cfg.vocab_size, cfg.max_seq_len)
    if chat_template:
        missing = missing_chat_tokens(tokenizer)
        if missing:
            raise ExportError(f"the tokenizer of {ckpt} lacks the role tokens {', '.join(missing)}: a chat template "
                              "needs them — add them with `kunlun posttrain sft` (it resizes the embeddings)")
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def check_out(out: str | Path, overwrite: bool) -> Path:
    """``out`` as a Path, refused when it is a file, or a non-empty folder without ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a folder path for the export")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty; choose another folder or pass --overwrite")
    return out


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars ("Writing model shards", "Loading weights") off for the duration, as they
    were afterwards: a command says what it wrote in one line, not in carriage-returned bars."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a temporary sibling of ``out`` (without transformers' progress bars), then put it in place
    of ``out``: ``out`` ends up either complete or as it was. Files get the umask's modes (safetensors writes
    model.safetensors 0600)."""

    tmp = out.with_name(f"{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with no_progress_bars():
            write(tmp)
        honour_umask(tmp)
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


def _export_tokenizer(ckpt: Path, vocab_size: int, context: int):
    """The checkpoint's tokenizer set up for the export: left padding with end-of-text as the pad token (batched
    generation, as Llama) and ``model_max_length`` = the model's context. Settings go in as from_pretrained
    arguments: only those are written to ``tokenizer_config.json`` (attributes set afterwards are not)."""
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(ckpt), padding_side="left", model_max_length=context)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer saved with {ckpt} ({e})") from None
    if len(tokenizer) != vocab_size:
        raise CheckpointError(f"tokenizer of {ckpt} has {len(tokenizer)} tokens but the model has "
                        f"{vocab_size}: they were not trained together")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def verify_tokenizer(folder: Path, tokenizer) -> None:
    """``AutoTokenizer`` on ``folder`` must come back with the settings of ``tokenizer`` (padding, context, tokens)."""
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(folder))
    for name in ("padding_side", "model_max_length", "pad_token", "eos_token", "bos_token"):
        if getattr(again, name) != getattr(tokenizer, name):
            raise ExportError(f"the exported tokenizer reloads with {name}={getattr(again, name)!r} instead of "
                              f"{getattr(tokenizer, name)!r}; nothing was written")
    if again.get_vocab() != tokenizer.get_vocab():
        raise ExportError("the exported tokenizer reloads with a different vocabulary; nothing was written")


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
