"""The serving engine: continuous batching of concurrent requests on one model, in a thread of its own.

Requests wait in a bounded queue. Between decoding steps the engine admits waiting requests (prompts of similar
lengths are prefilled together, left-padded, then their cache rows join the batch, and their first tokens are sent
before the next step) and drops finished, cancelled and timed-out ones, so requests
join and leave while others decode. Every step feeds one token per running request through one cached forward.

The batch lives in one preallocated :class:`~kunlunbaize.model.cache.InferenceCache` of ``max_batch`` rows and the
model's context in slots. All rows share the slot counter: a row that joins is placed so that its prompt ends at the
current slot, with left padding before it (the padding-exact path of the model: positions count real tokens only),
so each request computes what it would alone. When the slots run out, every row is shifted left by the padding all
rows share; a finished row's place is taken by the last row.

A prompt is prefilled ``prefill_chunk`` tokens at a time (:func:`~kunlunbaize.model.prefill`), so a long one needs
the working memory of one chunk, not of the whole prompt. With ``static.fill_buckets``, a prompt admitted alone
that fits one of the compiled prompt-length buckets is read through it instead
(:class:`~kunlunbaize.infer.static.PromptFiller`: right-padded, causal, the same slots and logits).

With ``static`` options the running batch steps through a :class:`~kunlunbaize.infer.static.BatchDecoder`: the
static-shape step, compiled once per bucket of rows (powers of two up to ``max_batch``) and, for the larger ones, of
key slots (the context, its half, its quarter) while the engine is made, before it takes requests; the tokens are the
eager step's. The step reads the fewest slots that hold the running rows' tokens: when the shared left padding is all
that keeps the batch in a larger slot bucket, the rows are shifted left first.

A lone greedy request (nothing else running or waiting) decodes with MTP self-speculative rounds when the engine is
made with ``speculative=True``: the same tokens, fewer trunk forwards.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..infer.sampling import GREEDY, SamplingParams, sample
from ..infer.speculative import SpecStats, speculative_round
from ..infer.static import BatchDecoder, CompileOptions, PromptFiller, fill_buckets
from ..infer.text import TextStream
from ..model import DEFAULT_PREFILL_CHUNK, InferenceCache, KunlunBaize, check_prefill_chunk, prefill
from ..model.model import ModelOutput

log = logging.getLogger("kunlunbaize.serve")


class QueueFull(RuntimeError):
    """The engine's queue holds ``max_queue`` requests already: try again later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Params:
    """How one sequence is generated."""

    max_tokens: int
    sampling: SamplingParams = GREEDY
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_ids: frozenset[int] = frozenset()  # tokens that end the reply (end of text, end of turn); not in the text
    logprobs: int | None = None  # per generated token: its log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)
    timeout: float | None = None  # seconds from submission


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Delta:
    """New text of a sequence and the tokens it came from (with their log-probabilities when asked)."""

    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, right after the prompt was read (echo)


@dataclass
class Finished:
    """The end of a sequence: why (``stop``, ``length``, ``cancelled``, ``timeout``, ``error``) and everything it
    produced."""

    reason: str
    text: str
    tokens: list[int]
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None
    error: str | None = None


