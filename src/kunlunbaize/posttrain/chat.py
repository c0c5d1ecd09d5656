"""Giving a model the chat format (:mod:`kunlunbaize.data.chat`): role tokens, template and embeddings."""

from __future__ import annotations

from typing import Any

from ..data.chat import ASSISTANT, CHAT_TEMPLATE, END, ROLES, SYSTEM, USER, missing_chat_tokens

__all__ = ["ASSISTANT", "CHAT_TEMPLATE", "END", "ROLES", "SYSTEM", "USER", "add_chat_format", "end_token_id",
           "missing_chat_tokens"]

def add_chat_format(model: Any, tokenizer: Any) -> list[str]:
    """Give ``tokenizer`` the role tokens and :data:`CHAT_TEMPLATE`, and ``model`` embeddings for any token added.

    A tokenizer from ``kunlun prepare`` already has the role tokens (they are reserved as special tokens); an older
    or foreign one gets them appended, and the model's input and output embeddings (shared by the MTP depths) grow
    to match: the new rows start at the mean of the existing ones. Returns the tokens added. A chat template the
    tokenizer already has is kept.
    """
    added = missing_chat_tokens(tokenizer)
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    return added


def end_token_id(tokenizer: Any) -> int:
    """The id of ``<|end|>``, the token that ends an assistant turn."""
    vocab = tokenizer.get_vocab()
    if END not in vocab:
        raise ValueError(f"the tokenizer has no {END} token: give the model the chat format first (add_chat_format)")
    return vocab[END]
