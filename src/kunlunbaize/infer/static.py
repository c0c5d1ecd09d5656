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

import torch
import torch.nn.functional as F

from ..model import InferenceCache, KunlunBaize
from ..model.cache import CacheOverflowError
from ..model.model import ModelOutput


def trunk_step(model: KunlunBaize, cache: InferenceCache, ids: torch.Tensor,
               start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, n, V] and final hidden states [B, n, d] of ``ids`` [B, n] fed at slots ``start`` … start+n−1
    (a 0-d long tensor), writing the cache there (its ``length`` is left to the caller). The MTP depths' keys are
    written too when the cache holds them; this needs ``start`` ≥ mtp_depth."""
    n = ids.shape[1]
    slots = start + torch.arange(n, device=ids.device)
    key_slots = torch.arange(cache.max_len, device=ids.device)
    cache.valid.index_fill_(1, slots, True)
    # as KunlunBaizeTrunk._padding: rotary positions count a row's real tokens, keys are the real ones up to a query
    pads = (~cache.valid & (key_slots < start)).sum(-1, keepdim=True)
    positions = slots[None] - pads  # [B, n]
    mask = ((key_slots[None] <= slots[:, None])[None] & cache.valid[:, None, :])[:, None]  # [B, 1, n, max_len]
    emb = model.embed(ids)
    hidden = model.run_blocks(emb, model.rope(positions), start, cache, mask, None)
    if cache.mtp:  # depth j's key slot s holds t_{s+j} (as MultiTokenPrediction.write_keys)
        for j, (depth, kv) in enumerate(zip(model.mtp.depths, cache.mtp, strict=True), start=1):
            k, v = depth.cross_attn.project_kv(depth.embed_norm(emb), model.rope(positions - j))
            kv.write(start - j, k, v)
    return F.linear(model.norm(hidden), model.head_weight), hidden


_decoder_ids = itertools.count()


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
    """

    def __init__(self, model: KunlunBaize, batch_size: int = 1, max_len: int | None = None, mtp: bool = False,
                 compile: bool = True, mode: str | None = None, backend: str | Callable = "inductor",
                 options: dict | None = None) -> None:
        if mtp and model.mtp is None:
            raise ValueError("mtp=True needs a model with MTP depths (mtp_depth >= 1)")
        self.model = model
        self.cache = model.new_cache(batch_size, max_len, mtp=mtp)
        self._start = torch.zeros((), dtype=torch.long, device=model.embed.weight.device)
        self._clone = mode in ("reduce-overhead", "max-autotune")  # modes that replay CUDA graphs
        if compile:
            for t in [*self.cache.buffers(), self._start]:  # fixed addresses: CUDA graphs may replay them
                torch._dynamo.mark_static_address(t)
            self._step = torch.compile(_own_code(trunk_step, next(_decoder_ids)), fullgraph=True, dynamic=False,
                                       mode=mode, backend=backend, options=options)
        else:
            self._step = trunk_step

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

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        """Reset, then run the prompt ``ids`` [batch_size, T] eagerly into the cache (trunk logits only)."""
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"this decoder was made for batch {self.batch_size}, got {ids.shape[0]} prompts: make a "
                             f"StaticDecoder(model, batch_size={ids.shape[0]})")
        self.reset()
        return self.model(ids, cache=self.cache, attention_mask=attention_mask, mtp=False)

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
        logits, hidden = self._step(self.model, cache, ids, self._start)
        cache.length = end
        if self._clone:  # a CUDA graph's outputs are overwritten by its next replay
            logits, hidden = logits.clone(), hidden.clone()
        return logits, hidden
