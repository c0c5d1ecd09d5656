"""Sampling completions for chat prompts with the project's batched, cached generation.

The prompts are rendered with the model's chat template (ending in ``<|assistant|>\\n``); a reply ends at
``<|end|>`` (not kept in the text), at end-of-text, or at ``max_new_tokens``. ``n`` samples per prompt; several
``torchrun`` ranks each take every ``world``-th prompt (:func:`shard`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..infer.generate import generate
from ..infer.load import load_model
from ..infer.sampling import SamplingParams
from .chat import END, end_token_id
from .models import load_chat_tokenizer


@dataclass
class Completion:
    """One sampled reply to prompt ``index``: its text, token count and why it ended (stop/eos/length)."""

    index: int
    sample: int
    text: str
    tokens: int
    finish_reason: str


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (1 outside ``torchrun``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_process_group(device: str) -> None:
    """Join the ``torchrun`` process group (gloo on CPU, NCCL on GPUs) when there are several ranks and it is not
    joined yet; a no-op for one process. The TRL trainers later reuse the same group."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and dist.is_available() and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")


def shard(items: list[Any], rank: int, world: int) -> list[int]:
    """The indices of ``items`` that rank ``rank`` of ``world`` works on (every ``world``-th one)."""
    return list(range(rank, len(items), world))


class Sampler:
    """A model folder loaded for sampling chat replies."""

    def __init__(self, folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.model, self.checkpoint = load_model(folder, device=device, dtype=dtype)
        self.tokenizer = load_chat_tokenizer(self.checkpoint)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.checkpoint} has no chat template and no role tokens: post-train it first "
                             "(kunlun posttrain sft) or export it with its chat format")
        self.end_id = end_token_id(self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id
        self.context = self.model.config.max_seq_len

    def ends_turn(self, row: int, tokens: list[int]) -> bool:
        """Whether a reply's last token ends the assistant turn (a ``should_stop`` for generation)."""
        return tokens[-1] == self.end_id

    def encode_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the rendered prompt (ending in the assistant role token)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_fits(self, prompts: list[list[dict[str, str]]], max_new_tokens: int, source: str = "prompts") -> None:
        """A ValueError naming the first prompt that leaves no room for ``max_new_tokens`` in the context."""
        for i, p in enumerate(prompts):
            n = len(self.encode_prompt(p))
            if n + 1 > self.context:
                raise ValueError(f"{source}, record {i + 1}: the prompt takes {n} tokens with the chat format, but the "
                                 f"model's context is {self.context}; shorten it or leave it out")
            if n + max_new_tokens > self.context:
                raise ValueError(f"{source}, record {i + 1}: {n} prompt tokens + {max_new_tokens} new tokens exceed "
                                 f"the context of {self.context}; lower --max-new-tokens to {self.context - n}")

    def sample(self, prompts: list[list[dict[str, str]]], n: int, sampling: SamplingParams, max_new_tokens: int,
               seed: int = 0, batch_size: int = 32, indices: list[int] | None = None,
               progress: Callable[[int], None] | None = None) -> list[Completion]:
        """``n`` replies to each prompt (to ``prompts[i]`` for i in ``indices``, default all), in batches of
        ``batch_size`` rows. Seeded per batch, so a batch's samples do not depend on other ranks."""
        indices = list(range(len(prompts))) if indices is None else indices
        self.check_fits([prompts[i] for i in indices], max_new_tokens)
        rows = [(i, k) for i in indices for k in range(n)]
        out: list[Completion] = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            ids = [self.encode_prompt(prompts[i]) for i, _ in batch]
            result = generate(self.model, ids, max_new_tokens, sampling=sampling, eos_id=self.eos_id,
                              seed=seed * 1_000_003 + batch[0][0] * 1_009 + batch[0][1],
                              should_stop=self.ends_turn)
            for (i, k), toks, reason in zip(batch, result.tokens, result.finish_reasons, strict=True):
                if reason == "stop":
                    toks = toks[:-1]
                text = self.tokenizer.decode(toks, skip_special_tokens=False).split(END)[0]
                out.append(Completion(i, k, text, len(toks), reason))
            if progress is not None:
                progress(len(batch))
        return out
