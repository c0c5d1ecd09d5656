"""A KunlunBaize model cut into pipeline stages, exactly: what each stage computes and what crosses each boundary.

The dense residual (eq. 1–2) makes layer l read every earlier output, M_l = Σ_{i≤l} W[l, i] H_i with W static
(softmax of learned logits, independent of the input). A boundary after s layers (H_0 … H_s exist) carries, as one
stacked tensor [n, B, T, d], whichever exact form is smaller:

* ``raw``: H_0 … H_s (s + 1 tensors), or
* ``partial``: H_s (the next block's input) and the partial sums P_l = Σ_{i≤s} W[l, i] H_i for l = s … L−1
  (L − s + 1 tensors): a later stage adds its own outputs' terms and never needs the earlier H_i themselves.

Every later mix is a linear combination of the s + 1 states, so min(s + 1, L − s + 1) tensors is the fewest any exact
linear scheme can send. Both forms are ordinary autograd ops: the gradients ∂P_l that come back give
∂W[l, i] = ⟨H_i, ∂P_l⟩ and ∂H_i on the stage that made them. Without the dense residual a boundary carries H_s alone.

Each stage module keeps the full model's parameter names (``blocks.7.attn.wq.weight``, ``embed.weight`` …). The few
parameters two stages both need are copied to each (every stage: the dense-residual logits; the first and the last
stage: the embedding, when the MTP depths or a tied head read it there); :func:`shared_parameter_names` lists them and
their gradients must be summed over the copies after the backward pass, as for tied embeddings.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...config import ModelConfig
from ...model.documents import Documents
from ...model.layers import linear
from ...model.loss import IGNORE_INDEX, LossTerms, multi_token_loss
from ...model.model import KunlunBaize, TrunkOutput, _chunked_loss_terms, run_mtp
from ...plan.boundary import PLAIN, RAW, boundary_form, boundary_tensors
from .context import ContextGroup
from .context import loss_terms as context_loss_terms


def split_layers(n_layers: int, n_stages: int, layers_per_stage: list[int] | None = None) -> list[range]:
    """The trunk layers of each of ``n_stages`` stages: an even split, or ``layers_per_stage`` when given."""
    if n_stages < 1:
        raise ValueError(f"the pipeline needs at least one stage, got {n_stages}")
    if layers_per_stage is None:
        if n_layers < n_stages:
            raise ValueError(f"{n_layers} layers cannot fill {n_stages} pipeline stages: use at most {n_layers} "
                             "stages (pipeline size × stages per rank)")
        if n_layers % n_stages:
            raise ValueError(f"{n_layers} layers do not split evenly into {n_stages} pipeline stages: choose a "
                             f"stage count that divides {n_layers} or give layers_per_stage explicitly")
        layers_per_stage = [n_layers // n_stages] * n_stages
    if len(layers_per_stage) != n_stages or sum(layers_per_stage) != n_layers or min(layers_per_stage) < 1:
        raise ValueError(f"layers_per_stage {list(layers_per_stage)} must give each of the {n_stages} stages at least "
                         f"one layer and sum to the model's {n_layers} layers")
    bounds = [0]
    for n in layers_per_stage:
        bounds.append(bounds[-1] + n)
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


@dataclass(frozen=True)
class BoundaryTraffic:
    """What crosses one stage boundary per micro-batch, each way (activations forward, their gradients backward)."""

    after_layer: int
    """Layers before the boundary (H_0 … H_s exist, s = ``after_layer``)."""
    form: str
    tensors: int
    bytes: int
    plain_bytes: int
    """What a plain residual stream (one tensor) would send."""

    @property
    def ratio(self) -> float:
        return self.bytes / self.plain_bytes


def pipeline_traffic(config: ModelConfig, layers_per_stage: list[int], micro_batch: int = 1,
                     seq_len: int | None = None, bytes_per_element: int = 2) -> list[BoundaryTraffic]:
    """Bytes sent across each stage boundary per micro-batch (one direction) for a split of ``config``'s trunk."""
    stages = split_layers(config.n_layers, len(layers_per_stage), layers_per_stage)
    one = micro_batch * (seq_len or config.max_seq_len) * config.d_model * bytes_per_element
    out = []
    for stage in stages[:-1]:
        s = stage.stop
        n = boundary_tensors(s, config.n_layers, config.dense_residual)
        out.append(BoundaryTraffic(s, boundary_form(s, config.n_layers, config.dense_residual), n, n * one, one))
    return out


@dataclass(frozen=True)
class StageSpec:
    """Stage ``index`` of ``n_stages`` runs trunk layers ``layers`` of ``n_layers``."""

    index: int
    n_stages: int
    layers: range
    n_layers: int
    dense_residual: bool

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    @property
    def input_form(self) -> str | None:
        return None if self.is_first else boundary_form(self.layers.start, self.n_layers, self.dense_residual)

    @property
    def output_form(self) -> str | None:
        return None if self.is_last else boundary_form(self.layers.stop, self.n_layers, self.dense_residual)


