"""What the rest of the system needs to know about one model architecture (torchtitan's ``ModelSpec`` idea).

A spec says how to build an architecture for training, write and read its checkpoint config, count its FLOPs and
its logged loss terms, switch activation checkpointing on, and which decoding it supports. Code is named by dotted
path and imported only when asked for: the training module (:meth:`ArchSpec.build`) and what a higher layer owns
(loading it for generation, exporting it to transformers, parallelising it: :meth:`ArchSpec.hook`). So the registry
stays below the features that use it, and importing it (as the command line's parser does) imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import ModelConfig

if TYPE_CHECKING:
    from torch import nn

HOOKS = ("generator", "export", "parallelize", "context_parallel")
"""The hooks a spec may name: ``generator(ckpt, device, dtype) -> infer.Generator`` (infer), ``export(ckpt, out,
**kw)`` (hf), ``parallelize(model, mesh) -> training forward kwargs`` (train: tensor + sequence parallelism over
``mesh["tp"]``, in place), ``context_parallel(model, mesh)`` (train: each sequence split over ``mesh["cp"]``, in
place)."""


@dataclass(frozen=True)
class ArchSpec:
    """One trainable, checkpointable, decodable architecture."""

    name: str  # the value of ``kunlun train --arch`` and of ``arch`` in a checkpoint's config.json
    title: str  # what plots, tables and messages call it
    module: str  # "package.module:Class" of the training module: Class(ModelConfig), forward(ids, labels=…)
    checkpoint_config: Callable[[ModelConfig], dict[str, Any]]  # a training checkpoint's config.json
    model_config: Callable[[dict[str, Any]], dict[str, Any]]  # the ModelConfig fields of that config.json
    training_flops: Callable[[ModelConfig, int], float]  # forward + backward FLOPs per token at a sequence length
    set_activation_checkpointing: Callable[[nn.Module, bool], None]  # on a module built by ``build``
    mtp: bool  # trains MTP depths (logs their losses) and decodes MTP self-speculatively
    fused_loss: bool  # its forward takes ``logits=False`` (the loss without [B, T, V] logits)
    hf_model_type: str  # ``model_type`` of its ``kunlun export --hf`` folder
    weight_prefix: str = ""  # prefix of the weight names in a training checkpoint (its module's attribute)
    note: str = ""  # what a sample's header adds to say which model wrote it ("" for the paper's model)
    as_kunlunbaize: Callable[[dict[str, Any], dict[str, Any]], tuple[ModelConfig, dict[str, Any]]] | None = None
    """(config.json, weights) of its checkpoint or export → the KunlunBaize that computes the same logits and its
    weights (ValueError if it cannot), for what runs only KunlunBaize (``kunlun serve``); None: no such view."""
    hooks: dict[str, str] = field(default_factory=dict)
    meta_init: bool = False
    """Whether training builds it on the meta device and initialises, after placement, only what each rank holds, each
    parameter by its name (``kunlunbaize.model.init.init_weights``); else it is built whole on the CPU."""
    shape_config: Callable[[ModelConfig], ModelConfig] | None = None
    """The KunlunBaize config with this architecture's parameters, activations and layer shapes (what ``kunlun plan``
    sizes); None: the config itself."""

    def shape(self, cfg: ModelConfig) -> ModelConfig:
        """The config whose parameters, activations and layer shapes this architecture has for ``cfg``."""
        return self.shape_config(cfg) if self.shape_config is not None else cfg

    def build(self, cfg: ModelConfig) -> nn.Module:
        """The training module of ``cfg`` (freshly initialised, on the CPU)."""
        return _resolve(self.module)(cfg)

    def loss_terms(self, cfg: ModelConfig) -> int:
        """How many loss values a training step logs: the joint loss, the main loss and one per MTP depth."""
        return 2 + (cfg.mtp_depth if self.mtp else 0)

    def train_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the training forward beyond ``input_ids`` and ``labels``."""
        return {"logits": False} if self.fused_loss else {}

    def hook(self, name: str) -> Callable[..., Any]:
        """The function the spec names for ``name`` (one of :data:`HOOKS`), imported now."""
        if name not in HOOKS:
            raise KeyError(f"unknown hook {name!r}; an ArchSpec names {', '.join(HOOKS)}")
        if name not in self.hooks:
            raise NotImplementedError(f"the {self.title} architecture has no {name} yet")
        return _resolve(self.hooks[name])


def _resolve(path: str) -> Any:
    """The object ``"package.module:name"`` names, importing its module."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
