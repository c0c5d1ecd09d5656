"""Self-speculative decoding: the MTP depths draft, the trunk verifies (how MTP "accelerates inference").

One round, after the trunk has processed tokens t_0 … t_{n−1} and chosen t_n:

1. draft: depth 1 reads the trunk's last hidden state g⁰_{n−1} and the embedding of t_n (its key slot
   n−1) and proposes d_1 = t_{n+1}; depth j reads g^{j−1}_{n−1} and t_n, d_1 … d_{j−1} and proposes d_j;
2. verify: one trunk forward over [t_n, d_1 … d_k] gives the trunk's prediction after every prefix;
3. accept drafts while the trunk agrees (greedy) or by the rejection rule (sampling); the trunk's own
   token at the first disagreement (or after the last draft) is the next t_n, for free;
4. roll the cache back to the accepted prefix (``InferenceCache.crop``).

Greedy output is token-for-token the trunk's plain greedy decoding. With sampling, a draft x drawn
from the depth's distribution q is accepted with probability min(1, p(x)/q(x)) against the trunk's p,
otherwise the token is drawn from norm(max(0, p − q)): the output distribution is exactly the trunk's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..model import DEFAULT_PREFILL_CHUNK, InferenceCache, KunlunBaize, check_prefill_chunk, prefill
from ..model.layers import linear
from .generate import GenerationResult, StopCallback, TokenCallback, _check_decoder, fit_prompts
from .sampling import GREEDY, SamplingParams, context_mask, distribution, penalize, sample

if TYPE_CHECKING:
    from .static import StaticDecoder


@dataclass
class SpecStats:
    drafted: list[int] = field(default_factory=list)  # per depth: drafts proposed
    accepted: list[int] = field(default_factory=list)  # per depth: drafts accepted
    trunk_forwards: int = 0  # verification forwards (the prefill not counted)
    tokens: int = 0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {"trunk_forwards": self.trunk_forwards, "tokens": self.tokens,
                                 "tokens_per_trunk_forward": self.tokens / max(1, self.trunk_forwards)}
        for j, (d, a) in enumerate(zip(self.drafted, self.accepted, strict=True), start=1):
            out[f"acceptance_depth_{j}"] = a / d if d else float("nan")
        return out


class DraftVocab:
    """A smaller output vocabulary for drafting: the depths' heads (eq. 21) restricted to ``ids``, e.g. the most
    frequent tokens of the training data (:func:`frequent_tokens`). A draft then costs a fraction of the full
    V-way head; verification by the trunk's full head keeps the output exact (greedy: identical tokens; sampling:
    the rejection rule with q = 0 outside ``ids``)."""

    def __init__(self, model: KunlunBaize, ids: torch.Tensor) -> None:
        assert model.mtp is not None
        V = model.config.vocab_size
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().unique()
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"draft vocabulary ids must be a non-empty set of token ids in [0, {V})")
        device = model.head_weight.device
        self.ids = ids.to(device)
        self.vocab_size = V
        self.weights = [model.mtp.head_weight(j, model.head_weight).index_select(0, self.ids)
                        for j in range(1, model.config.mtp_depth + 1)]

    def full(self, q: torch.Tensor) -> torch.Tensor:
        """A distribution over the draft ids as one over the whole vocabulary (zeros elsewhere)."""
        return q.new_zeros(self.vocab_size).index_copy_(0, self.ids, q)


def frequent_tokens(token_counts: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` most frequent token ids given per-id counts [V] (e.g. ``torch.bincount`` of training tokens)."""
    return torch.as_tensor(token_counts).argsort(descending=True, stable=True)[:n]


