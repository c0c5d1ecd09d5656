"""Context parallelism for :class:`~kunlunbaize.model.KunlunBaize` (the spec's ``context_parallel`` hook): every
sequence split over the ranks of ``mesh["cp"]``, exact, with ``torch.distributed`` collectives that carry autograd
(an all-gather of its own, ``torch.distributed.nn.functional.all_reduce``), so it runs on CPUs with gloo, where
PyTorch's own ``context_parallel`` has no kernels.

Applied from outside the model, as the tensor-parallel plan is: the forwards of the attention modules, the causal
convolutions and the model itself are replaced on the instances (gpt-fast's way); the model code is unchanged.

- split: the T tokens form 2N chunks of C = T/2N; cp rank r holds chunks r and 2N−1−r (torchtitan's and Megatron's
  load balance: under the causal mask every rank then does the same attention work);
- positions: rotary tables by global position;
- attention (self, every per-scale cross-attention, every MTP depth's): queries local, keys and values (rotated)
  all-gathered in one collective and put in global order, the causal mask by global position; GQA as in one process;
- causal convolutions: each chunk gets its k−1-token halo (the inputs before it) from one small all-gather of
  every chunk's last min(k−1, C) inputs, and one call runs both (halo, chunk) pairs;
- dense residual, norms, MLPs: per position, local;
- MTP: depth j's key slot s holds E(t_{s+j}); every rank has the whole sequence's token ids (the data loader gives
  it), so each embeds the tokens of its own slots and the keys are gathered as above (slots s ≥ T−j masked);
- loss: each head's cross-entropy summed over the rank's targets (label t_{i+j+1} of its global positions) and
  all-reduced with the target count, so every rank returns the exact global mean. The sum's all-reduce carries
  autograd: each rank's gradients are N times its share, and averaging them over the cp ranks (FSDP2 shards over
  ``dp_shard × cp``) gives the one-process gradient;
- packed documents (``document_ids``, ``--doc-mask``): every rank has the whole sequences' ids, so it builds their
  :class:`~kunlunbaize.model.documents.Documents` and takes its own tokens' rows of what one process's
  packed-document forward uses: the rotary tables at positions within each document, the attention mask [B, 1, 2C,
  T] against the gathered keys by global position, each token's position in its document for the convolutions
  (a halo's taps before the token's document start read zeros), MTP depth j's mask and kept queries, and the
  targets in another document ignored.

Under tensor parallelism (the model's plan applied first) the cp split is outer: sequence parallelism shards each
cp rank's part, the plan's modules gather it over ``tp`` before these forwards run on their tp-local heads and
channels, the MTP depths gather it themselves, and each head's sum comes from vocabulary-parallel logits through
``loss_parallel``. Under pipeline parallelism the stages call :func:`loss_terms` and :meth:`ContextGroup.rope`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.nn.functional import all_reduce
from torch.distributed.tensor import DTensor, Replicate, Shard

from ...model import KunlunBaize
from ...model.attention import Attention
from ...model.documents import Documents
from ...model.fused_loss import linear_cross_entropy
from ...model.layers import CausalDSConv, apply_rotary
from ...model.loss import IGNORE_INDEX, LossTerms
from ...model.model import ModelOutput

Rope = tuple[torch.Tensor, torch.Tensor]


class _AllGather(torch.autograd.Function):
    """Every rank's ``part`` stacked [N, …]; backward: each rank gets the sum over ranks of its slice's gradient (a
    reduce-scatter of the flattened gradients, the shape gloo's and NCCL's both take).
    ``torch.distributed.nn.functional.all_gather``'s gloo backward passes group ranks as global ones to ``scatter``
    and fails on a sub-group such as ``cp`` under ``dp_shard × cp``."""

    @staticmethod
    def forward(ctx, part: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, part.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.new_empty(grad[0].numel())
        dist.reduce_scatter_tensor(out, grad.contiguous().view(-1), group=ctx.group)
        return out.view(grad.shape[1:]), None


@dataclass(frozen=True)
class ContextGroup:
    """This process's context-parallel group: its process group, its rank in it and the number of ranks."""

    group: Any
    rank: int
    size: int

    @classmethod
    def of(cls, mesh: DeviceMesh, dim: str = "cp") -> ContextGroup:
        sub = mesh[dim] if mesh.mesh_dim_names and len(mesh.mesh_dim_names) > 1 else mesh
        return cls(sub.get_group(), sub.get_local_rank(), sub.size())

    def chunks(self) -> tuple[int, int]:
        """The two of the 2N chunks this rank holds: r and 2N−1−r."""
        return self.rank, 2 * self.size - 1 - self.rank

    def chunk_len(self, seq_len: int) -> int:
        if seq_len % (2 * self.size):
            raise ValueError(f"context parallelism over {self.size} ranks needs a sequence length divisible by "
                             f"{2 * self.size}, got {seq_len}")
        return seq_len // (2 * self.size)

    def positions(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """The global positions [2C] of this rank's tokens in a sequence of ``seq_len``."""
        c = self.chunk_len(seq_len)
        a, b = self.chunks()
        return torch.cat((torch.arange(a * c, (a + 1) * c, device=device),
                          torch.arange(b * c, (b + 1) * c, device=device)))

    def rope(self, rope: Any, seq_len: int, documents: Documents | None = None) -> Rope:
        """The rotary tables of this rank's tokens (``rope``: the model's :class:`RotaryEmbedding`); with
        ``documents`` (the whole sequences' packed documents) at their positions within their documents, as one
        process's packed-document forward gives them ([B, 2C, head_dim])."""
        pos = self.positions(seq_len, rope.inv_freq.device)
        if documents is None:
            return rope(pos, seq_len)
        return rope(documents.positions.to(pos.device)[:, pos], documents.rope_length(rope))

    def block_inputs(self, rope: Any, seq_len: int,
                     documents: Documents | None = None) -> tuple[Rope, torch.Tensor | None, torch.Tensor | None]:
        """What this rank's blocks take besides the residual stream: the rotary tables (:meth:`rope`) and, with
        ``documents``, this rank's rows of the documents' mask and its tokens' positions within their documents
        (None, None without)."""
        tables = self.rope(rope, seq_len, documents)
        if documents is None:
            return tables, None, None
        pos = self.positions(seq_len, documents.positions.device)
        return tables, documents.rows_mask(pos), documents.positions[:, pos]

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part [B, 2C, …] of a whole sequence ``x`` [B, T, …]: its two chunks, in order."""
        return x.index_select(1, self.positions(x.shape[1], x.device))

    def gather(self, part: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole sequence, in global order along ``dim``, from every rank's ``part`` (its two chunks along
        ``dim``); the gradient of each part flows back to its rank."""
        parts = _AllGather.apply(part, self.group)
        chunks: list[torch.Tensor] = [part] * (2 * self.size)
        for r, p in enumerate(parts):
            chunks[r], chunks[2 * self.size - 1 - r] = p.chunk(2, dim)
        return torch.cat(chunks, dim)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (autograd: the gradient is summed too)."""
        return all_reduce(t, group=self.group)


def context_parallel(model: nn.Module, mesh: DeviceMesh, cp_dim: str = "cp") -> None:
    """Split every sequence of ``model``'s training forward over ``mesh[cp_dim]`` (in place)."""
    if not isinstance(model, KunlunBaize):
        raise TypeError(f"this plan splits KunlunBaize's sequences, not {type(model).__name__}'s")
    cp = ContextGroup.of(mesh, cp_dim)
    for module in model.modules():
        if isinstance(module, Attention):
            module.forward = partial(attention_forward, module, cp)
        elif isinstance(module, CausalDSConv):
            module.forward = partial(conv_forward, module, module.forward, cp)
    model.forward = partial(training_forward, model, cp)


def attention_forward(attn: Attention, cp: ContextGroup, x: torch.Tensor, kv_input: torch.Tensor, rope_q: Rope,
                      rope_k: Rope, q_start: int = 0, kv_start: int = 0, cache: Any = None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """:meth:`Attention.forward` for a rank's part of the sequence: its queries against the keys and values of the
    whole sequence. ``mask`` [2C, T] (True: may attend) replaces the causal mask by global position."""
    if cache is not None or q_start or kv_start:
        raise ValueError("context parallelism splits a training forward: no cache and no position offset")
    B, n, _ = x.shape
    q = apply_rotary(attn.wq(x).view(B, n, attn.n_heads, attn.head_dim).transpose(1, 2), *rope_q)
    k, v = attn.project_kv(kv_input, rope_k)
    k, v = cp.gather(torch.cat((k, v), dim=1), dim=2).split(attn.n_kv_heads, dim=1)  # [B, Hkv, T, hd] each
    if mask is None:
        pos = cp.positions(k.shape[2], x.device)
        mask = torch.arange(k.shape[2], device=x.device)[None, :] <= pos[:, None]
    out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                         enable_gqa=attn.n_kv_heads != attn.n_heads)
    return attn.wo(out.transpose(1, 2).reshape(B, n, attn.n_heads * attn.head_dim))


def conv_forward(conv: CausalDSConv, forward: Any, cp: ContextGroup, x: torch.Tensor,
                 history: torch.Tensor | None = None, doc_positions: torch.Tensor | None = None) -> torch.Tensor:
    """:meth:`CausalDSConv.forward` (``forward``) on a rank's two chunks, each preceded by the k−1 inputs before it,
    wherever they live (zeros before the sequence start): every chunk's last min(k−1, C) inputs are all-gathered
    (one small collective), a chunk's halo is the last k−1 of those before it (several chunks when C < k−1), and
    one call runs ``[halo, chunk, halo, chunk]``, the halos' outputs dropped. ``doc_positions`` [B, 2C] (packed
    documents): the positions of the rank's tokens within their documents; a chunk token's taps reach into its
    halo only within its document."""
    if history is not None:
        raise ValueError("context parallelism splits a training forward: no convolution history")
    h = conv.kernel_size - 1
    if h == 0:
        return forward(x) if doc_positions is None else forward(x, doc_positions=doc_positions)
    first, second = x.chunk(2, dim=1)
    c = first.shape[1]
    tail = min(h, c)
    tails = cp.gather(torch.cat((first[:, -tail:], second[:, -tail:]), dim=1), dim=1)  # chunk g's: g·tail …

    def halo(chunk: int) -> torch.Tensor:
        before = tails[:, max(0, chunk * tail - h):chunk * tail]
        return F.pad(before, (0, 0, h - before.shape[1], 0))  # zeros before the sequence start

    a, b = cp.chunks()
    run = torch.cat((halo(a), first, halo(b), second), dim=1)
    if doc_positions is None:
        out = forward(run)
    else:  # the halos' own positions do not matter: their outputs are dropped
        pos_a, pos_b = doc_positions.chunk(2, dim=1)
        lead = pos_a.new_zeros(pos_a.shape[0], h)
        out = forward(run, doc_positions=torch.cat((lead, pos_a, lead, pos_b), dim=1))
    return torch.cat((out[:, h:h + c], out[:, 2 * h + c:]), dim=1)


def training_forward(model: KunlunBaize, cp: ContextGroup, input_ids: torch.Tensor,
                     labels: torch.Tensor | None = None, cache: Any = None,
                     attention_mask: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                     mtp: bool = True, logits: bool = False,
                     document_ids: torch.Tensor | None = None) -> ModelOutput:
    """:meth:`KunlunBaize.forward`'s joint loss (eq. 22) of whole sequences ``input_ids`` [B, T] (every cp rank
    gives the same), computed on this rank's part; the losses are the global means, the same on every rank. Under
    tensor parallelism too (the model's plan applied first): the trunk's residual stream is then this rank's part
    sharded again over ``tp`` (:func:`_tensor_parallel_mesh`). ``document_ids`` [B, T] (the whole sequences'; packed
    documents, ``--doc-mask``): every document computed as if alone, as one process's forward does."""
    if labels is None or cache is not None or attention_mask is not None or not mtp:
        raise ValueError("under context parallelism the model computes the training loss only: give labels, and no "
                         "cache, attention_mask or mtp=False")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
    if document_ids is not None and document_ids.shape != input_ids.shape:
        raise ValueError(f"document_ids must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(document_ids.shape)}")
    model._check_input(input_ids, 0, None)
    T = input_ids.shape[1]
    docs = None if document_ids is None else Documents(document_ids.to(input_ids.device))
    rope, mask, doc_positions = cp.block_inputs(model.rope, T, docs)
    hidden = model.run_blocks(model.embed(cp.shard(input_ids)), rope, 0, None, mask, None, None, doc_positions)
    terms = loss_terms(model, cp, hidden, input_ids, labels, ignore_index, docs)
    return ModelOutput(logits=None, hidden=hidden, loss=terms.total, main_loss=terms.main, mtp_losses=terms.mtp)


def loss_terms(model: Any, cp: ContextGroup, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
               ignore_index: int = IGNORE_INDEX, documents: Documents | None = None) -> LossTerms:
    """The joint loss's terms (eq. 22–23), each the global mean over every cp rank's targets, from this rank's
    part of H_L (``hidden``) and the whole sequences' ids and labels. ``model`` has the heads: a
    :class:`KunlunBaize`, or the last pipeline stage (``norm``, ``head_weight``, ``mtp``, ``embed``, ``rope``).
    ``documents`` (the whole sequences' packed documents): the MTP depths read only their query's document and
    the targets in another document are ignored, as in one process."""
    T = input_ids.shape[1]
    pos = cp.positions(T, input_ids.device)
    heads = [(model.norm(hidden), model.head_weight)]
    if model.mtp is not None:
        heads += _mtp_heads(model, hidden, input_ids, pos, cp.rope(model.rope, T, documents), documents)

    def targets(shift: int) -> torch.Tensor:
        kept = labels if documents is None else documents.labels(labels, shift, ignore_index)
        return _targets(kept, pos, shift, ignore_index)

    means = _global_means(cp, heads, [targets(j + 1) for j in range(len(heads))], ignore_index)
    return LossTerms.joint(means[0], list(means[1:]), model.config.gammas)


def _tensor_parallel_mesh(model: Any) -> DeviceMesh | None:
    """The ``tp`` mesh when the model's tensor-parallel plan was applied (its head is vocabulary-parallel), else
    None. Under it the trunk's residual stream is sequence-sharded within this cp rank's part (the cp split is
    outer, Megatron's sequence parallelism inner), its heads are sharded on the vocabulary and every module that
    needs the whole part (attention, convolutions, MLPs, the MTP depths) gathers it over ``tp`` first."""
    weight = model.head_weight
    return weight.device_mesh if isinstance(weight, DTensor) else None


def _whole_part(t: torch.Tensor, tp: DeviceMesh | None) -> torch.Tensor:
    """This cp rank's whole part [B, 2C, …] of a tensor sequence-sharded over ``tp`` (autograd: the gradient of the
    replicated computation after it is sliced back)."""
    if tp is None:
        return t
    return DTensor.from_local(t, tp, [Shard(1)], run_check=False).redistribute(tp, [Replicate()]).to_local()


def _mtp_heads(model: Any, hidden: torch.Tensor, input_ids: torch.Tensor, pos: torch.Tensor, rope: Rope,
               documents: Documents | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every MTP depth's head (input, weight) at this rank's positions (:meth:`MultiTokenPrediction.head_inputs`):
    depth j's key slot s holds E(t_{s+j}), embedded here from the whole sequence's ids for this rank's slots. Under
    tensor parallelism the depths run on this rank's whole part, as the plan runs them on the whole sequence. With
    ``documents`` each query reads only the slots of its document and a query with none adds nothing
    (:meth:`Documents.mtp_mask`)."""
    T = input_ids.shape[1]
    tp = _tensor_parallel_mesh(model)
    slots = torch.arange(T, device=pos.device)
    g, out = _whole_part(hidden, tp), []
    for j, depth in enumerate(model.mtp.depths, start=1):
        if j < T:  # else no slot exists: no update, as in one process
            emb = _whole_part(model.embed(input_ids[:, (pos + j).clamp(max=T - 1)]), tp)
            if documents is None:
                mask, keep = (slots[None, :] <= pos[:, None]) & (slots < T - j)[None, :], None
            else:  # [B, 1, 2C, T − j] over the slots that hold a token, padded with the j that hold none
                mask, keep = documents.mtp_mask(j, pos)
                mask = F.pad(mask, (0, j), value=False)
            update = depth.cross_attn(depth.hidden_norm(g), depth.embed_norm(emb), rope, rope, 0, 0, None, mask)
            g = g + (update if keep is None else update * keep.to(update.dtype))
        out.append(model.mtp.head_input(j, g, model.head_weight))
    return out


def _targets(labels: torch.Tensor, pos: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """The labels [B, 2C] that the positions ``pos`` predict with a head of ``shift``: t_{p+shift}, ignored past
    the end of the sequence."""
    T = labels.shape[1]
    idx = pos + shift
    return labels[:, idx.clamp(max=T - 1)].masked_fill(~(idx < T)[None, :], ignore_index)


def _global_means(cp: ContextGroup, heads: list[tuple[torch.Tensor, torch.Tensor]], targets: list[torch.Tensor],
                  ignore_index: int) -> torch.Tensor:
    """Each head's mean cross-entropy over the targets of every cp rank: local sums and counts all-reduced."""
    sums, counts = [], []
    for (h, w), t in zip(heads, targets, strict=True):
        sums.append(_local_sum(h, w, t, ignore_index))
        counts.append((t != ignore_index).sum())
    n = torch.stack(counts).float()
    dist.all_reduce(n, group=cp.group)
    return cp.sum(torch.stack(sums)) / n.clamp(min=1)


def _local_sum(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The summed cross-entropy of the head ``w`` on ``h`` against this rank's targets ``t``: chunked over the
    whole vocabulary (:mod:`~kunlunbaize.model.fused_loss`), or under tensor parallelism from the logits sharded
    on the vocabulary by ``loss_parallel`` (in force around the step, :mod:`.mesh`), never gathered."""
    if not isinstance(w, DTensor):
        return linear_cross_entropy(h, w, t, ignore_index=ignore_index) * (t != ignore_index).sum()
    logits = F.linear(h, w)  # [B, 2C, V/tp] per rank
    loss = F.cross_entropy(logits.flatten(0, -2).float(), t.flatten(), ignore_index=ignore_index, reduction="sum")
    return loss.to_local()
