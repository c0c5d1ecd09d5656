"""A torchrun worker for ``tests/test_parallel_layouts.py``: per run of its spec (a model config, a layout and a
mode), a one-process reference and a copy placed on the layout by the trainer's own ``runner.place`` (tensor plan,
compiled blocks, FSDP2/HSDP, precision) train side by side on the same global batches, dealt as the trainer deals
them under a batch ramp with gradient accumulation; rank 0 writes the largest differences (losses, gradients
before every optimiser step, gradient norms, parameters) and each step's batch size and accumulation as JSON.

Run as ``python -m torch.distributed.run --nproc-per-node N -m tests.parallel_layouts_worker SPEC.json``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from kunlunbaize.arch import get_arch
from kunlunbaize.train.config import TrainConfig
from kunlunbaize.train.distributed import DistEnv, init_distributed
from kunlunbaize.train.optim import build_optimizer
from kunlunbaize.train.parallel.layout import resolve_layout
from kunlunbaize.train.plan import BatchPlan, plan_batches
from kunlunbaize.train.runner import place
from kunlunbaize.train.step import train_step

from .helpers import build, tiny

SPEC = get_arch("kunlunbaize")
LR = 1e-2


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def record_grads(optimizer: torch.optim.Optimizer, model: torch.nn.Module, into: dict) -> None:
    """Make ``optimizer.step`` first store the full gradients of ``model`` (clipped, accumulated) in ``into``."""
    step = optimizer.step

    def recorded(*args, **kwargs):
        into["grads"] = [torch.zeros_like(full(p.detach())) if p.grad is None else full(p.grad).detach().clone()
                         for p in model.parameters()]
        return step(*args, **kwargs)

    optimizer.step = recorded


def deal(plan: BatchPlan, samples: torch.Tensor, consumed: int, global_batch: int, dp_rank: int) -> list:
    """This data-parallel rank's micro-batches of the step starting at sample ``consumed`` (the trainer's dealing)."""
    return [samples[s:s + plan.micro] for s in (plan.first_sample(consumed, m, dp_rank)
                                                for m in range(plan.accumulation(global_batch)))]


def train_config(spec: dict, run: dict) -> TrainConfig:
    """The training settings of a run: the batch ramp over the spec's token budget, micro-batches of ``micro``."""
    return TrainConfig(seq_len=spec["seq"], tokens=spec["seq"] * spec["samples"], batch_size=spec["batch"],
                       batch_size_start=spec["batch_start"], batch_ramp=spec["ramp"],
                       micro_batch_size=run.get("micro", spec["micro"]),
                       lr=LR, compile=run.get("mode", "").startswith("compile"),
                       dtype="bf16" if run.get("mode") == "bf16" else "fp32",
                       activation_checkpointing=run.get("activation_checkpointing", False))


def compile_backend(mode: str) -> contextlib.AbstractContextManager:
    """Mode ``compile-BACKEND``: the blocks the trainer compiles use ``torch.compile``'s BACKEND (``aot_eager``:
    Dynamo and AOTAutograd without inductor's code generation, minutes faster on a CPU); ``compile``: inductor."""
    if not mode.startswith("compile-"):
        return contextlib.nullcontext()
    compile_module = torch.nn.Module.compile
    return mock.patch.object(torch.nn.Module, "compile",
                             lambda self, *args, **kw: compile_module(self, *args, **{**kw, "backend": mode[8:]}))


def compare(run: dict, spec: dict, env: DistEnv) -> dict:
    """Train the reference and the placed copy until the spec's samples are spent; the largest differences."""
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in run["config"].items()}
    tcfg = train_config(spec, run)
    ref = build(tiny(**overrides), seed=0).train()
    SPEC.set_activation_checkpointing(ref, tcfg.activation_checkpointing)
    par = copy.deepcopy(ref)
    layout = resolve_layout(env.world_size, "auto", *run["layout"])
    with compile_backend(run.get("mode", "")):
        runner = place(tcfg, env, par, SPEC, layout, tcfg.dtype)  # its optimiser is left unused: ours records grads
    wrapped, kwargs, ctx = runner.wrapped, runner.loss_kwargs, runner.autocast
    plan, one = plan_batches(tcfg, layout.dp), plan_batches(tcfg, 1)
    opt_ref, opt_par = build_optimizer(ref, LR), build_optimizer(par, LR)
    seen_ref, seen_par = {}, {}
    record_grads(opt_ref, ref, seen_ref)
    record_grads(opt_par, par, seen_par)
    samples = torch.randint(0, ref.config.vocab_size, (spec["samples"] + spec["batch"], spec["seq"]),
                            generator=torch.Generator().manual_seed(1))
    out = {"loss": 0.0, "grad": 0.0, "grad_norm": 0.0, "param": 0.0, "steps": [], "losses": [], "ref_losses": []}
    consumed, start = 0, time.perf_counter()
    while consumed < spec["samples"]:
        global_batch = plan.ramp(consumed / spec["samples"])  # the parallel run's ramp: both train on its batches
        a = train_step(ref, opt_ref, deal(one, samples, consumed, global_batch, 0), grad_clip=1.0,
                       loss_kwargs=SPEC.train_kwargs())
        b = train_step(wrapped, opt_par, deal(plan, samples, consumed, global_batch, layout.dp_rank(env.rank)),
                       grad_clip=1.0, autocast=ctx, loss_kwargs=kwargs, env=env)
        consumed += global_batch
        out["steps"].append([global_batch, plan.accumulation(global_batch)])
        out["losses"].append(b.losses[0].item())
        out["ref_losses"].append(a.losses[0].item())
        out["loss"] = max(out["loss"], (a.losses - b.losses).abs().max().item())
        out["grad_norm"] = max(out["grad_norm"], abs(a.grad_norm.item() - b.grad_norm.item()))
        grad = max((g - h).abs().max().item() for g, h in zip(seen_ref["grads"], seen_par["grads"], strict=True))
        out["grad"] = max(out["grad"], grad)
        if len(out["steps"]) == 1:  # the same parameters: the gradients differ only by float rounding
            out["first_grad"], out["first_grad_norm"] = grad, abs(a.grad_norm.item() - b.grad_norm.item())
        out["param"] = max(out["param"], max((p - full(q).detach()).abs().max().item()
                                             for p, q in zip(ref.parameters(), par.parameters(), strict=True)))
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def main() -> None:
    """Every run of the spec, in order; rank 0 writes ``result.json`` next to the spec."""
    path = Path(sys.argv[1])
    spec = json.loads(path.read_text())
    env = init_distributed("cpu")
    results = {}
    for run in spec["runs"]:
        key = f"{json.dumps(run['config'])} {run['layout']} {run.get('mode', 'fp32')}" + (
            " recompute" if run.get("activation_checkpointing") else "")
        results[key] = compare(run, spec, env)
    if env.rank == 0:
        (path.parent / "result.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
