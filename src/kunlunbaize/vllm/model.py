"""``KunlunBaizeForCausalLM`` written with vLLM's layers: serves a ``kunlun export --hf`` folder on vLLM.

The same network as :class:`kunlunbaize.model.KunlunBaize` (trunk and main head; the MTP depths are the draft
model of vLLM's ``mtp`` speculative decoding, :mod:`.mtp`), arranged for vLLM: tensor-parallel linear layers, vLLM's
``Attention`` with its paged KV cache for the self-attention and for every scale's cross-attention (keys/values from
the same positions' conv features, so an ordinary causal decoder attention with a KV cache of its own), vLLM's rotary
embedding and RMSNorm. The conv history lives in KV-cache pages too (:mod:`.conv_history`). The dense residual,
eSwish and the per-scale MLPs' gating are plain tensor code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from ..config import ModelConfig
from .conv_history import ConvHistory

STACKED = [  # (name in the export, fused vLLM parameter, shard)
    (".attn.wq.", ".attn.qkv.", "q"),
    (".attn.wk.", ".attn.qkv.", "k"),
    (".attn.wv.", ".attn.qkv.", "v"),
    (".gate.", ".gate_up.", 0),
    (".up.", ".gate_up.", 1),
]


class Shape:
    """One tensor-parallel rank's share of the heads (KV heads split, or replicated when fewer than ranks)."""

    def __init__(self, cfg: ModelConfig) -> None:
        tp = get_tensor_model_parallel_world_size()
        if cfg.n_heads % tp or (cfg.n_kv_heads % tp and tp % cfg.n_kv_heads):
            raise ValueError(f"{cfg.n_heads} heads / {cfg.n_kv_heads} KV heads do not split over "
                             f"tensor_parallel_size={tp}: choose a size that divides them")
        self.head_dim = cfg.head_dim
        self.n_heads = cfg.n_heads // tp
        self.n_kv_heads = max(1, cfg.n_kv_heads // tp)
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv_heads * self.head_dim


class ESwish(nn.Module):
    """eSwish(x) = x · σ(βx) (eq. 5); β a scalar, or per channel split over the tensor-parallel ranks when
    ``sharded``."""

    def __init__(self, channels: int, per_channel: bool, sharded: bool = False) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size() if sharded and per_channel else 1
        self.beta = nn.Parameter(torch.ones(channels // tp if per_channel else 1), requires_grad=False)
        self.beta.weight_loader = self._load  # type: ignore[attr-defined]
        self.tp = tp

    def _load(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        if self.tp > 1:
            loaded = loaded.chunk(self.tp)[get_tensor_model_parallel_rank()]
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta.to(x.dtype) * x)


def separate_projections(cfg: ModelConfig, quant_config: Any, prefix: str) -> tuple[ColumnParallelLinear, ...]:
    """Query, key and value projections of their own (wq, wk, wv), heads split over tensor-parallel ranks: the
    attentions whose keys and values come from other inputs than their queries."""
    head_dim = Shape(cfg).head_dim
    return tuple(ColumnParallelLinear(cfg.d_model, heads * head_dim, bias=False, quant_config=quant_config,
                                      prefix=f"{prefix}.{name}")
                 for name, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads), ("wv", cfg.n_kv_heads)))


class KBAttention(nn.Module):
    """Grouped-query attention with rotary positions: self-attention (fused ``qkv``) or the TransformerX
    cross-attention (``wq`` on the stream, ``wk``/``wv`` on a scale's conv features at the same positions)."""

    def __init__(self, cfg: ModelConfig, cache_config, quant_config, prefix: str, cross: bool,
                 attn_name: str) -> None:
        """``attn_name`` names the ``Attention`` layer for vLLM (its KV cache): one integer in it, the block's."""
        super().__init__()
        d, s = cfg.d_model, Shape(cfg)
        self.shape, self.cross = s, cross
        if cross:
            self.wq, self.wk, self.wv = separate_projections(cfg, quant_config, prefix)
        else:
            self.qkv = QKVParallelLinear(d, s.head_dim, cfg.n_heads, cfg.n_kv_heads, bias=False,
                                         quant_config=quant_config, prefix=f"{prefix}.qkv")
        self.wo = RowParallelLinear(cfg.n_heads * s.head_dim, d, bias=False, quant_config=quant_config,
                                    prefix=f"{prefix}.wo")
        self.rotary = get_rope(s.head_dim, max_position=cfg.max_seq_len, is_neox_style=True,
                               rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"})
        self.attn = Attention(s.n_heads, s.head_dim, s.head_dim ** -0.5, num_kv_heads=s.n_kv_heads,
                              cache_config=cache_config, quant_config=quant_config, prefix=attn_name)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_input: torch.Tensor | None = None) -> torch.Tensor:
        s = self.shape
        if self.cross:
            q, k, v = self.wq(x)[0], self.wk(kv_input)[0], self.wv(kv_input)[0]
        else:
            q, k, v = self.qkv(x)[0].split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q, k = self.rotary(positions, q, k)
        return self.wo(self.attn(q, k, v))[0]


class GatedMLP(nn.Module):
    """``down(act(gate x) · up x)``: eSwish (a TransformerX scale) or fixed SiLU (the plain block)."""

    def __init__(self, cfg: ModelConfig, hidden: int, eswish: bool, quant_config, prefix: str) -> None:
        super().__init__()
        self.gate_up = MergedColumnParallelLinear(cfg.d_model, [hidden] * 2, bias=False, quant_config=quant_config,
                                                  prefix=f"{prefix}.gate_up")
        self.down = RowParallelLinear(hidden, cfg.d_model, bias=False, quant_config=quant_config,
                                      prefix=f"{prefix}.down")
        self.act = ESwish(hidden, cfg.eswish_per_channel, sharded=True) if eswish else None
        self.silu_and_mul = None if eswish else SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)[0]
        if self.act is None:
            return self.down(self.silu_and_mul(gate_up))[0]
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(self.act(gate) * up)[0]