def shared_parameter_names(config: ModelConfig, n_stages: int) -> dict[str, list[int]]:
    """Parameters held by more than one stage (name → stages holding a copy); their gradients are summed."""
    if n_stages < 2:
        return {}
    shared: dict[str, list[int]] = {}
    if config.mtp_depth > 0 or config.tie_embeddings:
        shared["embed.weight"] = [0, n_stages - 1]
    if config.dense_residual:
        for layer in range(config.n_layers):
            shared[f"dense.logits.{layer}"] = list(range(n_stages))
    return shared


class _Flow:
    """The dense residual's state inside one stage: the block input H_l, the stored H_base … H_l that later mixes in
    this stage read, and (``partial`` input) the sums P_m of every state before ``base``."""

    def __init__(self, current: torch.Tensor, stored: list[torch.Tensor], base: int,
                 partial: dict[int, torch.Tensor] | None) -> None:
        self.current, self.stored, self.base, self.partial = current, stored, base, partial

    def mix(self, weights: torch.Tensor, layer: int) -> torch.Tensor:
        """M_layer = P_layer + Σ_{base ≤ i ≤ layer} W[layer, i] H_i (eq. 1–2)."""
        out = self.partial[layer] if self.partial is not None else None
        for i, h in enumerate(self.stored, start=self.base):
            term = weights[i] * h
            out = term if out is None else out + term
        return out


