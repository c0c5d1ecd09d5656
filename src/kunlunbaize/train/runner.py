"""How the trainer runs a step, a validation pass and a checkpoint under its layout: the one model (plain, DDP,
FSDP2, tensor-parallel) through :func:`.step.train_step`, or this rank's pipeline stages through
:func:`.step.pipeline_step`. :func:`place` builds the one the layout asks for; the loop never looks inside."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..arch import ArchSpec
from ..checkpoint.state import TrainState
from ..model.init import fill_full
from .config import TrainConfig
from .distributed import DistEnv
from .models import dense_residual_weights, is_meta, materialize
from .optim import build_optimizer
from .parallel.layout import Layout, LayoutError
from .parallel.mesh import StepContext, build_mesh, context_parallel, data_parallel, shard_stage, tensor_parallel
from .step import StepResult, evaluate, pipeline_evaluate, pipeline_step, precision, train_step


class Runner(Protocol):
    """A training step, a validation pass and the checkpointed state of the model under the run's layout."""

    optimizer: Any
    """What the LR schedule sets (``param_groups``): a torch optimiser, or one per pipeline stage."""

    def train(self) -> None:
        """Put the model in training mode."""

    def step(self, batches: Sequence[torch.Tensor], grad_clip: float) -> StepResult:
        """One optimiser step on this rank's micro-batches."""

    def evaluate(self, batches: Sequence[torch.Tensor]) -> dict[str, float]:
        """Validation losses (``val_loss``, ``val_mtp_loss_1`` …) over ``batches``."""

    def checkpoint_model(self) -> nn.Module | TrainState:
        """What checkpoints save and load, with :attr:`optimizer` (see ``checkpoint.state.save_checkpoint``)."""

    def dense_residual_weights(self) -> torch.Tensor | None:
        """The [L, L] dense-residual weights (a collective: every rank), or None."""

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy the whole model's ``weights`` (one-process names, full tensors) into what this rank holds."""


@dataclass
class ModelRunner:
    """The whole model on every rank (data- and tensor-parallel wrapped): :func:`.step.train_step`."""

    model: nn.Module
    wrapped: nn.Module
    """The model as wrapped for data parallelism (forward, backward)."""
    optimizer: torch.optim.Optimizer
    autocast: AbstractContextManager
    loss_kwargs: dict[str, Any]
    """Keyword arguments of the training forward under the layout (the spec's, or its tensor-parallel plan's)."""
    env: DistEnv
    document_eot: int | None = None
    """The end-of-text id separating a window's documents under ``--doc-mask`` (None: no document masks)."""

    def train(self) -> None:
        self.wrapped.train()

    def step(self, batches: Sequence[torch.Tensor], grad_clip: float) -> StepResult:
        return train_step(self.wrapped, self.optimizer, batches, grad_clip=grad_clip, autocast=self.autocast,
                          loss_kwargs=self.loss_kwargs, env=self.env, document_eot=self.document_eot)

    def evaluate(self, batches: Sequence[torch.Tensor]) -> dict[str, float]:
        return evaluate(self.wrapped, batches, self.env.device, autocast=self.autocast, loss_kwargs=self.loss_kwargs,
                        document_eot=self.document_eot)

    def checkpoint_model(self) -> nn.Module:
        return self.model

    def dense_residual_weights(self) -> torch.Tensor | None:
        return dense_residual_weights(self.model)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        load_full_weights(self.model, weights)


@dataclass
class PipelineRunner:
    """This rank's pipeline stages (each FSDP2-sharded and tensor-parallel as the layout says), one optimiser per
    stage: :func:`.step.pipeline_step`; checkpoints under the one-process names."""

    pipe: Any
    """The :class:`~.parallel.pipeline.Pipeline`."""
    optimizer: Any
    """The :class:`~.parallel.pipeline_state.StageOptimizers`."""
    state: TrainState
    autocast: AbstractContextManager
    env: DistEnv
    document_eot: int | None = None
    """The end-of-text id separating a window's documents under ``--doc-mask`` (None: no document masks)."""

    def train(self) -> None:
        for m in self.pipe.modules:
            m.train()

    def step(self, batches: Sequence[torch.Tensor], grad_clip: float) -> StepResult:
        return pipeline_step(self.pipe, self.optimizer, batches, grad_clip=grad_clip, autocast=self.autocast,
                             env=self.env, document_eot=self.document_eot)

    def evaluate(self, batches: Sequence[torch.Tensor]) -> dict[str, float]:
        return pipeline_evaluate(self.pipe, batches, self.env.device, autocast=self.autocast,
                                 document_eot=self.document_eot)

    def checkpoint_model(self) -> TrainState:
        return self.state

    def dense_residual_weights(self) -> torch.Tensor | None:
        dense = self.pipe.stages[0].dense  # every stage holds the dense-residual logits
        return dense.weight_matrix() if dense is not None else None

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        for stage in self.pipe.stages:
            load_full_weights(stage, {name: weights[name] for name in stage.state_dict()})