class Conv(nn.Module):
    """One scale's causal depthwise-separable convolution and eSwish, h = eSwish(PW(DW(c))) (eq. 6–8), over the
    windows of :class:`ConvHistory`."""

    def __init__(self, cfg: ModelConfig, kernel_size: int, quant_config, prefix: str) -> None:
        super().__init__()
        d = cfg.d_model
        self.kernel_size = kernel_size
        self.depthwise = nn.Conv1d(d, d, kernel_size, groups=d, bias=False)
        self.pointwise = ReplicatedLinear(d, d, bias=False, quant_config=quant_config, prefix=f"{prefix}.pointwise")
        self.act = ESwish(d, cfg.eswish_per_channel)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """``windows`` [N, W, d] (oldest first) → [N, d]."""
        k = self.kernel_size
        y = (windows[:, -k:] * self.depthwise.weight[:, 0].t()).sum(1)
        return self.act(self.pointwise(y)[0])


class TransformerXBlock(nn.Module):
    """Self-attention, multi-scale conv features, then per scale cross-attention + eSwish MLP; returns the sum of
    its residual branches (as :class:`kunlunbaize.model.block.TransformerXBlock`)."""

    def __init__(self, cfg: ModelConfig, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        d, eps, s = cfg.d_model, cfg.norm_eps, Shape(cfg)
        scales = range(len(cfg.conv_kernel_sizes))
        self.attn_norm = RMSNorm(d, eps=eps)
        self.attn = KBAttention(cfg, cache_config, quant_config, f"{prefix}.attn", False, f"{prefix}.attn.attn")
        self.conv_norm = RMSNorm(d, eps=eps)
        self.history = ConvHistory(d, max(cfg.conv_kernel_sizes), s.n_heads, s.n_kv_heads, s.head_dim,
                                   cache_config, f"{prefix}.conv_history_")
        self.convs = nn.ModuleList(Conv(cfg, k, quant_config, f"{prefix}.convs.{j}")
                                   for j, k in enumerate(cfg.conv_kernel_sizes))
        self.cross_norms = nn.ModuleList(RMSNorm(d, eps=eps) for _ in scales)
        self.cross_attns = nn.ModuleList(KBAttention(cfg, cache_config, quant_config, f"{prefix}.cross_attns.{j}",
                                                     True, f"{prefix}.cross_attn_scale_{j}") for j in scales)
        self.mlp_norms = nn.ModuleList(RMSNorm(d, eps=eps) for _ in scales)
        self.mlps = nn.ModuleList(GatedMLP(cfg, cfg.scale_hidden, True, quant_config, f"{prefix}.mlps.{j}")
                                  for j in scales)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        branches = self.attn(positions, self.attn_norm(x))
        x = x + branches
        windows = self.history.windows(self.conv_norm(x), positions)
        for j, conv in enumerate(self.convs):
            a = self.cross_attns[j](positions, self.cross_norms[j](x), conv(windows))
            x = x + a
            m = self.mlps[j](self.mlp_norms[j](x))
            x = x + m
            branches = branches + a + m
        return branches


class PlainBlock(nn.Module):
    """The Llama block (``transformerx=False``): self-attention and a SiLU-gated MLP; returns the branches' sum."""

    def __init__(self, cfg: ModelConfig, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = KBAttention(cfg, cache_config, quant_config, f"{prefix}.attn", False, f"{prefix}.attn.attn")
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = GatedMLP(cfg, cfg.ffn_hidden, False, quant_config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(positions, self.attn_norm(x))
        return a + self.mlp(self.mlp_norm(x + a))


class DenseResidual(nn.Module):
    """Learnable dense residual (eq. 1–2): layer l mixes H_0 … H_l with softmax(a_l)."""

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.logits = nn.ParameterList(nn.Parameter(torch.zeros(layer + 1), requires_grad=False)
                                       for layer in range(n_layers))

    def mix(self, layer: int, states: list[torch.Tensor]) -> torch.Tensor:
        w = torch.softmax(self.logits[layer].float(), dim=0).to(states[0].dtype)
        return (w @ torch.stack(states).view(len(states), -1)).view(states[0].shape)


class KunlunBaizeModel(nn.Module):
    """Embedding → blocks with dense residuals (or identity skips); the output norm is applied by
    :meth:`KunlunBaizeForCausalLM.compute_logits`."""

    def __init__(self, cfg: ModelConfig, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        block = TransformerXBlock if cfg.transformerx else PlainBlock
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, prefix=f"{prefix}.embed")
        self.blocks = nn.ModuleList(block(cfg, cache_config, quant_config, f"{prefix}.blocks.{i}")
                                    for i in range(cfg.n_layers))
        self.dense = DenseResidual(cfg.n_layers) if cfg.dense_residual else None
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    @property
    def embed_tokens(self) -> VocabParallelEmbedding:
        """The embedding under the name vLLM's speculative proposers look for (to share it with a draft)."""
        return self.embed

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The final hidden state H_L before the output norm (g^0 of the MTP depths)."""
        states = [h]
        for layer, block in enumerate(self.blocks):
            delta = block(positions, h)
            if self.dense is not None:
                h = delta + self.dense.mix(layer, states)
                states.append(h)
            else:
                h = h + delta
        return h


def check_kv_cache_dtype(cfg: ModelConfig, cache_dtype: str) -> None:
    """Refuse a quantized KV cache (``kv_cache_dtype="fp8"`` …) for a TransformerX model: its conv history lives in
    KV-cache pages (:mod:`.conv_history`) and must stay exact."""
    if cfg.transformerx and cache_dtype not in ("auto", "float32", "bfloat16", "float16", "half", "float"):
        raise ValueError(f"kv_cache_dtype={cache_dtype!r} is not supported by KunlunBaize on vLLM: its TransformerX "
                         "conv history is stored in the KV-cache pages and must stay exact; use kv_cache_dtype='auto'")


class KunlunBaizeForCausalLM(nn.Module):
    """vLLM's model class for ``architectures: ["KunlunBaizeForCausalLM"]`` (a ``kunlun export --hf`` folder)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf = vllm_config.model_config.hf_config
        cfg = hf.to_model_config()
        check_kv_cache_dtype(cfg, vllm_config.cache_config.cache_dtype)
        self.arch = cfg
        self.model = KunlunBaizeModel(cfg, vllm_config.cache_config, vllm_config.quant_config,
                                      f"{prefix}model" if not prefix else f"{prefix}.model")
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.d_model, prefix="lm_head")
        if cfg.tie_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed)
        self.logits_processor = LogitsProcessor(cfg.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if intermediate_tensors is not None:
            raise NotImplementedError("KunlunBaize on vLLM does not support pipeline parallelism")
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        return self.model(positions, h)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits of the final hidden states H_L (output norm, then the head)."""
        return self.logits_processor(self.lm_head, self.model.norm(hidden_states))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load an export's tensors (the MTP depths' are the draft model's, :mod:`.mtp`; a tied head shares the
        embedding)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("mtp.") or (self.arch.tie_embeddings and name.startswith("lm_head.")):
                continue
            for old, new, shard in STACKED:
                if old in name:
                    param = params[name.replace(old, new)]
                    param.weight_loader(param, tensor, shard)
                    loaded.add(name.replace(old, new))
                    break
            else:
                loaded.add(load_tensor(params, name, tensor, "KunlunBaize on vLLM"))
        return loaded


def load_tensor(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor, who: str) -> str:
    """Load ``tensor`` into the parameter ``name`` (its own weight loader, if it has one); a name ``who`` does
    not know is a ValueError saying to export again."""
    if name not in params:
        raise ValueError(f"the export holds a tensor {who} does not know ({name}): export it again with this "
                         "version of kunlunbaize")
    param = params[name]
    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
    return name
