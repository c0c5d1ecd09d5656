"""A pipeline rank's optimisers and checkpoint state: one optimiser per stage module (torchtitan's model parts),
and the stages' model and optimiser state under the one-process model's names, so that a checkpoint saved under
``--pp N`` loads in one process and the other way round.

Each parameter is saved under its one-process fully-qualified name (the stage modules keep them); a parameter held
by several stages (the shared embedding on the first and last stage, the dense-residual logits on every stage) is one
key, written once (DCP keeps one copy of a key several ranks hold; on one rank the first stage's copy is taken) and
loaded into every stage holding it (each stage's optimiser gets its own copy of the key's state). The
optimiser's parameter groups are gathered over the pipeline so that every rank saves the one-process groups.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

PARAMS = "params"


class StageOptimizers:
    """One optimiser per stage module of this rank, stepped together; ``param_groups`` are all of theirs (the LR
    schedule sets them)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


class PipelineState:
    """This rank's stages and their optimisers as a checkpoint's ``{"model", "optim"}`` under one-process names (a
    :class:`~kunlunbaize.checkpoint.state.TrainState`)."""

    def __init__(self, stages: list[nn.Module], optimizers: list[torch.optim.Optimizer], group: dist.ProcessGroup,
                 representative: bool) -> None:
        self.stages, self.optimizers, self.group = stages, optimizers, group
        self.representative = representative
        """Whether this rank sends its stages' full weights to rank 0 (one rank per pipeline rank)."""

    def _parts(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return [get_state_dict(stage, opt) for stage, opt in zip(self.stages, self.optimizers, strict=True)]

    def checkpoint_state(self) -> dict[str, Any]:
        model: dict[str, Any] = {}
        state: dict[str, Any] = {}
        groups: list[dict[str, Any]] = []
        for model_sd, optim_sd in self._parts():
            for name, value in model_sd.items():
                model.setdefault(name, value)
            for name, value in optim_sd["state"].items():
                state.setdefault(name, value)
            groups = _merge_groups(groups, optim_sd["param_groups"])
        gathered: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, groups, group=self.group)
        whole: list[dict[str, Any]] = []
        for part in gathered:
            whole = _merge_groups(whole, part)
        return {"model": model, "optim": {"state": state, "param_groups": whole}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Each stage's model and optimiser state from ``state``; a shared parameter's optimiser state is copied for
        every later stage of this rank that holds it, since an optimiser keeps the loaded tensors themselves and
        updates them in place (aliased, two stages' optimisers would each advance one Adam ``step`` and moments)."""
        loaded, given = state["optim"]["state"], set()
        for stage, opt, (model_sd, optim_sd) in zip(self.stages, self.optimizers, self._parts(), strict=True):
            optim = {"state": {k: _own_copy(loaded[k]) if k in given else loaded[k] for k in optim_sd["state"]},
                     "param_groups": state["optim"]["param_groups"]}
            given.update(optim_sd["state"])
            set_state_dict(stage, opt, model_state_dict={k: state["model"][k] for k in model_sd},
                           optim_state_dict=optim)

    def full_weights(self) -> dict[str, torch.Tensor]:
        mine: dict[str, torch.Tensor] = {}
        for stage in self.stages:  # a collective over the stage's data- and tensor-parallel ranks
            sd = get_model_state_dict(stage, options=StateDictOptions(full_state_dict=True))
            for name, value in sd.items():
                mine.setdefault(name, value.detach().cpu())
        world = dist.get_world_size()
        gathered: list[Any] | None = [None] * world if dist.get_rank() == 0 else None
        dist.gather_object(mine if self.representative else {}, gathered, dst=0)
        if gathered is None:
            return {}
        out: dict[str, torch.Tensor] = {}
        for part in gathered:
            for name, value in part.items():
                out.setdefault(name, value)
        return out


def _own_copy(param_state: dict[str, Any]) -> dict[str, Any]:
    """One parameter's optimiser state (``step``, ``exp_avg`` …) with every tensor cloned."""
    return {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in param_state.items()}


def _merge_groups(into: list[dict[str, Any]], groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parameter groups of one optimiser layout merged by position: the union of their parameter names (the same
    grouping rule on every stage gives the same groups, in the same order, as one process)."""
    out = [dict(g, params=list(g[PARAMS])) for g in into]
    for i, group in enumerate(groups):
        if i == len(out):
            out.append(dict(group, params=list(group[PARAMS])))
            continue
        seen = set(out[i][PARAMS])
        out[i][PARAMS] += [name for name in group[PARAMS] if name not in seen]
    return out
