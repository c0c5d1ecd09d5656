"""Static decoding: one cache allocated for the whole context and a trunk step compiled at fixed shapes.

Eager decoding slices the cache to its current length, so every step has new shapes, and it pays Python and
dispatch costs for each of the trunk's many small operations. Here (as in gpt-fast) the step reads the whole
preallocated cache through a mask and takes its position as a tensor: its shapes depend only on the batch size
and the number of new tokens, so ``torch.compile`` traces it once per token count (1 for plain decoding, k + 1
for a speculative verification) and every later step reuses that graph; on a GPU, ``mode="reduce-overhead"``
also replays it as a CUDA graph. The cache lives as long as the :class:`StaticDecoder`, so later prompts reuse
the compiled steps too. Outputs equal the eager path's (``tests/test_static_decode.py``).
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..model import DEFAULT_PREFILL_CHUNK, InferenceCache, KunlunBaize, prefill
from ..model.cache import CacheOverflowError
from ..model.layers import linear, small_rows
from ..model.model import ModelOutput


def trunk_step(model: KunlunBaize, cache: InferenceCache, ids: torch.Tensor,
               start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, n, V] and final hidden states [B, n, d] of ``ids`` [B, n] fed at slots ``start`` … start+n−1
    (a 0-d long tensor), writing the cache there (its ``length`` is left to the caller). The MTP depths' keys are
    written too when the cache holds them; this needs ``start`` ≥ mtp_depth."""
    hidden, emb, positions, rope = _static_trunk(model, cache, ids, start)
    if cache.mtp:  # depth j's key slot s holds t_{s+j} (as MultiTokenPrediction.write_keys)
        for j, (depth, kv) in enumerate(zip(model.mtp.depths, cache.mtp, strict=True), start=1):
            k, v = depth.cross_attn.project_kv(depth.embed_norm(emb), rope(positions - j))
            kv.write(start - j, k, v)
    return linear(model.norm(hidden), model.head_weight), hidden