class PipelineStageModule(nn.Module):
    """One pipeline stage of a :class:`KunlunBaize` model; parameter names are the full model's.

    ``forward`` maps the stage's input (token ids on the first stage, the boundary tensor [n, B, T, d] elsewhere) to
    its output (the next boundary tensor, or the final hidden state H_L on the last stage). The last stage also
    computes the joint loss (eq. 22) with :meth:`loss_terms`.
    """

    def __init__(self, model: KunlunBaize, spec: StageSpec) -> None:
        super().__init__()
        self.spec, self.config = spec, model.config
        cfg = model.config
        own = (lambda m: m) if spec.is_first else copy.deepcopy  # later stages hold copies of shared modules
        self.embed = own(model.embed) if spec.is_first or (cfg.mtp_depth > 0 or cfg.tie_embeddings) else None
        self.rope = own(model.rope)
        self.dense = own(model.dense) if model.dense is not None else None
        self.blocks = nn.ModuleDict({str(layer): model.blocks[layer] for layer in spec.layers})
        self.gradient_checkpointing = model.gradient_checkpointing
        """Recompute each block in the backward pass instead of storing its activations (training only)."""
        self.seq_shards = 1
        """Tensor-parallel ranks the residual stream's sequence is sharded over (1: none); more than 1: the
        model's tensor-parallel plan is applied and the loss comes from vocabulary-parallel logits."""
        self.context: ContextGroup | None = None
        """This rank's context-parallel group when each sequence is split over cp ranks (the model's context-parallel
        plan applied before the cut): the first stage embeds this rank's part, the boundaries carry it, the last
        stage computes the global means of the loss terms (:func:`.context.loss_terms`)."""
        if spec.is_last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def _weights(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        return self.dense.weights(layer).to(dtype)

    def _receive(self, x: torch.Tensor) -> _Flow:
        spec = self.spec
        if spec.is_first:
            h = self.embed(x if self.context is None else self.context.shard(x))  # H_0 (of this cp rank's part)
            return _Flow(h, [h], 0, None)
        form, s = spec.input_form, spec.layers.start
        if form == PLAIN:
            return _Flow(x[0], [], s, None)
        if form == RAW:  # H_0 … H_s
            return _Flow(x[-1], list(x.unbind(0)), 0, None)
        return _Flow(x[0], [], s + 1, {m: x[1 + m - s] for m in range(s, spec.n_layers)})  # H_s, P_s … P_{L−1}

    def _send(self, flow: _Flow) -> torch.Tensor:
        spec = self.spec
        form, s = spec.output_form, spec.layers.stop
        if form == PLAIN:
            return flow.current[None]
        if form == RAW:
            return torch.stack(flow.stored)
        later = range(s, spec.n_layers)  # P_m = P_m (earlier stages) + Σ_{base ≤ i ≤ s} W[m, i] H_i, as one matmul
        dtype = flow.current.dtype
        w = torch.stack([self._weights(m, dtype)[flow.base:s + 1] for m in later])
        states = torch.stack(flow.stored)
        with torch.autocast(states.device.type, enabled=False):
            sums = (w @ states.view(len(flow.stored), -1)).view(len(later), *flow.current.shape)
        if flow.partial is not None:
            sums = sums + torch.stack([flow.partial[m] for m in later])
        return torch.cat([flow.current[None], sums])

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The stage's output for its input ``x``; ``document_ids`` [B, T] (packed documents, ``--doc-mask``): the
        micro-batch's per-token document ids, every document computed as if alone (:mod:`...model.documents`)."""
        flow = self._receive(x)
        T = flow.current.shape[1] * self.seq_shards  # the whole sequence (its shard under sequence parallelism)
        docs = _documents(document_ids, flow.current.device)
        if self.context is not None:  # this cp rank's part: its tokens' global positions (and documents' rows)
            rope, mask, doc_positions = self.context.block_inputs(self.rope, T * self.context.size, docs)
            extra = () if doc_positions is None else (doc_positions,)
        elif docs is not None:  # the model's own packed-document forward: per-document positions, a block mask
            rope, mask, extra = self.rope(docs.positions, docs.rope_length(self.rope)), docs.mask, (docs.positions,)
        else:
            rope, mask, extra = self.rope(torch.arange(T, device=flow.current.device)), None, ()
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.spec.layers:
            block = self.blocks[str(layer)]
            if recompute:
                delta = checkpoint(block, flow.current, rope, 0, None, mask, None, *extra, use_reentrant=False)
            else:
                delta = block(flow.current, rope, 0, None, mask, None, *extra)  # F_l(H_l)
            if self.dense is not None:
                h = delta + flow.mix(self._weights(layer, flow.current.dtype), layer)  # eq. 1–2
                if layer + 1 < self.spec.n_layers:
                    flow.stored.append(h)
            else:
                h = flow.current + delta
            flow.current = h
        return flow.current if self.spec.is_last else self._send(flow)

    def loss_terms(self, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX, document_ids: torch.Tensor | None = None) -> LossTerms:
        """The joint loss's terms (eq. 22–23) from H_L, as the whole model computes them (last stage only; with
        ``document_ids`` as its packed-document forward does)."""
        if not self.spec.is_last:
            raise RuntimeError(f"stage {self.spec.index} is not the last stage: only the last one has the heads")
        docs = _documents(document_ids, hidden.device)
        if self.context is not None:
            return context_loss_terms(self, self.context, hidden, input_ids, labels, ignore_index, docs)
        emb = self.embed(input_ids) if self.mtp is not None else None  # E(t) for the MTP depths (eq. 13, 15)
        trunk = (TrunkOutput(hidden, emb, 0) if docs is None else
                 TrunkOutput(hidden, emb, 0, docs.positions, docs.mask, None, docs.rope_length(self.rope), docs))
        if self.seq_shards == 1:
            return _chunked_loss_terms(self, trunk, labels, ignore_index)
        # tensor-parallel: vocabulary-parallel logits, never gathered, and loss_parallel's cross-entropy
        logits = linear(self.norm(hidden), self.head_weight)
        mtp_logits = run_mtp(self.mtp, trunk, self.rope, self.head_weight, None, True)
        return multi_token_loss(logits, mtp_logits, labels, self.config.gammas, ignore_index, docs)


def _documents(document_ids: torch.Tensor | None, device: torch.device) -> Documents | None:
    """The packed documents of a micro-batch's ``document_ids`` (None: none given)."""
    return None if document_ids is None else Documents(document_ids.to(device))


def build_stage_modules(model: KunlunBaize, n_stages: int, layers_per_stage: list[int] | None = None,
                        indices: list[int] | None = None) -> list[PipelineStageModule]:
    """Stage modules ``indices`` (default: all) of ``model`` cut into ``n_stages`` stages."""
    if not isinstance(model, KunlunBaize):
        raise TypeError(f"pipeline stages are cut from a KunlunBaize model, got {type(model).__name__}")
    cfg = model.config
    ranges = split_layers(cfg.n_layers, n_stages, layers_per_stage)
    chosen = range(n_stages) if indices is None else indices
    return [PipelineStageModule(model, StageSpec(i, n_stages, ranges[i], cfg.n_layers, cfg.dense_residual))
            for i in chosen]


def sum_local_shared_grads(stages: list[PipelineStageModule], names: list[str]) -> list[torch.Tensor | None]:
    """For each shared parameter name, the sum of its gradient over ``stages`` holding it (None when none does), laid
    out as the parameter (:func:`grad_in_layout`), so every copy's local part has the same shape."""
    out: list[torch.Tensor | None] = []
    for name in names:
        total = None
        for stage in stages:
            p = dict(stage.named_parameters()).get(name)
            if p is not None and p.grad is not None:
                grad = grad_in_layout(p.grad, p)
                total = grad.clone() if total is None else total + grad
            elif p is not None and total is None:
                total = torch.zeros_like(p)
        out.append(total)
    return out


def grad_in_layout(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``param``'s placements (a plain tensor, or one already laid out so, as it is): under tensor
    parallelism DTensor's embedding backward gives the vocabulary-sharded embedding a replicated gradient, while a
    copy without a gradient contributes zeros laid out as the parameter, and the copies on two pipeline ranks
    exchange their local parts, which must have one shape."""
    placements = getattr(param, "placements", None)
    if placements is None or getattr(grad, "placements", placements) == placements:
        return grad
    return grad.redistribute(param.device_mesh, placements)


def set_shared_grads(stages: list[PipelineStageModule], names: list[str], grads: list[torch.Tensor | None]) -> None:
    """Give every copy of each shared parameter on ``stages`` the (summed) gradient."""
    for stage in stages:
        params = dict(stage.named_parameters())
        for name, g in zip(names, grads, strict=True):
            if name in params and g is not None:
                params[name].grad = g.clone()