Sink = Callable[[Delta | Finished], None]
_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One generated sequence (one choice of a request), as the engine tracks it."""

    prompt: list[int]
    params: Params
    sink: Sink
    id: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    pending: list[int] = field(default_factory=list)  # tokens whose text has not been sent yet
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    next_token: int = -1  # chosen, not yet fed
    length: int = 0  # tokens in the cache
    hidden: torch.Tensor | None = None  # the trunk's state at the last fed token (for drafting)
    generator: torch.Generator | None = None
    stream: TextStream | None = None
    cancelled: bool = False
    done: bool = False

    @property
    def deadline(self) -> float | None:
        return None if self.params.timeout is None else self.submitted + self.params.timeout


class Engine:
    """Continuous batching over one :class:`KunlunBaize` model; :meth:`submit` from any thread."""

    def __init__(self, model: KunlunBaize, tokenizer: Any, max_batch: int = 16, max_queue: int = 256,
                 speculative: bool = False, draft_len: int | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 after_step: Callable[[], None] | None = None, static: CompileOptions | None = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)
        if speculative and model.config.mtp_depth == 0:
            raise ValueError("speculative decoding needs MTP depths; this model has none")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context = model.config.max_seq_len
        self.max_batch, self.max_queue = max_batch, max_queue
        self.speculative = speculative
        self.after_step = after_step  # called on the engine's thread after each step (sends its events in a batch)
        self.draft_len = draft_len or model.config.mtp_depth
        self.batch = model.new_cache(max_batch, self.context, mtp=speculative)
        self.batch.padded = True
        self.decoder = None if static is None else BatchDecoder(model, self.batch, static)
        self.filler = self._filler(static)
        if self.decoder is not None:
            self.decoder.warm_up()  # compiles every bucket now, not while the first requests wait
        if self.filler is not None:
            self.filler.warm_up()
        self.active: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.spec_stats = SpecStats(drafted=[0] * model.config.mtp_depth, accepted=[0] * model.config.mtp_depth)
        self.steps = 0
        self._cond = threading.Condition()
        self._accepting = True
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kunlun-engine", daemon=True)
        self._thread.start()

    def _filler(self, static: CompileOptions | None) -> PromptFiller | None:
        """The compiled prefill of lone short prompts (``static.fill_buckets``), up to the context and the prefill
        chunk; None without it, and for a batch that keeps the MTP depths' keys (their prefill stays eager)."""
        if static is None or not static.fill_buckets or self.batch.mtp:
            return None
        return PromptFiller(self.model, fill_buckets(min(self.context, self.prefill_chunk or self.context),
                                                     static.fill_buckets), static)

    # ----------------------------------------------------------------------------------------------- interface
    def submit(self, prompt: list[int], params: Params, sink: Sink) -> Sequence:
        """Queue a sequence; ``sink`` receives its :class:`Delta` s and then one :class:`Finished`, on the engine's
        thread. Raises QueueFull, EngineClosed, or ValueError when the prompt and budget do not fit the context."""
        check_fits(prompt, params, self.context)
        seq = Sequence(prompt=list(prompt), params=params, sink=sink)
        with self._cond:
            if not self._accepting:
                raise EngineClosed("the server is shutting down")
            if sum(not s.cancelled for s in self.waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already")
            self.waiting.append(seq)
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` at the next step (its client went away); its sink gets ``Finished("cancelled")``."""
        seq.cancelled = True
        with self._cond:
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.active)

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; those queued or running go on."""
        with self._cond:
            self._accepting = False

    def shutdown(self, timeout: float | None = None) -> bool:
        """Refuse new requests, let the queued and running ones finish, stop the thread. True when it stopped
        within ``timeout``; what is left then is cancelled."""
        with self._cond:
            self._accepting = False
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            for seq in [*self.waiting, *self.active]:
                seq.cancelled = True
            self._thread.join(5.0)
            return False
        return True

    # ------------------------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.waiting and not self.active and not self._closed:
                    self._cond.wait()
                if self._closed and not self.waiting and not self.active:
                    return
                admitted = []
                while self.waiting and len(self.active) + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.popleft())
            try:
                with torch.inference_mode():
                    self._admit_all(admitted)
                    if admitted and self.active and self.after_step is not None:
                        self.after_step()  # the first tokens go out now, not after the step
                    self._expire()
                    if self.active:
                        self._step()
            except Exception as e:  # the engine must outlive any request: fail the ones in flight, go on
                log.exception("engine step failed")
                for seq in [*admitted, *self.active]:
                    if not seq.done:
                        self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
                self.active.clear()
                self.batch.length = 0
            if self.after_step is not None:
                self.after_step()

    def _admit_all(self, seqs: list[Sequence]) -> None:
        """Prefill the admitted sequences, those of similar lengths together (left-padded, one forward), and place
        them into the batch; a group that fails is retried one by one, so only the failing request fails."""
        ready = [seq for seq in seqs if not self._expired(seq)]
        every = [[seq] for seq in ready if seq.params.prompt_logprobs is not None]  # need every position's logits
        for group in every + _groups([seq for seq in ready if seq.params.prompt_logprobs is None]):
            self._admit_group(group)

    def _admit_group(self, group: list[Sequence]) -> None:
        try:
            self._admit(group)
        except Exception as e:  # these requests alone fail; the batch is untouched
            left = [seq for seq in group if not seq.done and seq not in self.active]
            if len(group) > 1 and not any(seq.tokens for seq in left):
                log.warning("prefilling %d requests together failed (%s); one by one", len(group), e)
                for seq in left:
                    self._admit_group([seq])
                return
            log.exception("prefill failed")
            for seq in left:
                self._finish(seq, "error", error=f"{type(e).__name__}: {e}")

    def _admit(self, group: list[Sequence]) -> None:
        """Prefill ``group``'s prompts (:meth:`_prefill`), choose each one's first token, and place their cache rows
        into the batch (padding and all: each row computes what it would alone)."""
        device = self.model.embed.weight.device
        for seq in group:
            if seq.params.seed is not None:
                seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)
            seq.stream = TextStream(self.tokenizer, 1, list(seq.params.stop))
            if seq.params.logprobs is not None:
                seq.logprobs = []
        every = group[0].params.prompt_logprobs is not None  # (then alone) logits of every prompt position
        cache, out = self._prefill(group, every)
        for i, seq in enumerate(group):
            if every:
                seq.prompt_logprobs = [None, *_logprobs(out.logits[0, :-1], seq.prompt[1:],
                                                        seq.params.prompt_logprobs)]
                _deliver(seq, Delta(text="", tokens=[], logprobs=None, prompt_logprobs=seq.prompt_logprobs))
            if seq.params.max_tokens == 0:
                self._finish(seq, "length")
                continue
            logits = out.logits[i:i + 1, -1]
            seq.hidden = out.hidden[i:i + 1, -1:]
            if not self._emit(seq, int(sample(logits, seq.params.sampling, seq.generator)[0]), logits[0]):
                self._join(seq, cache, i)

    def _prefill(self, group: list[Sequence], every: bool) -> tuple[InferenceCache, ModelOutput]:
        """Read ``group``'s prompts into a cache of their own, row i ending at its ``length``: the logits and final
        hidden states of the last position (of every position when ``every``). A lone prompt that fits a compiled
        prefill bucket goes through it; else one eager forward, left-padded to the longest prompt."""
        prompt = group[0].prompt
        if self.filler is not None and len(group) == 1 and not every and self.filler.bucket(len(prompt)):
            cache, logits, hidden = self.filler.fill(prompt)
            return cache, ModelOutput(logits=logits[:, None], hidden=hidden)
        device = self.model.embed.weight.device
        n = max(len(seq.prompt) for seq in group)
        ids = torch.tensor([[0] * (n - len(seq.prompt)) + seq.prompt for seq in group], device=device)
        mask = None
        if any(len(seq.prompt) < n for seq in group):
            mask = torch.tensor([[0] * (n - len(seq.prompt)) + [1] * len(seq.prompt) for seq in group],
                                device=device)
        cache = self.model.new_cache(len(group), n, mtp=bool(self.batch.mtp))
        return cache, prefill(self.model, ids, cache, self.prefill_chunk, mask, keep=None if every else 1)

    def _join(self, seq: Sequence, cache: InferenceCache, row: int) -> None:
        """Place row ``row`` of a prefilled ``cache`` into the batch as its last running row."""
        rows, n = len(self.active), cache.length
        if rows == 0:
            self.batch.length = n
        elif n > self.batch.length:
            self.batch.shift(n - self.batch.length, rows)
        self.batch.place_row(rows, cache, row)
        end = self.batch.length
        self.batch.valid[rows, end - n:end] = cache.valid[row, :n]  # the prompt's own left padding stays padding
        seq.length = len(seq.prompt)
        self.active.append(seq)

    def _step(self) -> None:
        """One decoding step for every running sequence (or a speculative round for a lone greedy one)."""
        if self._lone_greedy():
            self._speculative_step(self.active[0])
        else:
            self._compact()
            feed = torch.tensor([[s.next_token] for s in self.active], device=self.model.embed.weight.device)
            logits, hidden = self._forward(feed)
            logits = logits[:, -1]
            greedy = logits.argmax(-1).tolist()
            for b, seq in enumerate(self.active):
                seq.length += 1
                if self.speculative:
                    seq.hidden = hidden[b:b + 1, -1:]
                p = seq.params.sampling
                tok = greedy[b] if p.greedy else int(sample(logits[b:b + 1], p, seq.generator)[0])
                self._emit(seq, tok, logits[b])
        self.steps += 1
        self._remove_done()

    def _compact(self) -> None:
        """Drop the left padding every running row has (shift them left) when the slots run out, or when without
        it the compiled step would read more slots than the rows' tokens need (``BatchDecoder.slots``)."""
        rows, end = len(self.active), self.batch.length + 1
        lead = min(end - 1 - s.length for s in self.active)
        if lead and (end > self.context or (self.decoder is not None
                                            and self.decoder.slots(rows, end) > self.decoder.slots(rows, end - lead))):
            self.batch.shift(-lead, rows)

    def _forward(self, feed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and final hidden states of the running rows' next tokens ``feed`` [rows, 1], cached."""
        if self.decoder is not None:
            return self.decoder.step(feed)
        view = self.batch.rows(feed.shape[0])
        out = self.model(feed, cache=view, mtp=False)
        self.batch.length = view.length
        return out.logits, out.hidden

    def _lone_greedy(self) -> bool:
        if not self.speculative or len(self.active) != 1 or self.waiting:
            return False
        p = self.active[0].params
        return p.sampling.greedy and p.logprobs is None

    def _speculative_step(self, seq: Sequence) -> None:
        lead = self.batch.length - seq.length
        if lead:
            self.batch.shift(-lead, 1)
        view = self.batch.rows(1)
        view.padded = False  # one row from slot 0: the unpadded path, as speculative_generate runs it
        k = min(self.draft_len, seq.params.max_tokens - len(seq.tokens))
        new, seq.hidden = speculative_round(self.model, view, seq.hidden, seq.next_token, k, GREEDY, None,
                                            self.spec_stats)
        self.batch.length = seq.length = view.length
        self.batch.valid[0, :view.length] = True  # the unpadded path does not mark its slots
        for tok in new:
            if self._emit(seq, tok):
                break

    def _emit(self, seq: Sequence, tok: int, logits: torch.Tensor | None = None) -> bool:
        """Add a chosen token to ``seq`` and send its text; True when the sequence ended."""
        if tok in seq.params.stop_ids:
            self._finish(seq, "stop")
            return True
        seq.tokens.append(tok)
        seq.next_token = tok
        seq.pending.append(tok)
        if seq.logprobs is not None and logits is not None:
            entry = _logprobs(logits[None], [tok], seq.params.logprobs)[0]
            seq.logprobs.append(entry)
            seq.pending_logprobs.append(entry)
        assert seq.stream is not None
        shown = seq.stream.shown[0]
        stopped = seq.stream.update(0, seq.tokens)
        if seq.stream.shown[0] > shown and not stopped:
            self._send(seq, seq.stream.texts[0][shown:seq.stream.shown[0]])
        if stopped:
            self._finish(seq, "stop")
        elif len(seq.tokens) >= seq.params.max_tokens:
            self._finish(seq, "length")
        return seq.done

    def _send(self, seq: Sequence, text: str) -> None:
        logprobs = seq.pending_logprobs if seq.logprobs is not None else None
        delta = Delta(text=text, tokens=seq.pending, logprobs=logprobs)
        seq.pending, seq.pending_logprobs = [], []
        _deliver(seq, delta)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.done = True
        text = ""
        if seq.stream is not None:  # send what was held back (a possible stop string's start, a partial character)
            shown = seq.stream.shown[0]
            text = seq.stream.finish(0, seq.tokens)
            if text[shown:] or seq.pending:
                self._send(seq, text[shown:])
        _deliver(seq, Finished(reason=reason, text=text, tokens=seq.tokens, prompt_tokens=len(seq.prompt),
                               logprobs=seq.logprobs, prompt_logprobs=seq.prompt_logprobs, error=error))

    def _expired(self, seq: Sequence) -> bool:
        """Finish ``seq`` if it was cancelled or its time is up; True if so."""
        if seq.done:
            return True
        if seq.cancelled:
            self._finish(seq, "cancelled")
        elif seq.deadline is not None and time.monotonic() > seq.deadline:
            self._finish(seq, "timeout")
        return seq.done

    def _expire(self) -> None:
        for seq in self.active:
            self._expired(seq)
        with self._cond:
            waiting = list(self.waiting)
        gone = [s for s in waiting if self._expired(s)]
        if gone:
            with self._cond:
                self.waiting = deque(s for s in self.waiting if not s.done)
        self._remove_done()

    def _remove_done(self) -> None:
        """Take finished sequences out of the batch: the last row moves into each freed place."""
        i = 0
        while i < len(self.active):
            if self.active[i].done:
                last = len(self.active) - 1
                if i != last:
                    self.batch.copy_row(i, last)
                    self.active[i] = self.active[last]
                self.active.pop()
            else:
                i += 1
        if not self.active:
            self.batch.length = 0


def check_fits(prompt: list[int], params: Params, context: int) -> None:
    """Raise ValueError when ``prompt`` is empty or it and its budget do not fit the model's ``context``."""
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) + max(params.max_tokens, 1) > context:
        raise ValueError(f"the prompt has {len(prompt)} tokens and {params.max_tokens} more were asked for, "
                         f"but the model's context is {context} tokens")


def _groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """``seqs`` in groups to prefill together: longest first, a group grows while its padding stays below half of
    its slots (a long prompt is not padded to with many short ones)."""
    groups: list[list[Sequence]] = []
    real = 0
    for seq in sorted(seqs, key=lambda s: -len(s.prompt)):
        n = len(seq.prompt)
        if groups and (len(groups[-1]) + 1) * len(groups[-1][0].prompt) <= 2 * (real + n):
            groups[-1].append(seq)
            real += n
        else:
            groups.append([seq])
            real = n
    return groups


def _deliver(seq: Sequence, event: Delta | Finished) -> None:
    """Hand ``event`` to the sequence's sink; a sink that fails (its client is gone) cancels the sequence."""
    try:
        seq.sink(event)
    except Exception:
        log.exception("delivering an event failed; cancelling the request")
        seq.cancelled = True


def _logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """For each row of ``logits`` [n, V]: the log-probability of ``tokens[i]`` and the ``top`` most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, torch.tensor(tokens, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
    if top > 0:
        values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, c, tp) for t, c, tp in zip(tokens, chosen, tops, strict=True)]
