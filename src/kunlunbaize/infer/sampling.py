"""Turning logits into a next-token distribution: a repetition penalty, temperature, top-k and top-p (nucleus)
filtering."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy decoding; otherwise sample from the filtered, tempered softmax."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    repetition_penalty: float = 1.0
    """> 1 discourages every token already in the context, prompt included (CTRL's rule, as transformers'
    ``repetition_penalty``): its logit is divided by the penalty when positive, multiplied when negative. Greedy
    decoding takes the argmax of the penalised logits. 1.0: none."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # also refuses nan and inf
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:  # False for nan
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def context_mask(prompts: list[list[int]], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, V] bool: which token ids each row's context holds (what :func:`penalize` penalises)."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        seen[b, torch.as_tensor(p, dtype=torch.long, device=device)] = True
    return seen


def penalize(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """``logits`` [..., V] with the repetition penalty applied to the ids ``seen`` [..., V] marks (see
    :attr:`SamplingParams.repetition_penalty`)."""
    if penalty == 1.0:
        return logits
    if seen is None:
        raise ValueError("a repetition penalty needs the context: pass which tokens it holds (context_mask)")
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def distribution(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities [..., V] that sampling draws from (one-hot of the argmax when greedy); ``seen`` marks the
    context's tokens for the repetition penalty."""
    logits = penalize(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token is always kept)
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` [..., V]; ``seen`` marks the context's tokens for the repetition
    penalty."""
    if params.greedy:
        return penalize(logits, seen, params.repetition_penalty).argmax(-1)
    probs = distribution(logits, params, seen)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
