"""What the server serves: a KunlunBaize checkpoint, its tokenizer, its chat template and its special tokens.

A checkpoint or export of the Llama baseline is served as the KunlunBaize it equals (all three switches off: a
LLaMA decoder, the same logits), so the one engine serves both."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_tokenizer, resolve_checkpoint
from ..data.tokenizer import CHAT_TOKENS
from ..infer.load import load_as_kunlunbaize
from ..model import KunlunBaize

END_OF_TURN = CHAT_TOKENS[-1]  # <|end|>: the chat format's end of an assistant turn (kunlunbaize.data.chat)


@dataclass
class ServedModel:
    model: KunlunBaize
    tokenizer: Any  # tokenizers.Tokenizer
    checkpoint: Path
    name: str
    eos_id: int | None
    end_id: int | None  # end of an assistant turn, when the vocabulary has the chat tokens
    render_chat: Callable[[list[dict[str, str]]], str] | None  # messages -> prompt text; None: no chat template

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens written in it are recognised); the end-of-text token for ""."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids and self.eos_id is not None:
            return [self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def check_ids(self, ids: list[int]) -> None:
        vocab = self.model.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")


def load_served(path: str | Path, name: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                chat_template: str | Path | None = None) -> ServedModel:
    """The model of a run, checkpoint or export folder, ready to serve; ``name`` defaults to the folder's name
    (the run's, for a run folder)."""
    given = Path(path)
    ckpt = resolve_checkpoint(given)
    model, ckpt = load_as_kunlunbaize(ckpt, device=device, dtype=dtype)
    tokenizer, eos = load_tokenizer(ckpt, model.config.vocab_size)
    template = _chat_template(ckpt, chat_template)
    render = None
    if template is not None:
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=template)

        def render(messages: list[dict[str, str]]) -> str:
            return hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return ServedModel(model=model, tokenizer=tokenizer, checkpoint=ckpt, name=name or given.resolve().name,
                       eos_id=eos, end_id=tokenizer.token_to_id(END_OF_TURN), render_chat=render)


def _chat_template(ckpt: Path, override: str | Path | None) -> str | None:
    """The chat template: ``override`` (a file), else the checkpoint's ``chat_template.jinja`` or the one in its
    ``tokenizer_config.json``; None when there is none."""
    if override is not None:
        try:
            return Path(override).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read the chat template {override} ({e})") from None
    file = ckpt / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    try:
        config = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) and template else None
