"""A checkpoint as the evaluator sees it: a tokenizer, log-likelihoods of continuations and batched generation.

KunlunBaize checkpoints and the Llama baseline of ``kunlun train --arch llama`` (training checkpoints or their
``kunlun export --hf`` folders) are evaluated through the same interface, so the ablation study scores both the
same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..checkpoint import has_full_weights, load_tokenizer
from ..infer.generate import GenerationResult
from ..infer.generator import load_for_generation
from ..infer.sampling import SamplingParams
from ..infer.text import TextStream
from ..model import DEFAULT_PREFILL_CHUNK, KunlunBaize, check_prefill_chunk, prefill
from ..model.prefill import logits_of

CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass
class Generated:
    """One generated continuation: its text (cut at the first stop string), token count and why it ended."""

    text: str
    tokens: int
    finish_reason: str  # "eos", "stop" or "length"


class EvalModel:
    """A loaded checkpoint: ``tokenizer``, ``eot`` id, ``context`` (max sequence length), ``arch``, ``checkpoint``;
    inputs longer than ``prefill_chunk`` tokens are read that many at a time through the cache (the same scores).

    ``self(ids, mtp=False)`` returns an object with ``.logits`` [B, T, V] for either architecture (what
    :func:`kunlunbaize.eval.bpb.bits_per_byte` calls).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK):
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)
        loaded = load_for_generation(path, device, dtype)
        self.model, self.checkpoint, self.arch, self._generate = (loaded.model, loaded.checkpoint, loaded.arch.name,
                                                                  loaded.generate)
        self.context, self.vocab_size = loaded.context, loaded.vocab_size
        self.device = torch.device(device)
        self.tokenizer, self.eot = load_tokenizer(self.checkpoint, self.vocab_size)
        self.prefix_id = self.eot if self.eot is not None else 0  # what an empty text is conditioned on
        self.chat_template = read_chat_template(self.checkpoint)

    # ----------------------------------------------------------------------------------------- forward
    def __call__(self, ids: torch.Tensor, mtp: bool = False):
        if isinstance(self.model, KunlunBaize):
            return self.model(ids, mtp=False)
        return SimpleNamespace(logits=self.model(input_ids=ids).logits)  # a transformers model (the baseline)

    def final_logits(self, ids: torch.Tensor, rows: list[tuple[int, int, int]]) -> torch.Tensor:
        """The logits at positions a … b−1 of row r of ``ids`` [B, T], for each (r, a, b) of ``rows``, concatenated:
        the input read ``prefill_chunk`` tokens at a time through a cache, the head applied only where asked."""
        if isinstance(self.model, KunlunBaize):
            cache = self.model.new_cache(ids.shape[0], ids.shape[1], mtp=False)
            hidden = prefill(self.model, ids, cache, self.prefill_chunk, keep=None).hidden
            return logits_of(self.model, torch.cat([hidden[r, a:b] for r, a, b in rows]))
        from ..infer.llama import llama_prefill

        hidden = llama_prefill(self.model, ids, None, self.prefill_chunk, keep=None)[0]
        return self.model.lm_head(torch.cat([hidden[r, a:b] for r, a, b in rows]))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    # ------------------------------------------------------------------------------------ log-likelihood
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of ``context`` and of ``continuation`` after it, split as lm-evaluation-harness does: trailing
        spaces of the context move to the continuation, and the continuation is what encoding the whole adds."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        if not ctx:  # an empty context is conditioned on the end-of-text token (lm-eval's prefix token)
            return [self.prefix_id], whole
        return ctx, whole[len(ctx):]

    @torch.inference_mode()
    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """Summed log-probability of each continuation given its context, in one right-padded batch.

        A row longer than the context window keeps its last ``context + 1`` tokens (the context is cut on the
        left), as lm-evaluation-harness does.
        """
        rows, spans = [], []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("an empty continuation has no log-likelihood: every choice needs text")
            full = (ctx + cont)[-(self.context + 1):]
            rows.append(full[:-1])
            spans.append(min(len(cont), len(full) - 1))
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
        # right padding: positions after a row's end never influence its earlier positions (causal model);
        # only the positions that predict a continuation token get logits (not the whole [B, T, V])
        picked = self.final_logits(ids.to(self.device), [(b, len(r) - n, len(r))
                                                         for b, (r, n) in enumerate(zip(rows, spans, strict=True))])
        targets = torch.tensor([t for (_, cont), n in zip(pairs, spans, strict=True) for t in cont[-n:]],
                               device=picked.device)
        token_logp = F.log_softmax(picked.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1).double()
        return [float(part.sum()) for part in token_logp.split(spans)]

    # ---------------------------------------------------------------------------------------- generation
    def generate(self, prompts: list[str], max_new_tokens: int, sampling: SamplingParams, seed: int | None,
                 stop: tuple[str, ...] = ()) -> list[Generated]:
        """Continue each prompt (one left-padded cached batch); text cut at the first stop string.

        Prompts that do not fit the context with room to generate keep their last tokens (the budget is clipped
        to the room left, as :func:`kunlunbaize.infer.generate.fit_prompts` says).
        """
        ids = [self.encode(p) or [self.prefix_id] for p in prompts]
        stream = TextStream(self.tokenizer, len(prompts), stop=list(stop))
        result: GenerationResult = self._generate(self.model, ids, max_new_tokens, sampling=sampling,
                                                  eos_id=self.eot, seed=seed, truncate=True,
                                                  should_stop=stream.update, prefill_chunk=self.prefill_chunk)
        return [Generated(stream.finish(b, toks), len(toks), result.finish_reasons[b])
                for b, toks in enumerate(result.tokens)]


def read_chat_template(ckpt: Path) -> str | None:
    """The checkpoint's chat template: ``chat_template.jinja``, else ``chat_template`` in tokenizer_config.json."""
    file = ckpt / CHAT_TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8")
    try:
        value = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value.strip() else None


def checkpoint_hash(ckpt: Path) -> str:
    """SHA-256 over the checkpoint's config and weight files (names and bytes), hex; a training checkpoint saved
    without ``model.safetensors``: over its DCP files (model and optimiser state) instead."""
    h = hashlib.sha256()
    names = ["config.json", "model.safetensors", "model.safetensors.index.json"]
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        names += sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if not has_full_weights(ckpt):
        names += [".metadata", *sorted(p.name for p in ckpt.glob("*.distcp"))]
    for name in names:
        f = ckpt / name
        if not f.is_file():
            continue
        h.update(name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


__all__ = ["EvalModel", "Generated", "checkpoint_hash", "read_chat_template"]