def load_full_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy full tensors by name into ``module``, whose parameters may be shards (DTensors: FSDP2, tensor parallel,
    FSDP2 over tensor parallel): each rank keeps its part, cut locally (:func:`~kunlunbaize.model.init.fill_full`)."""
    own = module.state_dict()
    if own.keys() != weights.keys():
        raise KeyError(f"the weights do not name the model's tensors: missing {sorted(own.keys() - weights.keys())}, "
                       f"unexpected {sorted(weights.keys() - own.keys())}")
    tensors = dict(module.named_parameters())
    tensors.update((n, b) for n, b in module.named_buffers() if n in own)
    with torch.no_grad():
        for name, tensor in tensors.items():
            fill_full(tensor, weights[name].to(tensor.dtype))


def place(cfg: TrainConfig, env: DistEnv, model: nn.Module, spec: ArchSpec, layout: Layout, dtype: str,
          document_eot: int | None = None) -> Runner:
    """Move the model to the device, with activation checkpointing and compiled blocks if asked for, place it on
    the layout's mesh and build its optimiser: the runner of the run's steps (``document_eot``: masked documents,
    ``--doc-mask``). A model built on the meta device is placed there (sharded, cut into stages), then only what
    this rank holds is allocated and initialised by name from ``cfg.seed`` (:func:`.models.materialize`)."""
    meta = is_meta(model)
    if not meta:
        model.to(env.device)
    if cfg.activation_checkpointing:
        spec.set_activation_checkpointing(model, True)
    mesh = build_mesh(layout, env)
    placed = tensor_parallel(model, spec, layout, mesh)
    context_parallel(placed, spec, layout, mesh)
    autocast = precision(env.device, dtype)
    if placed.loss_contexts:
        autocast = StepContext(lambda: precision(env.device, dtype), *placed.loss_contexts)
    if layout.pp > 1:
        return _place_pipeline(cfg, env, model, layout, mesh, autocast, document_eot)
    blocks = list(model.blocks)
    if cfg.compile:
        for block in blocks:
            block.compile()
    shard_first = layout.wrap == "fsdp"  # FSDP2 shards meta parameters; DDP broadcasts rank 0's real ones
    if shard_first:
        data_parallel(placed, blocks, layout, mesh, env)
    if meta:
        materialize(model, env.device, cfg.seed)
    if not shard_first:
        data_parallel(placed, blocks, layout, mesh, env)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                dense_lr_mult=cfg.dense_lr_mult)
    return ModelRunner(model=model, wrapped=placed.wrapped, optimizer=optimizer, autocast=autocast,
                       loss_kwargs=placed.loss_kwargs, env=env, document_eot=document_eot)


def _place_pipeline(cfg: TrainConfig, env: DistEnv, model: nn.Module, layout: Layout, mesh: Any,
                    autocast: AbstractContextManager, document_eot: int | None = None) -> PipelineRunner:
    """This rank's stages of ``model`` (tensor-parallel already, if asked), each sharded over the data-parallel
    sub-mesh, with an optimiser each."""
    from .parallel.context import ContextGroup
    from .parallel.pipeline import build_pipeline, require_pipelining
    from .parallel.pipeline_state import PipelineState, StageOptimizers

    try:
        require_pipelining()
    except RuntimeError as e:
        raise LayoutError(f"--pp {layout.pp}: {e}") from None
    pipe = build_pipeline(model, mesh, cfg.pp_schedule, n_microbatches=layout.pp,  # each step sets its own count
                          stages_per_rank=cfg.pp_stages_per_rank,
                          layers_per_stage=cfg.pp_layers, device=env.device)
    pipe.set_tensor_parallel(layout.tp)
    if layout.cp > 1:
        pipe.set_context_parallel(ContextGroup.of(mesh))
    for stage in pipe.stages:
        blocks = list(stage.blocks.values())
        if cfg.compile:
            for block in blocks:
                block.compile()
        if layout.wrap == "fsdp":
            shard_stage(stage, blocks, layout, mesh)
        if is_meta(stage):  # only this rank's stages are ever allocated
            materialize(stage, env.device, cfg.seed)
    optimizer = StageOptimizers([build_optimizer(stage, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                                 dense_lr_mult=cfg.dense_lr_mult) for stage in pipe.stages])
    state = PipelineState(pipe.stages, optimizer.optimizers, pipe.group,
                          representative=env.rank % (layout.world_size // layout.pp) == 0)
    return PipelineRunner(pipe=pipe, optimizer=optimizer, state=state, autocast=autocast, env=env,
                          document_eot=document_eot)