def fill_step(model: KunlunBaize, cache: InferenceCache, ids: torch.Tensor, start: torch.Tensor,
              last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, 1, V] and final hidden states [B, 1, d] at positions ``last`` [B] of the prompts ``ids`` [B, P]
    read into an empty ``cache`` from slot 0: each row's prompt ends at its ``last`` and is right-padded with any
    tokens up to P (causal, so the prompt's slots and outputs are the unpadded prompt's; the slots after it hold
    garbage, which the caller drops). ``start`` is a 0-d long tensor holding 0 (an input, not a constant: inductor
    failed to compile KunlunBaize's convolution history reads at a constant slot). The cache must hold no MTP keys."""
    hidden, *_ = _static_trunk(model, cache, ids, start, last.max() + 1)
    hidden = hidden[torch.arange(ids.shape[0], device=ids.device), last][:, None]
    return linear(model.norm(hidden), model.head_weight), hidden


def _static_trunk(model: KunlunBaize, cache: InferenceCache, ids: torch.Tensor, start: torch.Tensor,
                  length: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable]:
    """The trunk's final hidden states [B, n, d] of ``ids`` [B, n] fed at slots ``start`` … start+n−1, with their
    embeddings, rotary positions and rotary table; ``length``: the sequence length dynamic NTK scales for (default:
    the furthest position fed)."""
    n = ids.shape[1]
    slots = start + torch.arange(n, device=ids.device)
    key_slots = torch.arange(cache.max_len, device=ids.device)
    cache.valid.index_fill_(1, slots, True)
    # as KunlunBaizeTrunk._padding: rotary positions count a row's real tokens, keys are the real ones up to a query
    pads = (~cache.valid & (key_slots < start)).sum(-1, keepdim=True)
    positions = slots[None] - pads  # [B, n]
    mask = ((key_slots[None] <= slots[:, None])[None] & cache.valid[:, None, :])[:, None]  # [B, 1, n, max_len]
    emb = model.embed(ids)
    if model.rope.dynamic:  # dynamic NTK: one length per step
        rope = model.rope.at(positions.max() + 1 if length is None else length)
    else:
        rope = model.rope.at(None)
    return model.run_blocks(emb, rope(positions), start, cache, mask, None), emb, positions, rope


def draft_step(model: KunlunBaize, cache: InferenceCache, j: int, g: torch.Tensor, ids: torch.Tensor,
               start: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP depth ``j``'s drafting step at query slot ``start`` (a 0-d long tensor; n − 1 when the trunk has cached
    n tokens), as :func:`~kunlunbaize.infer.speculative.draft` computes it: from g^{j−1} ``g`` [1, 1, d] there, with
    ``ids`` [1, j] = t_n, d_1 … d_{j−1} written to depth j's key slots start − j + 1 … start (slot s holds t_{s+j}),
    it returns g^j [1, 1, d] and the draft logits [1, V'] over the rows of ``weight`` (the depth's head, eq. 21, or a
    draft vocabulary's part of it). One unpadded sequence, as speculative decoding runs; needs ``start`` ≥ j − 1."""
    depth = model.mtp.depths[j - 1]
    kv_start = start - (j - 1)
    rope = model.rope.at(start + 1)  # dynamic NTK: the frequencies of the sequence so far
    rope_q = rope(start[None])
    rope_k = rope(kv_start + torch.arange(j, device=ids.device))
    mask = (torch.arange(cache.max_len, device=ids.device) <= start)[None, None, None]  # [1, 1, 1, max_len]
    g = g + depth.cross_attn(depth.hidden_norm(g), depth.embed_norm(model.embed(ids)), rope_q, rope_k, 0, kv_start,
                             cache.mtp[j - 1], mask)  # eq. 15–20 for one query
    return g, linear(depth.out_norm(g[:, -1]), weight)


_decoder_ids = itertools.count()


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


CPU_MAX_AUTOTUNE = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
"""Inductor settings of ``StaticDecoder(mode="max-autotune")`` on a CPU. The C++ GEMM templates need frozen
weights (``freezing``); they are applied with ``torch._inductor.config.patch`` while a shape is traced, because
passed as ``torch.compile(options=…)`` they did not take effect (torch 2.13: no template was tried)."""


def _own_code(fn: Callable, tag: int) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs per code object and allows 8 per object:
    decoders sharing :func:`trunk_step`'s would pool their graphs (one per decoder and token count, as each guards
    its own cache) and a third speculative decoder would hit that limit; each also would check the others' guards."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class StaticDecoder:
    """Cached decoding of ``batch_size`` sequences of up to ``max_len`` tokens (default: the model's context)
    with :func:`trunk_step` compiled once per number of new tokens.

    ``prefill`` runs the prompt eagerly (prompt lengths vary) and resets the cache, so one decoder serves any
    number of generations; ``step`` feeds new tokens through the compiled step. Pass it to
    :func:`~kunlunbaize.infer.generate` or :func:`~kunlunbaize.infer.speculative_generate` (``decoder=``);
    ``mtp=True`` keeps the MTP depths' keys, which speculative decoding needs. ``compile=False`` runs the same
    static step eagerly (for tests and debugging); ``mode`` and ``backend`` are ``torch.compile``'s
    (``mode="reduce-overhead"``: CUDA graphs on a GPU).

    ``cache`` makes the decoder step through that cache instead of one of its own (``batch_size``, ``max_len`` and
    ``mtp`` are then the cache's): :class:`BatchDecoder` gives each of its buckets the first rows of one batch cache.

    ``mode="max-autotune"`` on a CPU compiles with inductor's C++ GEMM templates (:data:`CPU_MAX_AUTOTUNE`): the
    weights are frozen into the compiled step as constants, prepacked, and each matrix product gets the kernel that
    measured fastest for its shape. On a 2-core CPU that makes the step about 1.8× faster than the default compile
    (docs/reports/BENCHMARKS.md) at a compile of minutes per decoder. Its matrix products keep ``F.linear``'s
    orientation at every row count (``layers.small_rows(0)``): the templates prepack the frozen weight as the
    product's second operand, and with the weight first (:func:`~kunlunbaize.model.layers.linear`'s small-row form)
    none applies and MKL's kernels run instead. Frozen means the step keeps the weights it was compiled with: after
    changing the model's weights, make a new decoder.
    """

    def __init__(self, model: KunlunBaize, batch_size: int = 1, max_len: int | None = None, mtp: bool = False,
                 compile: bool = True, mode: str | None = None, backend: str | Callable = "inductor",
                 options: dict | None = None, cache: InferenceCache | None = None) -> None:
        if mtp and model.mtp is None:
            raise ValueError("mtp=True needs a model with MTP depths (mtp_depth >= 1)")
        self.model = model
        # a given cache (e.g. the first rows of a larger one, InferenceCache.rows) replaces batch_size, max_len, mtp
        self.cache = model.new_cache(batch_size, max_len, mtp=mtp) if cache is None else cache
        self._start = torch.zeros((), dtype=torch.long, device=model.embed.weight.device)
        on_cpu = self._start.device.type == "cpu"
        self._clone = mode in ("reduce-overhead", "max-autotune") and not on_cpu  # modes that replay CUDA graphs
        self._patch: dict | None = None  # inductor settings while a new shape is traced
        self._traced: set[object] = set()
        if compile and mode == "max-autotune" and on_cpu and backend == "inductor":
            if options:
                raise ValueError("give either mode='max-autotune' or options, not both (as torch.compile)")
            self._patch, mode = CPU_MAX_AUTOTUNE, None
        if compile:
            # Fixed addresses: CUDA graphs may replay them. Not with freezing, which would take these inputs for
            # constants: the step would keep reading the cache as it was when traced.
            for t in [*self.cache.buffers(), self._start] if self._patch is None else []:
                torch._dynamo.mark_static_address(t)
            tag = next(_decoder_ids)
            self._step, self._draft, self._fill = (
                torch.compile(_own_code(fn, tag), fullgraph=True, dynamic=False, mode=mode, backend=backend,
                              options=options) for fn in (trunk_step, draft_step, fill_step))
        else:
            self._step, self._draft, self._fill = trunk_step, draft_step, fill_step

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def reset(self) -> None:
        """Forget every cached token (the buffers are kept: stale slots are masked and later overwritten)."""
        self.cache.length = 0
        self.cache.padded = False
        self.cache.valid.fill_(True)

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                chunk: int | None = DEFAULT_PREFILL_CHUNK, keep: int | None = None) -> ModelOutput:
        """Reset, then run the prompt ``ids`` [batch_size, T] eagerly into the cache, ``chunk`` tokens at a time
        (:func:`~kunlunbaize.model.prefill`): the trunk's logits and final hidden states of the last ``keep``
        positions (None: every position)."""
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"this decoder was made for batch {self.batch_size}, got {ids.shape[0]} prompts: make a "
                             f"StaticDecoder(model, batch_size={ids.shape[0]})")
        self.reset()
        return prefill(self.model, ids, self.cache, chunk, attention_mask, keep)

    def fill(self, ids: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reset, then read the right-padded prompts ``ids`` [batch_size, max_len] into the cache through the
        compiled :func:`fill_step` (traced once: the shape is always the decoder's): logits [B, 1, V] and final
        hidden states [B, 1, d] at each row's last prompt position ``last`` [B]. Row b's first last[b] + 1 slots
        then hold what prefilling its prompt alone writes; ``length`` is left at 0 for the caller to set."""
        if tuple(ids.shape) != (self.batch_size, self.max_len):
            raise ValueError(f"fill takes [{self.batch_size}, {self.max_len}] token ids (right-padded), "
                             f"got {list(ids.shape)}")
        if self.cache.mtp:
            raise ValueError("fill does not write the MTP depths' keys: prefill a cache with MTP keys eagerly")
        self.reset()
        self._start.fill_(0)
        return self._run("fill", self._fill, self.model, self.cache, ids, self._start, last)

    def step(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, n, V] and final hidden states [B, n, d] for ``ids`` [B, n] following the cached tokens."""
        cache = self.cache
        end = cache.length + ids.shape[1]
        if end > cache.max_len:
            raise CacheOverflowError(f"{end} tokens exceed this decoder's context of {cache.max_len}")
        if cache.length < len(cache.mtp):  # the depths' first key slots are still ahead: the eager path handles it
            out = self.model(ids, cache=cache, mtp=False)
            return out.logits, out.hidden
        self._start.fill_(cache.length)
        logits, hidden = self._run(ids.shape[1], self._step, self.model, cache, ids, self._start)
        cache.length = end
        return logits, hidden

    def draft(self, j: int, g: torch.Tensor, ids: torch.Tensor,
              weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """MTP depth ``j``'s drafting step (:func:`draft_step`, compiled once per depth and head size) after the
        cached tokens; None while depth j's first key slots are still ahead (then draft eagerly)."""
        if not self.cache.mtp or self.cache.length < j:
            return None
        self._start.fill_(self.cache.length - 1)
        shape = ("draft", j, weight.shape[0], type(weight))
        return self._run(shape, self._draft, self.model, self.cache, j, g, ids, self._start, weight)

    def _run(self, shape: object, fn: Callable, *args) -> tuple[torch.Tensor, torch.Tensor]:
        """``fn(*args)``; a shape's first call (which compiles it) runs under the mode's inductor settings.

        Tensor arguments are passed with contiguous strides: Dynamo guards on every stride, even of a size-1
        dimension, so a slice such as the verification's hidden state ``[1, k + 1, d][:, i:i + 1]`` would recompile
        the drafting step for each k (and, after the first call, without those settings)."""
        args = tuple(a.clone(memory_format=torch.contiguous_format)
                     if isinstance(a, torch.Tensor) and a.stride() != _contiguous_strides(a.shape) else a for a in args)
        if self._patch is None:
            out = fn(*args)
        else:  # every call under small_rows(0), as traced (Dynamo guards on it); the first one compiles
            settings = torch._inductor.config.patch(self._patch) if shape not in self._traced else nullcontext()
            with settings, small_rows(0):
                out = fn(*args)
            self._traced.add(shape)
        if self._clone:  # a CUDA graph's outputs are overwritten by its next replay
            out = tuple(t.clone() for t in out)
        return out


MAX_BUCKETS = 8
"""Row buckets a :class:`BatchDecoder` may have: Dynamo keeps at most 8 graphs per compiled function by default."""


@dataclass(frozen=True)
class CompileOptions:
    """How a :class:`BatchDecoder` runs its static step: ``compile=False`` runs it eagerly (tests, debugging);
    ``mode`` and ``backend`` are ``torch.compile``'s, as for :class:`StaticDecoder` (``"max-autotune"`` on a CPU:
    :data:`CPU_MAX_AUTOTUNE`); ``slot_buckets``: how many key lengths (the context, its half, its quarter …) the
    steps of at least half the batch are compiled for."""

    compile: bool = True
    mode: str | None = None
    backend: str | Callable = "inductor"
    slot_buckets: int = 3
    """Key lengths the larger row buckets' steps are compiled for (:func:`slot_buckets`): 1 reads the whole
    cache in every step."""
    fill_buckets: int = 0
    """Prompt lengths a one-row prefill is compiled for (:func:`fill_buckets`: 8, 16, 32 …; :class:`PromptFiller`);
    0: prompts are prefilled eagerly."""


def row_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a :class:`BatchDecoder` of ``max_batch`` rows compiles: the powers of two below it, and it."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return (*(1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch), max_batch)


def slot_buckets(max_len: int, count: int) -> tuple[int, ...]:
    """The key lengths a step is compiled for, ascending: ``max_len`` and ``count`` − 1 halvings of it (rounded up;
    fewer when they reach 1), e.g. (64, 128, 256) for 256 and 3. A step whose tokens end within the first s slots
    reads only those s: attention's cost grows with the slots it reads, and a batch of short requests uses few."""
    if count < 1:
        raise ValueError(f"slot_buckets must be >= 1, got {count}")
    return tuple(sorted({-(-max_len // (1 << i)) for i in range(count)}))


class BatchDecoder:
    """Static decoding steps for a batch whose rows come and go (a server's running batch) in one padded cache.

    Each step feeds the cache's first ``rows`` rows, padded with dummy rows up to the next of :func:`row_buckets`
    (their outputs are dropped; what they write lands in rows that are not running, whose slots a row placed there
    later overwrites). A row bucket of at least half the batch also reads only the first slots its tokens need:
    the fewest of :func:`slot_buckets` (``options.slot_buckets`` key lengths) that hold them, so a batch of short
    requests does not attend over the whole context; smaller buckets, whose steps cost little attention, read every
    slot. Every (rows, slots) pair is a :class:`StaticDecoder` over that part of the cache, so the step is traced
    once per pair; :meth:`warm_up` traces them all at once. The rows' tokens are the eager path's
    (``tests/test_static_decode.py``); the cache's ``length`` and padding are the caller's, as with the eager
    forward."""

    def __init__(self, model: KunlunBaize, cache: InferenceCache, options: CompileOptions = CompileOptions()) -> None:
        self.cache = cache
        self.buckets = row_buckets(cache.batch_size)
        if len(self.buckets) > MAX_BUCKETS:
            raise ValueError(f"a batch of {cache.batch_size} rows needs {len(self.buckets)} compiled steps, more "
                             f"than {MAX_BUCKETS}: use a max batch of at most {1 << (MAX_BUCKETS - 1)}")
        keys = slot_buckets(cache.max_len, options.slot_buckets)
        self.slot_buckets = {b: keys if 2 * b >= cache.batch_size else (cache.max_len,) for b in self.buckets}
        self.decoders = {(b, n): StaticDecoder(model, compile=options.compile, mode=options.mode,
                                               backend=options.backend, cache=cache.view(b, n))
                         for b, lengths in self.slot_buckets.items() for n in lengths}

    def bucket(self, rows: int) -> int:
        """The bucket that ``rows`` running rows are padded to."""
        if not 1 <= rows <= self.cache.batch_size:
            raise ValueError(f"{rows} rows do not fit a batch of {self.cache.batch_size}")
        return next(b for b in self.buckets if b >= rows)

    def slots(self, rows: int, end: int) -> int:
        """How many slots a step of ``rows`` rows whose tokens end before slot ``end`` reads."""
        if end > self.cache.max_len:
            raise CacheOverflowError(f"{end} tokens exceed this batch's context of {self.cache.max_len}")
        return next(n for n in self.slot_buckets[self.bucket(rows)] if n >= end)

    def step(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [rows, n, V] and final hidden states [rows, n, d] of ``ids`` [rows, n] fed to the first rows at
        slot ``cache.length`` on; the cache's ``length`` moves by n."""
        rows, n = ids.shape
        size = self.bucket(rows)
        if size > rows:
            ids = torch.cat([ids, ids.new_zeros(size - rows, n)])
        decoder = self.decoders[size, self.slots(rows, self.cache.length + n)]
        view = decoder.cache
        view.length, view.padded = self.cache.length, self.cache.padded
        logits, hidden = decoder.step(ids)
        self.cache.length = view.length
        return logits[:rows], hidden[:rows]

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Trace (compile) every bucket's one-token step now, in inference mode (step in it too: Dynamo guards on
        the grad mode); an empty cache stays empty."""
        if self.cache.length:
            raise ValueError("warm up a BatchDecoder before its cache holds tokens")
        for (size, _), decoder in self.decoders.items():
            decoder.cache.length = len(self.cache.mtp)  # the first slot the compiled step writes the MTP keys at
            decoder.step(torch.zeros(size, 1, dtype=torch.long, device=self.cache.valid.device))
        self.cache.valid.fill_(True)


def fill_buckets(max_len: int, count: int, smallest: int = 8) -> tuple[int, ...]:
    """The prompt lengths a :class:`PromptFiller` compiles, ascending: ``count`` doublings from ``smallest`` (8, 16,
    32 …), the last one cut to ``max_len`` (fewer when they reach it)."""
    if count < 0:
        raise ValueError(f"fill_buckets must be >= 0, got {count}")
    return tuple(sorted({min(smallest << i, max_len) for i in range(count)}))


class PromptFiller:
    """Prefill of one prompt through a one-row step compiled per prompt-length bucket (:func:`fill_buckets`).

    The prompt is right-padded up to its bucket and read from slot 0 of the bucket's part of one small cache
    (:func:`fill_step`): being causal, its slots and last logits are those of prefilling it alone, and the slots
    after it are dropped. So a short prompt costs one compiled forward instead of the eager forward's Python and
    dispatch work over every layer. Longer prompts than the largest bucket (and caches with MTP keys) are the
    caller's to prefill eagerly."""

    def __init__(self, model: KunlunBaize, lengths: tuple[int, ...], options: CompileOptions = CompileOptions()
                 ) -> None:
        if not lengths:
            raise ValueError("a PromptFiller needs at least one prompt length")
        self.lengths = tuple(sorted(lengths))
        self.cache = model.new_cache(1, self.lengths[-1], mtp=False)
        self.decoders = {n: StaticDecoder(model, compile=options.compile, mode=options.mode, backend=options.backend,
                                          cache=self.cache.view(1, n)) for n in self.lengths}

    def bucket(self, length: int) -> int | None:
        """The prompt length a prompt of ``length`` tokens is padded to; None when it is longer than every one."""
        return next((n for n in self.lengths if n >= length), None)

    def fill(self, prompt: list[int]) -> tuple[InferenceCache, torch.Tensor, torch.Tensor]:
        """Read ``prompt`` (at most the largest length) into a one-row cache of its bucket: that cache (``length``:
        the prompt's), the logits [1, V] and the final hidden state [1, 1, d] of its last position."""
        size = self.bucket(len(prompt))
        if size is None or not prompt:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit the prefill buckets {self.lengths}")
        decoder = self.decoders[size]
        device = self.cache.valid.device
        ids = torch.tensor([prompt + [0] * (size - len(prompt))], device=device)
        logits, hidden = decoder.fill(ids, torch.tensor([len(prompt) - 1], device=device))
        decoder.cache.length = len(prompt)
        return decoder.cache, logits[:, -1], hidden

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Trace (compile) every bucket's prefill now, in inference mode."""
        for n in self.lengths:
            self.fill([0] * n)