def draft(model: KunlunBaize, cache: InferenceCache, hidden: torch.Tensor, next_token: int, k: int,
          sampling: SamplingParams, gen: torch.Generator | None, vocab: DraftVocab | None = None,
          decoder: StaticDecoder | None = None,
          seen: torch.Tensor | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """``k`` draft tokens after ``next_token`` (= t_n) and the distributions they were drawn from (none if greedy).
    ``seen`` [1, V] marks the context's tokens (``next_token`` included) for a repetition penalty, which each
    depth applies with the drafts before it added.

    ``hidden`` [1, 1, d] is the trunk's final hidden state at position n − 1 = ``cache.length`` − 1. With
    ``vocab`` the drafts come from that smaller vocabulary; with ``decoder`` (whose cache is ``cache``) each depth's
    step runs compiled (:meth:`StaticDecoder.draft`).
    """
    assert model.mtp is not None
    n = cache.length
    device = hidden.device
    tokens = [next_token]
    qs: list[torch.Tensor] = []
    g = hidden
    ctx = seen.clone() if seen is not None else None
    for j in range(1, k + 1):
        # depth j's key slot s holds t_{s+j}: slots n−j … n−1 take t_n, d_1 … d_{j−1}
        new = torch.tensor([tokens[max(0, j - n):j]], device=device)
        weight = model.mtp.head_weight(j, model.head_weight) if vocab is None else vocab.weights[j - 1]
        step = decoder.draft(j, g, new, weight) if decoder is not None else None
        if step is None:
            g = model.mtp.depth_step(j, g, model.embed(new), model.rope.at(n), n - 1, max(0, n - j), cache.mtp[j - 1])
            logits = linear(model.mtp.depths[j - 1].out_norm(g[:, -1]), weight)
        else:
            g, logits = step
        mask = None if ctx is None else ctx if vocab is None else ctx[:, vocab.ids]
        if sampling.greedy:  # greedy verification compares argmaxes: no distribution needed
            best = int(penalize(logits, mask, sampling.repetition_penalty).argmax(-1)[0])
            tokens.append(best if vocab is None else int(vocab.ids[best]))
        else:
            q = distribution(logits, sampling, mask)[0]
            if vocab is not None:
                q = vocab.full(q)
            qs.append(q)
            tokens.append(int(torch.multinomial(q, 1, generator=gen)))
        if ctx is not None:
            ctx[0, tokens[-1]] = True
    return tokens[1:], qs


def _accept(trunk_logits: torch.Tensor, drafts: list[int], qs: list[torch.Tensor], sampling: SamplingParams,
            gen: torch.Generator | None, seen: torch.Tensor | None = None) -> tuple[int, int]:
    """Number of drafts accepted and the trunk's token after them. ``seen`` [1, V]: the context's tokens for a
    repetition penalty; the trunk's prediction after draft i counts the drafts before it too."""
    ctx = seen.clone() if seen is not None else None
    for i, d in enumerate(drafts):
        mask = None if ctx is None else ctx[0]
        if sampling.greedy:
            best = int(penalize(trunk_logits[i], mask, sampling.repetition_penalty).argmax())
            if best != d:
                return i, best
        else:
            p = distribution(trunk_logits[i], sampling, mask)
            q = qs[i]
            u = torch.rand((), generator=gen, device=p.device)
            if u * q[d] > p[d]:  # rejected (accepted with probability min(1, p/q))
                residual = (p - q).clamp_min(0)
                if residual.sum() <= 0:  # p == q up to rounding: any draw from p is exact
                    residual = p
                return i, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
        if ctx is not None:
            ctx[0, d] = True
    return len(drafts), int(sample(trunk_logits[len(drafts)][None], sampling, gen, ctx)[0])


def speculative_round(model: KunlunBaize, cache: InferenceCache, hidden: torch.Tensor, next_token: int, k: int,
                      sampling: SamplingParams, gen: torch.Generator | None, stats: SpecStats | None = None,
                      vocab: DraftVocab | None = None, decoder: StaticDecoder | None = None,
                      seen: torch.Tensor | None = None) -> tuple[list[int], torch.Tensor]:
    """One draft–verify round of a single sequence: the new tokens (the accepted drafts, then the trunk's own
    token) and the trunk's hidden state [1, 1, d] at the last token now in the cache.

    The cache holds t_0 … t_{n−1}; ``next_token`` = t_n is chosen but not fed; ``hidden`` is the trunk's state at
    t_{n−1}. Afterwards the cache holds t_n and the accepted drafts, and the last returned token is the next
    ``next_token``. ``k`` drafts are made (1 … mtp_depth), from ``vocab`` when given; the verification writes
    k + 1 slots, through ``decoder``'s compiled step when given (``cache`` is then ``decoder.cache``). ``seen``
    [1, V] marks the tokens of the context (``next_token`` included) for a repetition penalty."""
    drafts, qs = draft(model, cache, hidden, next_token, k, sampling, gen, vocab, decoder, seen)
    n = cache.length
    ids = torch.tensor([[next_token, *drafts]], device=hidden.device)
    if decoder is None:
        verify = model(ids, cache=cache, mtp=False)
        logits, verified = verify.logits, verify.hidden
    else:
        logits, verified = decoder.step(ids)
    accepted, bonus = _accept(logits[0], drafts, qs, sampling, gen, seen)
    if stats is not None:
        stats.trunk_forwards += 1
        for j in range(k):
            stats.drafted[j] += 1
            stats.accepted[j] += int(j < accepted)
    cache.crop(n + 1 + accepted)  # keep t_n and the accepted drafts; the bonus is fed next round
    return [*drafts[:accepted], bonus], verified[:, accepted:accepted + 1]


@torch.inference_mode()
def speculative_generate(
    model: KunlunBaize,
    prompt: list[int],
    max_new_tokens: int,
    sampling: SamplingParams = GREEDY,
    draft_len: int | None = None,
    adaptive: bool = False,
    eos_id: int | None = None,
    seed: int | None = None,
    truncate: bool = False,
    on_token: TokenCallback | None = None,
    should_stop: StopCallback | None = None,
    draft_vocab: torch.Tensor | None = None,
    decoder: StaticDecoder | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
) -> GenerationResult:
    """Generate for one prompt with MTP self-speculative decoding; ``stats`` reports acceptance per depth.

    ``draft_len`` (1 … D, default D) drafts per round; ``adaptive`` grows it after a fully accepted round
    and shrinks it after a round that accepted nothing. ``draft_vocab`` (token ids, e.g.
    :func:`frequent_tokens`) restricts the drafts to those tokens: cheaper drafts, the same output.
    ``decoder`` (a :class:`~kunlunbaize.infer.static.StaticDecoder` of this model with ``batch_size=1`` and
    ``mtp=True``) verifies with its compiled static step: the same tokens. The prompt is read ``prefill_chunk``
    tokens at a time (None: in one forward), as :func:`~kunlunbaize.infer.generate` does.
    """
    check_prefill_chunk(prefill_chunk)
    model.eval()
    D = model.config.mtp_depth
    if D == 0:
        raise ValueError("speculative decoding needs MTP depths (mtp_depth >= 1); this model has none")
    k = D if draft_len is None else draft_len
    if not 1 <= k <= D:
        raise ValueError(f"draft_len must be between 1 and mtp_depth={D}, got {draft_len}")
    device = model.embed.weight.device
    if decoder is not None:
        _check_decoder(decoder, model)
        if decoder.batch_size != 1 or not decoder.cache.mtp:
            raise ValueError("speculative decoding needs a StaticDecoder(model, batch_size=1, mtp=True)")
    context = model.config.max_seq_len if decoder is None else decoder.max_len
    (prompt,), max_new_tokens = fit_prompts([prompt], max_new_tokens, context, truncate)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    vocab = DraftVocab(model, draft_vocab) if draft_vocab is not None else None
    t0 = time.perf_counter()
    ids = torch.tensor([prompt], device=device)
    if decoder is None:
        cache = model.new_cache(1, len(prompt) + max_new_tokens)  # verification never writes past it
        out = prefill(model, ids, cache, prefill_chunk)
    else:
        cache, out = decoder.cache, decoder.prefill(ids, chunk=prefill_chunk, keep=1)
    hidden = out.hidden[:, -1:]
    seen = (context_mask([prompt], model.config.vocab_size, device) if sampling.repetition_penalty != 1.0
            else None)
    nxt = int(sample(out.logits[:, -1], sampling, gen, seen)[0])
    stats = SpecStats(drafted=[0] * D, accepted=[0] * D)
    result: list[int] = []
    reason = "length"

    def emit(tok: int) -> bool:
        """Append a token; True when generation must end."""
        nonlocal reason
        if seen is not None:
            seen[0, tok] = True
        if eos_id is not None and tok == eos_id:
            reason = "eos"
            return True
        result.append(tok)
        if on_token is not None:
            on_token(0, tok)
        if should_stop is not None and should_stop(0, result):
            reason = "stop"
            return True
        return len(result) >= max_new_tokens

    finished = emit(nxt)
    while not finished:
        kk = min(k, max_new_tokens - len(result))  # no point drafting past the budget
        new, hidden = speculative_round(model, cache, hidden, nxt, kk, sampling, gen, stats, vocab, decoder, seen)
        accepted = len(new) - 1
        for tok in new:
            if emit(tok):
                finished = True
                break
        nxt = new[-1]
        if adaptive:
            k = min(D, k + 1) if accepted == kk else max(1, k - 1) if accepted == 0 else k
    stats.tokens = len(result)
    s = stats.as_dict()
    s["seconds"] = time.perf_counter() - t0
    s["tokens_per_s"] = len(result) / s["seconds"] if s["seconds"] > 0 else float("nan")
    return GenerationResult(tokens=[result], finish_reasons=[reason], stats=s)
