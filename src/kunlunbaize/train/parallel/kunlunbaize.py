"""Tensor + sequence parallelism for :class:`~kunlunbaize.model.KunlunBaize` (the spec's ``parallelize`` hook).

The plan is applied from outside the model with ``parallelize_module`` (torchtitan's ``parallelize.py``); the model
code stays single-device. Between modules the residual stream is a plain tensor sharded on the sequence
(``[B, T/tp, d]``, Megatron's sequence parallelism):

- every RMSNorm runs on its sequence shard (``SequenceParallel``); the module after it gathers the sequence;
- attention (self, each per-scale cross-attention, each MTP depth's): heads split (``wq``/``wk``/``wv`` colwise,
  ``wo`` rowwise, reduce-scattered back onto the sequence); GQA KV heads are split, so ``n_kv_heads`` must be
  divisible by tp;
- SwiGLU / eSwish MLPs: ``gate``/``up`` colwise, ``down`` rowwise; eSwish's per-channel β sharded with the channels;
- causal depthwise-separable convolutions: the input gathered over the whole sequence (so the k−1 history across
  sequence shards is exact), the depthwise kernel run in full on every rank (replicated: d·k weights, T·d·k
  FLOPs), the pointwise linear colwise, eSwish on the channel shard; the cross-attention gathers the channels;
- the embedding vocabulary-parallel (rowwise, output reduce-scattered onto the sequence, the collective waited on
  before the blocks see it: an asynchronous collective's output entering a compiled block lost its gradient);
- the MTP depths gather the hidden state and the embeddings over the sequence and run on the whole sequence (their
  shift is by whole tokens of it), heads still split, norms replicated;
- dense-residual logits replicated, each rank mixing its own sequence shard; their gradients are summed;
- output heads (main, per-depth or tied) vocabulary-parallel: logits ``[B, T, V/tp]`` per rank, never gathered,
  and the cross-entropy computed by ``loss_parallel`` (so the training forward gives logits: ``logits=True``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from ...model import KunlunBaize
from ...model.block import PlainBlock, TransformerXBlock
from .styles import (
    ChannelShardedESwish,
    GatheredSequenceParallel,
    PartialGradOutput,
    ReplicateCompute,
    ShardedWeight,
    WaitedRowwiseParallel,
)

ATTENTION_ARGS = 8  # x, kv_input, rope_q, rope_k, q_start, kv_start, cache, mask
MTP_ARGS = 8  # hidden, token_emb, rope, head_weight, start, caches, positions, mask


def parallelize(model: nn.Module, mesh: DeviceMesh, tp_dim: str = "tp") -> dict[str, Any]:
    """Apply tensor + sequence parallelism over ``mesh[tp_dim]`` to ``model`` in place; return the keyword
    arguments of its training forward under this plan (the vocabulary-parallel loss needs the logits)."""
    if not isinstance(model, KunlunBaize):
        raise TypeError(f"this plan parallelises KunlunBaize, not {type(model).__name__}")
    tp = mesh[tp_dim] if mesh.mesh_dim_names and len(mesh.mesh_dim_names) > 1 else mesh
    size = tp.size()
    parallelize_module(model, tp, {
        # waited: the embedding's output is the first (possibly compiled) block's input
        "embed": WaitedRowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": GatheredSequenceParallel(),
    })
    if model.head is not None:
        parallelize_module(model.head, tp, ShardedWeight())
    if model.dense is not None:
        parallelize_module(model.dense, tp, PartialGradOutput())
    for block in model.blocks:
        _block(block, tp, size)
    if model.mtp is not None:
        _mtp(model.mtp, tp, size)
    plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise RuntimeError(f"the tensor-parallel plan misses parameters {', '.join(plain)}: add them to "
                           f"{__name__}")
    return {}


SEQUENCE = Shard(1)  # [B, T, d] sharded on the sequence: the residual stream between modules


def _attention(attn: nn.Module, tp: DeviceMesh, size: int, kv_layout: Any, q_layout: Any = SEQUENCE,
               out_layout: Any = SEQUENCE) -> None:
    """Heads split over the ranks; the query input gathered from ``q_layout``, the key/value input from
    ``kv_layout`` (Shard(1): a sequence shard, Shard(2): a channel shard, Replicate: already whole); the output
    reduced onto ``out_layout``."""
    rest = (None,) * (ATTENTION_ARGS - 2)
    parallelize_module(attn, tp, {
        "": PrepareModuleInput(input_layouts=(q_layout, kv_layout, *rest),
                               desired_input_layouts=(Replicate(), Replicate(), *rest), use_local_output=True),
        "wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(),
        "wo": RowwiseParallel(output_layouts=out_layout),
    })
    attn.n_heads //= size
    attn.n_kv_heads //= size


def _mlp(mlp: nn.Module, tp: DeviceMesh) -> None:
    plan = {
        "": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                               use_local_output=True),
        "gate": ColwiseParallel(), "up": ColwiseParallel(), "down": RowwiseParallel(output_layouts=Shard(1)),
    }
    if any(True for _ in mlp.act.parameters()):
        plan["act"] = ChannelShardedESwish()
    parallelize_module(mlp, tp, plan)


def _block(block: nn.Module, tp: DeviceMesh, size: int) -> None:
    parallelize_module(block, tp, {"attn_norm": SequenceParallel()})
    _attention(block.attn, tp, size, Shard(1))
    if isinstance(block, PlainBlock):
        parallelize_module(block, tp, {"mlp_norm": SequenceParallel()})
        _mlp(block.mlp, tp)
        return
    if not isinstance(block, TransformerXBlock):
        raise TypeError(f"no tensor-parallel plan for the block {type(block).__name__}")
    parallelize_module(block, tp, {"conv_norm": SequenceParallel()})
    for conv in block.convs:
        parallelize_module(conv, tp, {
            "": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None),
                                   use_local_output=True),
            "depthwise": ReplicateCompute(), "pointwise": ColwiseParallel(), "act": ChannelShardedESwish(),
        })
    for norm in (*block.cross_norms, *block.mlp_norms):
        parallelize_module(norm, tp, SequenceParallel())
    for attn in block.cross_attns:
        _attention(attn, tp, size, Shard(2))  # its keys and values come from a convolution's channel shard
    for mlp in block.mlps:
        _mlp(mlp, tp)


def _mtp(mtp: nn.Module, tp: DeviceMesh, size: int) -> None:
    """The depths run on the whole sequence on every rank (their shift is by whole tokens and their query count is
    the input's length), heads still split: hidden state and embeddings are gathered once, attention outputs are
    all-reduced instead of reduce-scattered."""
    rest = (None,) * (MTP_ARGS - 2)
    parallelize_module(mtp, tp, PrepareModuleInput(input_layouts=(Shard(1), Shard(1), *rest),
                                                   desired_input_layouts=(Replicate(), Replicate(), *rest),
                                                   use_local_output=True))
    for depth in mtp.depths:
        parallelize_module(depth, tp, {"hidden_norm": ReplicateCompute(), "embed_norm": ReplicateCompute(),
                                       "out_norm": ReplicateCompute(keep_dtensor=True)})
        _attention(depth.cross_attn, tp, size, Replicate(), q_layout=Replicate(), out_layout=Replicate())
        if depth.head is not None:
            parallelize_module(depth.head, tp, ShardedWeight())
