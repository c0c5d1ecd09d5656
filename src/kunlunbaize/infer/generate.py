"""Cached autoregressive generation for a batch of prompts (left-padded), token level."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model import KunlunBaize
from .sampling import GREEDY, SamplingParams, sample

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


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, context: int, truncate: bool) -> list[list[int]]:
    """Check prompts against the context window; with ``truncate`` keep each prompt's last tokens that fit."""
    if not prompts:
        raise ValueError("no prompt given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context of {context}")
    room = context - max_new_tokens
    out = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. the end-of-text token)")
        if len(p) > room:
            if not truncate:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} at most {room} fit the "
                    f"context of {context}. Shorten it, lower max_new_tokens, or truncate (keeps the last {room})")
            p = p[-room:]
        out.append(list(p))
    return out


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
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per prompt with the inference cache (prefill, then one token a step)."""
    model.eval()
    device = model.embed.weight.device
    prompts = fit_prompts(prompts, max_new_tokens, model.config.max_seq_len, truncate)
    pad = eos_id if eos_id is not None else 0
    ids, mask = left_pad(prompts, pad, device)
    B, T = ids.shape
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.new_cache(B, T + max_new_tokens, mtp=False)  # plain decoding never drafts
    logits = model(ids, cache=cache, attention_mask=mask, mtp=False).logits[:, -1]
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = [False] * B
    for step in range(max_new_tokens):
        tokens = sample(logits, sampling, gen).tolist()
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
        if all(done) or step == max_new_tokens - 1:
            break
        feed = torch.tensor([[t if not d else pad] for t, d in zip(tokens, done, strict=True)], device=device)
        logits = model(feed, cache=cache, mtp=False).logits[:, -1]
    return GenerationResult(tokens=out, finish_reasons=reasons)
