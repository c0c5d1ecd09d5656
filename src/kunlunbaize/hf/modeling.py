"""KunlunBaize as a transformers model: backbone (``KunlunBaizeModel``) + heads (``KunlunBaizeForCausalLM``, and
``KunlunBaizeForSequenceClassification`` for reward models).

The backbone runs the same trunk code as :class:`kunlunbaize.KunlunBaize` (the
:class:`KunlunBaizeTrunk` mixin), so an exported checkpoint computes identical logits. ``generate()``
uses our :class:`InferenceCache` (self-attention K/V, conv history, conv-feature K/V and MTP K/V in
preallocated slots) rather than a ``DynamicCache``, as transformers' Mamba does with its own state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from ..checkpoint.keys import to_hf
from ..config import ModelConfig
from ..model.block import PlainBlock, TransformerXBlock
from ..model.cache import InferenceCache
from ..model.layers import Linear
from ..model.loss import shifted_cross_entropy
from ..model.model import KunlunBaizeTrunk, TrunkOutput, init_module, run_mtp
from ..model.mtp import MultiTokenPrediction
from .configuration import KunlunBaizeConfig

try:  # transformers >= 5: init functions that leave already-loaded weights alone
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover - older transformers
    hf_init = nn.init

# transformers renamed the cache from ``past_key_values`` to ``cache`` after 5.0 (in generate's model kwargs, in
# prepare_inputs_for_generation and in the output classes); the old names stay accepted as aliases.
# Both are parameters of forward() and prepare_inputs_for_generation(): generate() refuses model kwargs not in them.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _given_cache(past_key_values: Any, cache: Any, kwargs: dict[str, Any]) -> Any:
    """The cache passed under any of the names transformers uses for it (``cache_params`` removed from ``kwargs``)."""
    given = [c for c in (past_key_values, cache, kwargs.pop("cache_params", None)) if c is not None]
    if any(c is not given[0] for c in given[1:]):
        raise ValueError("two different caches were passed (as past_key_values and as cache); pass one")
    return given[0] if given else None


ATTENTIONS_UNSUPPORTED = (
    "output_attentions=True is not supported: KunlunBaize computes every attention (self-, convolution-scale cross- "
    "and MTP attention) with torch's fused scaled_dot_product_attention, which never forms the weights; leave "
    "output_attentions unset (and config.output_attentions False)")


ASSISTED_UNSUPPORTED = (
    "assisted decoding (assistant_model=, prompt_lookup_num_tokens=, assistant_early_exit=) is not supported: it "
    "needs a transformers Cache made before the first forward and rolled back token by token, and KunlunBaize's "
    "cache also holds convolution history and per-scale and MTP keys; for speculative decoding use the model's own "
    "MTP depths: kunlun generate --speculative")
_ASSISTED_SETTINGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


class KunlunBaizePlainBlock(GradientCheckpointingLayer, PlainBlock):
    """:class:`PlainBlock` that checkpoints itself under ``gradient_checkpointing_enable()`` (transformers' layer)."""


class KunlunBaizeTransformerXBlock(GradientCheckpointingLayer, TransformerXBlock):
    """:class:`TransformerXBlock` that checkpoints itself under ``gradient_checkpointing_enable()``."""


def _make_block(config: ModelConfig) -> nn.Module:
    return KunlunBaizeTransformerXBlock(config) if config.transformerx else KunlunBaizePlainBlock(config)


@dataclass
class KunlunBaizeCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the MTP depths' logits and losses when ``mtp=True``."""

    mtp_logits: tuple[torch.Tensor, ...] | None = None
    """D tensors [B, T, V]: depth j at position i predicts token i+j+1."""
    mtp_losses: tuple[torch.Tensor, ...] | None = None
    """Unweighted L^j per depth (eq. 23) when labels were given."""


class KunlunBaizePreTrainedModel(PreTrainedModel):
    config_class = KunlunBaizeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["KunlunBaizeTransformerXBlock", "KunlunBaizePlainBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_module(module, self.config.init_std, init=hf_init)

    def _output_flags(self, output_hidden_states: bool | None, return_dict: bool | None,
                      output_attentions: bool | None) -> tuple[bool, bool]:
        """``(output_hidden_states, return_dict)`` of a call: the arguments, else the configuration's (as every
        transformers model); refuses attention weights (:data:`ATTENTIONS_UNSUPPORTED`)."""
        if output_attentions if output_attentions is not None else self.config.output_attentions:
            raise ValueError(ATTENTIONS_UNSUPPORTED)
        hidden = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return bool(hidden), bool(return_dict if return_dict is not None else self.config.return_dict)

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        """transformers' resize, plus what it does not know about: the trunk's own copy of the vocabulary size
        (token ids are checked against it) and the MTP depths' output heads, whose new rows start at the mean of
        the old ones."""
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        n = embeddings.weight.shape[0]
        backbone = getattr(self, "model", self)
        backbone.arch = dataclasses.replace(backbone.arch, vocab_size=n)
        for depth in getattr(getattr(self, "mtp", None), "depths", ()):
            old = depth.head
            if old is not None and old.out_features != n:
                new = Linear(old.in_features, n, bias=False, device=old.weight.device, dtype=old.weight.dtype)
                with torch.no_grad():
                    keep = min(n, old.out_features)
                    new.weight[:keep] = old.weight[:keep]
                    new.weight[keep:] = old.weight.mean(0, keepdim=True)
                depth.head = new
        return embeddings


class KunlunBaizeModel(KunlunBaizeTrunk, KunlunBaizePreTrainedModel):
    """The trunk: embedding → TransformerX blocks with dense residuals → final norm (``last_hidden_state``)."""

    def __init__(self, config: KunlunBaizeConfig) -> None:
        super().__init__(config)
        self.build_trunk(config.to_model_config(), _make_block)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def trunk(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
              past_key_values: Any, use_cache: bool | None, output_hidden_states: bool | None,
              inputs_embeds: torch.Tensor | None, mtp: bool = False) -> tuple[TrunkOutput, InferenceCache | None]:
        """Run the trunk with transformers' argument conventions; returns the trunk output and the cache
        (a new one holds MTP state only if ``mtp``: ``generate`` never drafts, so it skips that work).
        ``inputs_embeds`` stand for the token embeddings everywhere: the trunk's H_0 and what the MTP depths read."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass either input_ids or inputs_embeds")
        cache = past_key_values
        if cache is not None and not isinstance(cache, InferenceCache):
            if hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0:
                cache = None  # an empty transformers Cache handed in by a caller: use ours instead
            else:
                raise ValueError(f"past_key_values must be a kunlunbaize InferenceCache (got {type(cache).__name__}):"
                                 " KunlunBaize also caches convolution and MTP state")
        if use_cache is None:  # the cache is preallocated (max_position_embeddings slots): build it only
            use_cache = cache is not None  # when asked (generate asks) or to continue one
        if use_cache and cache is None:
            cache = self.new_cache((input_ids if input_ids is not None else inputs_embeds).shape[0], mtp=mtp)
        elif not use_cache:
            cache = None
        if attention_mask is not None and attention_mask.dim() == 2 and not (cache is not None and cache.padded) \
                and bool(attention_mask.all()):
            attention_mask = None  # no padding anywhere: the plain causal path is faster and identical
        out = self.run_trunk(input_ids, cache, attention_mask, bool(output_hidden_states), inputs_embeds)
        return out, cache

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: InferenceCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: InferenceCache | None = None,
        output_attentions: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """The trunk's final normalised state; the cache may also be passed as ``cache`` (its newer name)."""
        output_hidden_states, return_dict = self._output_flags(output_hidden_states, return_dict, output_attentions)
        out, cache = self.trunk(input_ids, attention_mask, _given_cache(past_key_values, cache, kwargs), use_cache,
                                output_hidden_states, inputs_embeds)
        if cache is not None:
            cache.length = out.start + out.hidden.shape[1]
        last = self.norm(out.hidden)
        result = BaseModelOutputWithPast(last_hidden_state=last, hidden_states=_hidden_states(out, last),
                                         **{_CACHE_FIELD: cache})
        return result if return_dict else result.to_tuple()


def _hidden_states(out: TrunkOutput, last: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """transformers' ``hidden_states``: H_0 … H_{L−1}, then the normalised final state (as Llama)."""
    return None if out.layer_inputs is None else (*out.layer_inputs, last)


class KunlunBaizeForCausalLM(KunlunBaizePreTrainedModel, GenerationMixin):
    """Backbone + output head ``lm_head`` + the MTP depths ``mtp`` (trained with ``mtp=True``)."""

    # tied only when config.tie_word_embeddings
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: KunlunBaizeConfig) -> None:
        super().__init__(config)
        arch = config.to_model_config()
        self.model = KunlunBaizeModel(config)
        self.lm_head = nn.Linear(arch.d_model, arch.vocab_size, bias=False)
        self.mtp = MultiTokenPrediction(arch) if arch.mtp_depth > 0 else None
        self.post_init()

    @classmethod
    def from_kunlunbaize(cls, model: torch.nn.Module, **config_kwargs: Any) -> KunlunBaizeForCausalLM:
        """The transformers twin of a :class:`kunlunbaize.KunlunBaize` (same weights, same dtype, eval mode);
        ``config_kwargs`` add transformers settings (``eos_token_id``, ``pad_token_id`` …)."""
        config = KunlunBaizeConfig.from_model_config(model.config, **config_kwargs)
        twin = cls(config)
        state = to_hf(model.state_dict())
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed.weight"]
        twin.load_state_dict(state, strict=True)
        return twin.to(model.embed.weight.dtype).eval()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate``; assisted decoding is refused with a message (:data:`ASSISTED_UNSUPPORTED`)."""
        configs = (kwargs, vars(kwargs.get("generation_config") or self.generation_config))
        if any(c.get(name) is not None for c in configs for name in _ASSISTED_SETTINGS):
            raise ValueError(ASSISTED_UNSUPPORTED)
        return super().generate(*args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not make a DynamicCache: forward() creates an InferenceCache

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> KunlunBaizeModel:
        return self.model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: InferenceCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mtp: bool = False,
        cache: InferenceCache | None = None,
        output_attentions: bool | None = None,
        **kwargs: Any,
    ) -> KunlunBaizeCausalLMOutput | tuple:
        """Next-token logits (and the loss against ``labels``, shifted inside, -100 ignored).

        ``mtp=True`` also returns every MTP depth's logits, and with labels the loss becomes the paper's
        joint loss L_main + Σ_j γ_j L^j (eq. 22) — what pre-training optimises. ``logits_to_keep=k``
        computes logits for the last k positions only (what ``generate`` asks for). The cache may also be
        passed as ``cache`` (its name in newer transformers).
        """
        output_hidden_states, return_dict = self._output_flags(output_hidden_states, return_dict, output_attentions)
        out, cache = self.model.trunk(input_ids, attention_mask, _given_cache(past_key_values, cache, kwargs),
                                      use_cache, output_hidden_states, inputs_embeds, mtp)
        last = self.model.norm(out.hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(last[:, keep])
        mtp_logits = run_mtp(self.mtp, out, self.model.rope, self.lm_head.weight, cache, mtp)
        if cache is not None:
            cache.length = out.start + out.hidden.shape[1]

        loss = mtp_losses = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if mtp_logits:
                mtp_losses = tuple(shifted_cross_entropy(lg, labels, j + 1)
                                   for j, lg in enumerate(mtp_logits, start=1))
                for gamma, term in zip(self.model.arch.gammas, mtp_losses, strict=True):
                    loss = loss + gamma * term
        result = KunlunBaizeCausalLMOutput(
            loss=loss, logits=logits, hidden_states=_hidden_states(out, last),
            mtp_logits=tuple(mtp_logits) or None, mtp_losses=mtp_losses, **{_CACHE_FIELD: cache},
        )
        return result if return_dict else result.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: InferenceCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: InferenceCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        next_sequence_length: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only the tokens the cache has not seen; the mask stays full length (it marks the padding).

        ``generate`` hands the cache over as ``past_key_values`` or, in newer transformers, as ``cache``. A prompt
        given as ``inputs_embeds`` is fed once; ``input_ids`` then hold only the generated tokens. Every other model
        kwarg ``generate`` passes (``output_hidden_states``, ``logits_to_keep`` …) goes on to ``forward``."""
        cache = _given_cache(past_key_values, cache, kwargs)
        start = cache.length if isinstance(cache, InferenceCache) else 0
        inputs: dict[str, Any] = {"past_key_values": cache, "attention_mask": attention_mask, "use_cache": use_cache}
        if inputs_embeds is not None and start < inputs_embeds.shape[1]:
            inputs.update(input_ids=None, inputs_embeds=inputs_embeds[:, start:])
        else:
            if start and input_ids.shape[1] > start:  # the whole sequence so far
                input_ids = input_ids[:, start:]
            elif start:  # only the tokens generated after an inputs_embeds prompt
                input_ids = input_ids[:, -(next_sequence_length or 1):]
            inputs["input_ids"] = input_ids.contiguous()
        for key, value in kwargs.items():
            if key not in ("labels", "return_dict", "cache_position", "position_ids", "is_first_iteration"):
                inputs.setdefault(key, value)
        return inputs


class KunlunBaizeForSequenceClassification(KunlunBaizePreTrainedModel):
    """Backbone + a linear ``score`` head read at each sequence's last real token: ``num_labels`` logits per
    sequence. With ``num_labels=1`` it is a scalar reward model (TRL's ``RewardTrainer``).

    ``from_pretrained`` on a causal-LM export keeps the backbone (``model.*``) and starts ``score`` fresh (reported
    as newly initialised, as by every transformers model); the LM head and MTP depths are left out silently.
    """

    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"^lm_head\.", r"^mtp\."]

    def __init__(self, config: KunlunBaizeConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = KunlunBaizeModel(config)
        self.score = nn.Linear(config.to_model_config().d_model, self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast | tuple:
        """Logits [B, num_labels] of each sequence's last real token: the last position with ``attention_mask``
        1 (left or right padding), else the last token that is not ``pad_token_id``, else the last position."""
        output_hidden_states, return_dict = self._output_flags(output_hidden_states, return_dict, output_attentions)
        kwargs.pop("position_ids", None)  # positions come from the mask (left padding) or the causal order
        out = self.model(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False,
                         output_hidden_states=output_hidden_states, return_dict=True)
        hidden = out.last_hidden_state
        B, T = hidden.shape[:2]
        positions = torch.arange(T, device=hidden.device)
        if attention_mask is not None:
            last = (positions * attention_mask.to(hidden.device, torch.long)).argmax(-1)
        elif self.config.pad_token_id is not None and input_ids is not None:
            last = (positions * (input_ids != self.config.pad_token_id).to(hidden.device, torch.long)).argmax(-1)
        else:
            last = torch.full((B,), T - 1, device=hidden.device)
        logits = self.score(hidden[torch.arange(B, device=hidden.device), last])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        result = SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return result if return_dict else result.to_tuple()
