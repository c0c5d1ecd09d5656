"""The pieces every export shares: its error, the checkpoint's tokenizer as exports write it (and its check after
reloading), and writing a folder atomically without transformers' progress bars."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..checkpoint import CheckpointError
from ..checkpoint.state import honour_umask
from ..config import ModelConfig
from ..data.chat import CHAT_TEMPLATE, missing_chat_tokens


class ExportError(RuntimeError):
    """The export could not be completed or did not reproduce the checkpoint; nothing was left at OUT."""


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
