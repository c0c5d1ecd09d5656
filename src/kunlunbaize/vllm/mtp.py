"""``KunlunBaizeMTPModel``: the MTP depths of a ``kunlun export --hf`` folder as vLLM's ``mtp`` draft module.

vLLM's ``mtp`` proposer (its EAGLE proposer) runs the draft over a *stream*: at position q it feeds the target's
hidden state at q and the token t_{q+1}; the first pass covers every token the target just processed, and draft
step i ≥ 2 feeds one token per request, the previous draft, at the next position, with the previous step's output
as hidden state. KunlunBaize's depth j (:mod:`kunlunbaize.model.mtp`) reads g^{j−1} at the last position n−1 and
attends to key slots s ≤ n−1 holding E(t_{s+j}) at rotary position s. Mapped onto the stream:

* g^0 is the trunk's final hidden state *before* the output norm: ``KunlunBaizeForCausalLM.forward`` returns it
  (its ``compute_logits`` applies the norm);
* depth 1 is step 1: its key slot s is stream position s, so it is an ordinary causal decoder attention over the
  stream (vLLM's ``Attention``, its own KV cache);
* depth j ≥ 2 is step j, queried at stream position n−1+(j−1) with g^{j−1}; its key slot s is stream position
  s + j − 1 and holds the same stream token, so its keys are the stream's, rotated at position − (j − 1) (queries
  too: the same relative positions as the project's). The stream positions 0 … j−2 are *not* keys of depth j, which
  a causal attention kernel cannot leave out, so these depths keep their keys and values in a
  :class:`~.paged.PagedStore` written on every draft forward, and attend over exactly slots j−1 … by hand (one
  query per request, the draft steps' shape).

The depths have no convolutions: no conv history. Embedding and (shared) output head are the target's; vLLM's
proposer hands them over after loading (``model.embed_tokens``, ``lm_head``). vLLM's generic proposer does not pass
the draft step to the model, so :meth:`KunlunBaizeMTP.start_round` (called by the plugin's hook at each proposal's
first pass) restarts a step counter that picks the depth; ``spec_step_idx``, where a proposer passes it, wins.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from ..config import ModelConfig
from .model import KBAttention, Shape, load_tensor, separate_projections
from .paged import PagedStore
from .plugin import start_draft_rounds


class PagedCrossAttention(nn.Module):
    """Depth j ≥ 2's cross-attention C_j (eq. 18–19): keys/values of the stream tokens in a paged store, rotated at
    stream position − ``shift``; one query per token attends to stream positions ``shift`` … its own."""

    def __init__(self, cfg: ModelConfig, shift: int, cache_config, quant_config, prefix: str, layer: int) -> None:
        super().__init__()
        d, s = cfg.d_model, Shape(cfg)
        self.shape, self.shift = s, shift
        self.wq, self.wk, self.wv = separate_projections(cfg, quant_config, prefix)
        self.wo = RowParallelLinear(cfg.n_heads * s.head_dim, d, bias=False, quant_config=quant_config,
                                    prefix=f"{prefix}.wo")
        self.rotary = get_rope(s.head_dim, max_position=cfg.max_seq_len, is_neox_style=True,
                               rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"})
        self.keys = PagedStore(2 * s.kv_size, s.n_heads, s.n_kv_heads, s.head_dim, cache_config,
                               f"mtp.{layer}.keys_")

    def _rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.rotary((positions - self.shift).clamp_min(0), x.clone(), None)[0]

    def write(self, positions: torch.Tensor, kv_input: torch.Tensor) -> None:
        """Store the keys/values of ``kv_input`` [N, d] (the depth's normed embeddings of the stream tokens)."""
        step = self.keys.step(positions)
        if step is None:
            return
        k = self._rotate(positions, self.wk(kv_input)[0])
        self.keys.write(step, torch.cat([k, self.wv(kv_input)[0]], dim=-1))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Attend from ``x`` [N, d] at stream ``positions`` to the stored keys at stream positions shift … own."""
        s = self.shape
        step = self.keys.step(positions)
        if step is None:  # a profiling run: no pages
            return torch.zeros_like(x)
        q = self._rotate(positions, self.wq(x)[0])[:step.n].view(step.n, s.n_heads, 1, s.head_dim)
        width = int(step.positions.max()) - self.shift + 1
        want = self.shift + torch.arange(max(width, 1), device=x.device)[None, :].expand(step.n, -1)
        valid = want <= step.positions[:, None]
        kv = self.keys.read(step, torch.minimum(want, step.positions[:, None])).to(q.dtype)
        k, v = (t.view(step.n, -1, s.n_kv_heads, s.head_dim).transpose(1, 2) for t in kv.split(s.kv_size, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :],
                                             enable_gqa=s.n_kv_heads != s.n_heads)
        full = x.new_zeros(x.shape[0], s.q_size)
        full[:step.n] = out.reshape(step.n, s.q_size)
        return self.wo(full)[0]


class MTPDepth(nn.Module):
    """Depth j: g^j = g^{j−1} + C_j(hidden_norm(g^{j−1}), embed_norm(E(t))); logits O_j(out_norm(g^j))."""

    def __init__(self, cfg: ModelConfig, j: int, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        d, eps, layer = cfg.d_model, cfg.norm_eps, cfg.n_layers + j - 1  # vLLM wants one layer index per layer
        self.j = j
        self.hidden_norm = RMSNorm(d, eps=eps)
        self.embed_norm = RMSNorm(d, eps=eps)
        self.cross_attn: nn.Module = (
            KBAttention(cfg, cache_config, quant_config, f"{prefix}.cross_attn", True, f"mtp.{layer}.cross_attn")
            if j == 1 else PagedCrossAttention(cfg, j - 1, cache_config, quant_config, f"{prefix}.cross_attn", layer))
        self.out_norm = RMSNorm(d, eps=eps)
        self.head = (None if cfg.mtp_share_head
                     else ParallelLMHead(cfg.vocab_size, d, quant_config=quant_config, prefix=f"{prefix}.head"))

    def forward(self, positions: torch.Tensor, g: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.j == 1:
            return g + self.cross_attn(positions, self.hidden_norm(g), self.embed_norm(emb))
        return g + self.cross_attn(positions, self.hidden_norm(g))


class MTPDepths(nn.Module):
    """The depths (``model.depths``); vLLM's proposer sets ``embed_tokens`` to the target's embedding."""

    def __init__(self, cfg: ModelConfig, n: int, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        self.depths = nn.ModuleList(MTPDepth(cfg, j, cache_config, quant_config, f"{prefix}.depths.{j - 1}")
                                    for j in range(1, n + 1))


class KunlunBaizeMTP(nn.Module):
    """vLLM's draft model for ``speculative_config={"method": "mtp"}`` on a KunlunBaize export (architecture
    ``KunlunBaizeMTPModel``, routed by :mod:`.plugin`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        cfg = vllm_config.speculative_config.draft_model_config.hf_config.to_model_config()
        k = vllm_config.speculative_config.num_speculative_tokens
        if not 1 <= k <= cfg.mtp_depth:
            raise ValueError(f"num_speculative_tokens={k} with a KunlunBaize export of mtp_depth={cfg.mtp_depth}: "
                             f"its MTP depths draft 1 … {cfg.mtp_depth} tokens, choose num_speculative_tokens in that "
                             "range")
        self.arch, self.n_depths = cfg, k
        self.model = MTPDepths(cfg, k, vllm_config.cache_config, vllm_config.quant_config,
                               f"{prefix}.model" if prefix else "model")
        self.logits_processor = LogitsProcessor(cfg.vocab_size)
        self._step = 0  # the draft step of the next forward (0-based)
        self._last_depth = 1  # the depth of the last forward, whose output compute_logits reads
        start_draft_rounds()

    def start_round(self) -> None:
        """A proposal starts: the next forward is draft step 1 (depth 1)."""
        self._step = 0

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, hidden_states: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None,
                spec_step_idx: int | None = None) -> torch.Tensor:
        """g^j [N, d] of this draft step's depth j for the stream tokens ``input_ids`` at ``positions`` and
        ``hidden_states`` = g^{j−1}; every depth ≥ 2 stores the tokens' keys/values on the way."""
        step = self._step if spec_step_idx is None else spec_step_idx
        self._step = step + 1
        depth = self.model.depths[step % self.n_depths]
        emb = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for other in self.model.depths[1:]:
            other.cross_attn.write(positions, other.embed_norm(emb))
        self._last_depth = depth.j
        return depth(positions, hidden_states, emb)

    def compute_logits(self, hidden_states: torch.Tensor, spec_step_idx: int | None = None) -> torch.Tensor | None:
        """O_j(out_norm_j(g^j)) (eq. 21) of the last forward's depth j (or of step ``spec_step_idx``)."""
        j = self._last_depth if spec_step_idx is None else spec_step_idx % self.n_depths + 1
        depth = self.model.depths[j - 1]
        head = depth.head if depth.head is not None else self.lm_head
        return self.logits_processor(head, depth.out_norm(hidden_states))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the export's ``mtp.depths.*`` tensors of the depths in use; the trunk's are the target's."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if not name.startswith("mtp.depths."):
                continue
            if int(name.split(".")[2]) >= self.n_depths:
                continue
            loaded.add(load_tensor(params, "model." + name.removeprefix("mtp."), tensor,
                                   "KunlunBaize's MTP draft on vLLM"))
        return loaded
