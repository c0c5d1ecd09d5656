"""Chunked prefill: a long prompt fed through the inference cache a chunk of tokens at a time.

Every stateful part of the model continues exactly from the cache (docs/ARCHITECTURE.md, "Chunked prefill"): the
self- and cross-attention keys of earlier chunks are read from their slots, the causal convolutions read the k − 1
inputs before a chunk from the conv history, and MTP depth j writes the key slot s = i − j of every token i, so
a chunk boundary only decides which forward writes a slot, never what it holds. The logits, final hidden states
and cache contents therefore equal a one-shot prefill's (``tests/test_prefill.py``), while the working memory
(activations of one chunk, logits of only the positions asked for) no longer grows with the prompt.
"""

from __future__ import annotations

import torch

from ..defaults import PREFILL_CHUNK as DEFAULT_PREFILL_CHUNK
from .cache import InferenceCache
from .layers import linear
from .model import KunlunBaize, ModelOutput, run_mtp

__all__ = ["DEFAULT_PREFILL_CHUNK", "check_prefill_chunk", "logits_of", "prefill"]


def check_prefill_chunk(chunk: int | None) -> int | None:
    """``chunk`` when it is a usable prefill chunk (None: one forward for the whole prompt); else a ValueError."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"the prefill chunk must be a whole number of tokens >= 1, got {chunk!r}; "
                         "give e.g. 512, or none for one forward over the whole prompt")
    return chunk


def prefill(model: KunlunBaize, input_ids: torch.Tensor, cache: InferenceCache,
            chunk: int | None = DEFAULT_PREFILL_CHUNK, attention_mask: torch.Tensor | None = None,
            keep: int | None = 1) -> ModelOutput:
    """Feed ``input_ids`` [B, T] into ``cache`` (continuing it) ``chunk`` tokens at a time (None: all at once).

    Returns the trunk's final hidden states and the main head's logits of the last ``keep`` positions (None: all
    T), as ``model(input_ids, cache=cache, attention_mask=attention_mask, mtp=False)`` computes them; the MTP
    depths' keys are written when the cache holds them. ``attention_mask`` [B, T] (1 = token, 0 = left padding)
    works as in :meth:`KunlunBaize.forward`.
    """
    check_prefill_chunk(chunk)
    T = input_ids.shape[-1]
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 position (or None for all), got {keep}")
    step = chunk or max(T, 1)
    first_kept = 0 if keep is None else max(0, T - keep)
    mask = attention_mask[:, -T:] if attention_mask is not None else None
    kept: list[torch.Tensor] = []
    for a in range(0, max(T, 1), step):
        ids = input_ids[:, a:a + step]
        trunk = model.run_trunk(ids, cache, None if mask is None else mask[:, a:a + step])
        run_mtp(model.mtp, trunk, model.rope, model.head_weight, cache, logits=False)
        cache.length = trunk.start + ids.shape[1]
        if a + ids.shape[1] > first_kept:
            kept.append(trunk.hidden[:, max(0, first_kept - a):])
    hidden = torch.cat(kept, 1) if len(kept) > 1 else kept[0]
    return ModelOutput(logits=logits_of(model, hidden), hidden=hidden)


def logits_of(model: KunlunBaize, hidden: torch.Tensor) -> torch.Tensor:
    """The main head's logits of final hidden states ``hidden`` [..., d] (as :func:`prefill` returns them)."""
    return linear(model.norm(hidden), model.head_weight)
