"""The KunlunBaize language model: embedding → TransformerX trunk with dense residuals → head (+ MTP depths)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .block import make_block
from .cache import InferenceCache
from .dense_residual import DenseResidual
from .documents import Documents
from .fused_loss import shifted_linear_cross_entropy
from .init import init_module
from .layers import Linear, RotaryEmbedding, linear
from .loss import IGNORE_INDEX, LossTerms, multi_token_loss
from .mtp import MultiTokenPrediction


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    """[B, T, V]; position i predicts token i+1 (None from ``forward(..., logits=False)``)."""
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    """D tensors [B, T, V]; depth j at position i predicts token i+j+1 and reads tokens up to i+j."""
    hidden: torch.Tensor | None = None
    """Final trunk hidden state [B, T, d] before the output norm (g^0 of the MTP module)."""
    loss: torch.Tensor | None = None
    """L_main + Σ γ_j L^j when labels were given (eq. 22)."""
    main_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    """Unweighted L^j per depth (eq. 23)."""


@dataclass
class TrunkOutput:
    """What the trunk hands to the output head and the MTP depths."""

    hidden: torch.Tensor
    """Final hidden state H_L [B, T, d] before the output norm (g^0 of the MTP module)."""
    embeddings: torch.Tensor
    """H_0 = E(t) [B, T, d], the shared token embeddings the MTP depths read (eq. 13, 15)."""
    start: int
    """Position of the first input token (the cache length before this forward)."""
    positions: torch.Tensor | None = None
    """Per-row rotary positions [B, start+T] when padding is in play, else None."""
    mask: torch.Tensor | None = None
    """Attention mask [B, 1, T, start+T] when padding is in play, else None (plain causal)."""
    layer_inputs: list[torch.Tensor] | None = None
    """H_0 … H_{L−1} when requested (HF's ``output_hidden_states``)."""
    rope_length: int | torch.Tensor | None = None
    """The sequence length this forward reaches (largest rotary position + 1): with dynamic NTK it sets the
    frequencies of every query and key of the forward, the MTP depths' included."""
    documents: Documents | None = None
    """The packed documents of the window when ``document_ids`` were given (then ``positions`` and ``mask`` are
    theirs), else None."""


class KunlunBaizeTrunk:
    """Embedding → TransformerX (or plain) blocks with learnable dense residuals → output norm.

    A mixin for ``nn.Module`` subclasses: :class:`KunlunBaize` and the Hugging Face backbone
    (``kunlunbaize.hf.KunlunBaizeModel``) both build and run the trunk through it, so the two share
    parameter names below their prefix and compute exactly the same thing.
    """

    arch: ModelConfig
    gradient_checkpointing: bool

    def build_trunk(self, config: ModelConfig,
                    block_factory: Callable[[ModelConfig], nn.Module] = make_block) -> None:
        """Build the trunk's modules; ``block_factory`` makes each block (a subclass of the block
        :func:`make_block` makes, e.g. one that checkpoints itself, keeps the parameter names)."""
        config.validate()
        self.arch = config
        d = config.d_model
        self.embed = _embedding(config.vocab_size, d)  # E(·), shared with the MTP depths (eq. 13, 15)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.blocks = nn.ModuleList(block_factory(config) for _ in range(config.n_layers))  # eq. 14
        self.dense = DenseResidual(config.n_layers, config.dense_init) if config.dense_residual else None
        self.norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.gradient_checkpointing = False
        """Recompute each block in the backward pass instead of storing its activations (training only)."""

    def dense_residual_weights(self) -> torch.Tensor | None:
        """[L, L] lower-triangular softmax weights of LDRSCM (row l: H_0 … H_l), or None when off."""
        return self.dense.weight_matrix() if self.dense is not None else None

    def new_cache(self, batch_size: int, max_len: int | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, mtp: bool = True) -> InferenceCache:
        """An empty decoding cache for ``batch_size`` sequences of up to ``max_len`` tokens.

        ``mtp=False`` leaves out the MTP depths' state: plain decoding then skips their key projections,
        but the depths cannot draft (or give logits) from this cache.
        """
        w = self.embed.weight
        return InferenceCache.allocate(self.arch, batch_size, max_len or self.arch.max_seq_len,
                                       device or w.device, dtype or w.dtype, mtp=mtp)

    def _check_embeds(self, inputs_embeds: torch.Tensor, start: int, cache: InferenceCache | None) -> None:
        d = self.arch.d_model
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d or not inputs_embeds.is_floating_point():
            raise ValueError(f"inputs_embeds must be a float tensor [batch, seq, {d}], got "
                             f"{tuple(inputs_embeds.shape)} {inputs_embeds.dtype}")
        self._check_span(inputs_embeds.shape[0], inputs_embeds.shape[1], start, cache, "inputs_embeds")

    def _check_input(self, input_ids: torch.Tensor, start: int, cache: InferenceCache | None) -> None:
        cfg = self.arch
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        self._check_span(input_ids.shape[0], input_ids.shape[1], start, cache, "input_ids")
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got range [{lo}, {hi}]")

    def _check_span(self, batch: int, T: int, start: int, cache: InferenceCache | None, name: str) -> None:
        cfg = self.arch
        if T == 0:
            raise ValueError(f"{name} is empty: give at least one token")
        end = start + T
        limit = cache.max_len if cache is not None else cfg.max_seq_len
        if end > limit:
            raise ValueError(f"{end} tokens exceed the context of {limit} "
                             f"({'cache max_len' if cache is not None else 'max_seq_len'}); "
                             "shorten or truncate the input")
        if cache is not None and cache.batch_size != batch:
            raise ValueError(f"cache was made for batch {cache.batch_size}, input has batch {batch}")

    def _padding(self, attention_mask: torch.Tensor | None, T: int, start: int, cache: InferenceCache | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row positions [B, start+T], attention mask [B, 1, T, start+T] and new-token validity [B, T].

        Positions count real tokens only, so a left-padded row computes exactly what the same row
        without padding would. Rows with no visible key (pads before a row's first token) read slot 0
        to stay finite; their outputs are meaningless and unused.
        """
        B = cache.batch_size if cache is not None else attention_mask.shape[0]
        if attention_mask is None:
            valid_new = torch.ones(B, T, dtype=torch.bool, device=device)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (
                    T, start + T):
                raise ValueError(f"attention_mask must be [batch, {T}] or [batch, {start + T}], "
                                 f"got {tuple(attention_mask.shape)}")
            valid_new = attention_mask[:, -T:].to(device=device, dtype=torch.bool)
        if cache is not None:
            cache.valid[:, start:start + T] = valid_new
            cache.padded = True
            valid_all = cache.valid[:, :start + T]
        else:
            valid_all = valid_new
        positions = (valid_all.long().cumsum(-1) - 1).clamp_min(0)
        q = torch.arange(start, start + T, device=device)
        mask = (torch.arange(start + T, device=device)[None, :] <= q[:, None])[None] & valid_all[:, None, :]
        mask[..., 0] |= ~mask.any(-1)
        return positions, mask[:, None], valid_new

    def run_trunk(self, input_ids: torch.Tensor | None, cache: InferenceCache | None = None,
                  attention_mask: torch.Tensor | None = None, keep_layer_inputs: bool = False,
                  inputs_embeds: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> TrunkOutput:
        """H_L for ``input_ids`` [B, T] (continuing ``cache`` when given); see :meth:`KunlunBaize.forward`.
        ``inputs_embeds`` [B, T, d] replaces the embedding lookup: H_0, and what the MTP depths read as E(t).
        ``document_ids`` [B, T] (no cache, no padding): each document of the window computed as if alone
        (:mod:`.documents`)."""
        if document_ids is not None:
            return self._run_documents(input_ids, document_ids, cache, attention_mask, keep_layer_inputs)
        start = cache.length if cache is not None else 0
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give either input_ids or inputs_embeds, not both")
        if inputs_embeds is None:
            self._check_input(input_ids, start, cache)
            emb = self.embed(input_ids)  # H_0
        else:
            self._check_embeds(inputs_embeds, start, cache)
            emb = inputs_embeds
        T = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]  # emb may be a sequence shard (TP)
        positions = mask = valid = None
        if attention_mask is not None or (cache is not None and cache.padded):
            positions, mask, valid = self._padding(attention_mask, T, start, cache, emb.device)
            length = positions[:, start:].max() + 1 if self.rope.dynamic else None
            rope = self.rope(positions[:, start:], length)
        else:
            length = start + T
            rope = self.rope(torch.arange(start, start + T, device=emb.device), length)

        layer_inputs = [] if keep_layer_inputs else None
        h = self.run_blocks(emb, rope, start, cache, mask, valid, layer_inputs)
        return TrunkOutput(h, emb, start, positions, mask, layer_inputs, length)

    def _run_documents(self, input_ids: torch.Tensor, document_ids: torch.Tensor, cache: InferenceCache | None,
                       attention_mask: torch.Tensor | None, keep_layer_inputs: bool) -> TrunkOutput:
        """:meth:`run_trunk` over a window of packed documents: positions restart and attention and the
        convolutions stop at every document start."""
        if cache is not None or attention_mask is not None:
            raise ValueError("document_ids are for training windows of packed documents: give no cache and no "
                             "attention_mask with them")
        if input_ids is None or document_ids.shape != input_ids.shape:
            raise ValueError(f"document_ids must have the shape of input_ids {tuple(getattr(input_ids, 'shape', ()))}"
                             f", got {tuple(document_ids.shape)}")
        self._check_input(input_ids, 0, None)
        emb = self.embed(input_ids)
        docs = Documents(document_ids.to(emb.device))
        length = docs.rope_length(self.rope)
        rope = self.rope(docs.positions, length)
        layer_inputs = [] if keep_layer_inputs else None
        h = self.run_blocks(emb, rope, 0, None, docs.mask, None, layer_inputs, docs.positions)
        return TrunkOutput(h, emb, 0, docs.positions, docs.mask, layer_inputs, length, docs)

    def run_blocks(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], start: int | torch.Tensor,
                   cache: InferenceCache | None, mask: torch.Tensor | None, valid: torch.Tensor | None,
                   layer_inputs: list[torch.Tensor] | None = None,
                   doc_positions: torch.Tensor | None = None) -> torch.Tensor:
        """H_L from H_0 = ``h`` [B, T, d] through every block and the dense residual (eq. 1–2, 14); appends
        H_0 … H_{L−1} to ``layer_inputs`` when given. ``start`` is a tensor only in a compiled static step.
        ``doc_positions`` [B, T]: each token's position within its packed document (:mod:`.documents`)."""
        states = self.dense.states(h) if self.dense is not None else None
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        run = getattr(self, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
        extra = () if doc_positions is None else (doc_positions,)  # the default call stays exactly as it was
        for layer, block in enumerate(self.blocks):
            if layer_inputs is not None:
                layer_inputs.append(h)
            layer_cache = cache.layers[layer] if cache is not None else None
            if recompute and not getattr(block, "gradient_checkpointing", False):  # (else it checkpoints itself)
                delta = run(block, h, rope, start, None, mask, valid, *extra)
            else:
                delta = block(h, rope, start, layer_cache, mask, valid, *extra)  # F_l(H_l)
            if states is not None:
                h = delta + states.mix(layer, h)  # eq. 1–2
                if layer + 1 < len(self.blocks):
                    states.append(h)
            else:
                h = h + delta  # identity skip
        return h


def _embedding(n: int, d: int) -> nn.Embedding:
    """An ``n`` × ``d`` embedding; built on the meta device, without nn.Embedding's own N(0, 1) draw, which there
    draws nothing and imports torch._dynamo (~3 CPU-s) for a model that is loaded or materialised anyway."""
    meta = torch.get_default_device().type == "meta"
    return nn.Embedding(n, d, _weight=torch.empty(n, d) if meta else None)


class KunlunBaize(KunlunBaizeTrunk, nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.build_trunk(config)
        self.config = config
        self.head = None if config.tie_embeddings else Linear(config.d_model, config.vocab_size, bias=False)
        self.mtp = MultiTokenPrediction(config) if config.mtp_depth > 0 else None
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """Weights ~ N(0, init_std); norms and eSwish β at 1; dense-residual logits at 0 (uniform). Nothing on the
        meta device (no values to draw: a meta model is loaded with ``assign=True`` or materialised by name)."""
        if self.embed.weight.is_meta:
            return
        for m in self.modules():
            init_module(m, self.config.init_std)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def _chunked_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                      ignore_index: int, document_ids: torch.Tensor | None = None) -> ModelOutput:
        trunk = self.run_trunk(input_ids, None, attention_mask, document_ids=document_ids)
        terms = _chunked_loss_terms(self, trunk, labels, ignore_index)
        return ModelOutput(logits=None, hidden=trunk.hidden, loss=terms.total, main_loss=terms.main,
                           mtp_losses=terms.mtp)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
        attention_mask: torch.Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        mtp: bool = True,
        logits: bool = True,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for ``input_ids`` [B, T]; with ``cache`` the tokens continue the cached sequence.

        With ``labels`` (aligned to the input, shifted internally) the joint loss of eq. 22 is returned.
        ``attention_mask`` (1 = token, 0 = left padding), [B, T] or [B, start+T], makes each row compute
        what it would alone without its padding. ``mtp=False`` skips the MTP depths' logits (with a cache
        their keys are still stored, so they can draft later). ``logits=False`` with ``labels`` returns only the
        loss, computed a chunk of rows at a time (:mod:`.fused_loss`): no [B, T, V] logits are ever stored, for the
        main head or any depth. ``document_ids`` [B, T] (training windows of packed documents, no cache or padding;
        e.g. :func:`.documents.document_ids`) computes every document of a window as if alone: no attention,
        convolution history or loss target crosses a document boundary, and positions restart per document.
        """
        if labels is not None and not mtp and self.mtp is not None:
            raise ValueError("the joint loss needs the MTP logits: do not pass mtp=False with labels")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if not logits:
            if labels is None or cache is not None:
                raise ValueError("logits=False is the training loss path: give labels and no cache")
            return self._chunked_loss(input_ids, labels, attention_mask, ignore_index, document_ids)
        trunk = self.run_trunk(input_ids, cache, attention_mask, document_ids=document_ids)
        logits = linear(self.norm(trunk.hidden), self.head_weight)
        mtp_logits = run_mtp(self.mtp, trunk, self.rope, self.head_weight, cache, mtp)
        if cache is not None:
            cache.length = trunk.start + input_ids.shape[1]

        out = ModelOutput(logits=logits, mtp_logits=mtp_logits, hidden=trunk.hidden)
        if labels is not None:
            terms = multi_token_loss(logits, mtp_logits, labels, self.config.gammas, ignore_index, trunk.documents)
            out.loss, out.main_loss, out.mtp_losses = terms.total, terms.main, terms.mtp
        return out


def _chunked_loss_terms(model: KunlunBaize, trunk: TrunkOutput, labels: torch.Tensor,
                        ignore_index: int) -> LossTerms:
    """Eq. 22–23 from the heads' inputs, through :func:`.fused_loss.shifted_linear_cross_entropy`."""
    docs = trunk.documents

    def targets(shift: int) -> torch.Tensor:
        return labels if docs is None else docs.labels(labels, shift, ignore_index)

    main = shifted_linear_cross_entropy(model.norm(trunk.hidden), model.head_weight, targets(1), 1,
                                        ignore_index=ignore_index)
    mtp = []
    if model.mtp is not None:
        heads = model.mtp.head_inputs(trunk.hidden, trunk.embeddings, model.rope.at(trunk.rope_length),
                                      model.head_weight, trunk.start, None, trunk.positions, trunk.mask, docs)
        mtp = [shifted_linear_cross_entropy(h, w, targets(j + 1), j + 1, ignore_index=ignore_index)
               for j, (h, w) in enumerate(heads, start=1)]
    return LossTerms.joint(main, mtp, model.config.gammas)


def run_mtp(module: MultiTokenPrediction | None, trunk: TrunkOutput, rope: RotaryEmbedding,
            head_weight: torch.Tensor, cache: InferenceCache | None, logits: bool) -> list[torch.Tensor]:
    """Every MTP depth's logits (eq. 13–21), or with ``logits=False`` only their cached keys (or nothing)."""
    if module is None:
        return []
    rope = rope.at(trunk.rope_length)
    if cache is not None and not cache.mtp:
        if logits:
            raise ValueError("this cache holds no MTP state (made with new_cache(mtp=False)): "
                             "the MTP depths cannot run on it; make the cache with mtp=True")
        return []
    if logits:
        # a keyword, and only when given: the default call stays as it was (a tensor-parallel plan counts the
        # positional arguments)
        extra = {} if trunk.documents is None else {"documents": trunk.documents}
        return module(trunk.hidden, trunk.embeddings, rope, head_weight, trunk.start,
                      cache.mtp if cache is not None else None, trunk.positions, trunk.mask, **extra)
    if cache is not None:
        module.write_keys(trunk.embeddings, rope, trunk.start, cache.mtp, trunk.positions)
    return []
