"""Cached autoregressive generation for a batch of prompts (left-padded), token level."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..model import DEFAULT_PREFILL_CHUNK, KunlunBaize, check_prefill_chunk, prefill
from .sampling import GREEDY, SamplingParams, context_mask, sample

if TYPE_CHECKING:
    from .static import StaticDecoder

# Called with (row, token id) for every generated token, as soon as it is chosen.
TokenCallback = Callable[[int, int], None]
# Called with (row, tokens generated so far); True ends that row (e.g. a stop string appeared).
StopCallback = Callable[[int, list[int]], bool]


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    """Generated ids per prompt (without the prompt; the end-of-text id excluded)."""
    finish_reasons: list[str] = field(default_factory=list)
    """Per prompt: "eos", "stop" or "length"."""
    stats: dict[str, float] = field(default_factory=dict)


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, context: int,
                truncate: bool) -> tuple[list[list[int]], int]:
    """Fit prompts and the generation budget into the context window of ``context`` tokens.

    Returns the prompts and the number of tokens to generate: ``max_new_tokens``, clipped to the room the
    longest prompt leaves (generation then fills the context and ends with reason "length").

    * A prompt of ``context`` tokens or more leaves no room: ValueError, unless ``truncate``.
    * ``truncate`` keeps the last ``max(context - max_new_tokens, context // 2)`` tokens of a prompt longer
      than that: the requested tokens fit when they take at most half the context; a larger request keeps
      the last half of the context for the prompt and is clipped to the other half.
    """
    if not prompts:
        raise ValueError("no prompt given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    keep = max(context - max_new_tokens, context // 2, 1)
    out = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. the end-of-text token)")
        if truncate and len(p) > keep:
            p = p[-keep:]
        elif len(p) >= context:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; at most {context - 1} fit the context of {context} with room to "
                f"generate. Shorten it, or truncate (keeps its last {keep})")
        out.append(list(p))
    return out, min(max_new_tokens, context - max(len(p) for p in out))


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ids [B, T] padded on the left and the attention mask (None when no row needs padding)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    padded = bool((mask == 0).any())
    return ids.to(device), (mask.to(device) if padded else None)


@torch.inference_mode()
def generate(
    model: KunlunBaize,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingParams = GREEDY,
    eos_id: int | None = None,
    seed: int | None = None,
    truncate: bool = False,
    on_token: TokenCallback | None = None,
    should_stop: StopCallback | None = None,
    decoder: StaticDecoder | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per prompt with the inference cache (prefill, then one token a step).

    Prompts and budget are fitted to the context by :func:`fit_prompts` (the budget clipped to the room left).
    ``decoder`` (a :class:`~kunlunbaize.infer.static.StaticDecoder` of this model, its batch size the number of
    prompts) decodes with its compiled static step and its cache instead of a new eager one: the same tokens.
    The prompts are read ``prefill_chunk`` tokens at a time (:func:`~kunlunbaize.model.prefill`; None: in one
    forward): the same tokens, in a working memory that does not grow with the prompt. The cache holds the longest
    prompt plus ``max_new_tokens``.
    """
    check_prefill_chunk(prefill_chunk)
    model.eval()
    device = model.embed.weight.device
    context = model.config.max_seq_len if decoder is None else decoder.max_len
    prompts, max_new_tokens = fit_prompts(prompts, max_new_tokens, context, truncate)
    pad = eos_id if eos_id is not None else 0
    ids, mask = left_pad(prompts, pad, device)
    B, T = ids.shape
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if decoder is not None:
        _check_decoder(decoder, model)
        logits = decoder.prefill(ids, mask, prefill_chunk, keep=1).logits[:, -1]
        return decode_loop(logits, lambda feed: decoder.step(feed)[0][:, -1], max_new_tokens, sampling, eos_id, pad,
                           gen, on_token, should_stop, prompts)
    cache = model.new_cache(B, T + max_new_tokens, mtp=False)  # plain decoding never drafts
    logits = prefill(model, ids, cache, prefill_chunk, mask).logits[:, -1]
    return decode_loop(logits, lambda feed: model(feed, cache=cache, mtp=False).logits[:, -1], max_new_tokens,
                       sampling, eos_id, pad, gen, on_token, should_stop, prompts)


def _check_decoder(decoder: StaticDecoder, model: KunlunBaize) -> None:
    if decoder.model is not model:
        raise ValueError("the decoder was made for another model: make one with StaticDecoder(model)")


def decode_loop(logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], max_new_tokens: int,
                sampling: SamplingParams, eos_id: int | None, pad: int, gen: torch.Generator | None,
                on_token: TokenCallback | None, should_stop: StopCallback | None,
                prompts: list[list[int]] | None = None) -> GenerationResult:
    """Sample a token per row from ``logits`` [B, V], feed them back through ``step`` ([B, 1] ids → [B, V]
    logits of a cached model), until every row ends (end-of-text, stop) or ``max_new_tokens``. ``prompts`` (the
    rows' prompts) are the context a repetition penalty counts, with every token generated since."""
    B = logits.shape[0]
    penalized = sampling.repetition_penalty != 1.0
    seen = context_mask(prompts, logits.shape[-1], logits.device) if penalized and prompts is not None else None
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = [False] * B
    for i in range(max_new_tokens):
        chosen = sample(logits, sampling, gen, seen)
        if seen is not None:
            seen[torch.arange(B, device=seen.device), chosen] = True
        tokens = chosen.tolist()
        for b, tok in enumerate(tokens):
            if done[b]:
                continue
            if eos_id is not None and tok == eos_id:
                done[b], reasons[b] = True, "eos"
                continue
            out[b].append(tok)
            if on_token is not None:
                on_token(b, tok)
            if should_stop is not None and should_stop(b, out[b]):
                done[b], reasons[b] = True, "stop"
        if all(done) or i == max_new_tokens - 1:
            break
        feed = torch.tensor([[t if not d else pad] for t, d in zip(tokens, done, strict=True)], device=logits.device)
        logits = step(feed)
    return GenerationResult(tokens=out, finish_reasons=reasons)
