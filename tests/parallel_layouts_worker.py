"""A torchrun worker for ``tests/test_parallel_layouts.py``: per run of its spec (a model config, a layout and a
mode), a one-process reference and a copy placed on the layout by the trainer's own ``runner.place`` (tensor plan,
compiled blocks, FSDP2/HSDP, pipeline stages, precision) train side by side on the same global batches, dealt as the
trainer deals them under a batch ramp with gradient accumulation; rank 0 writes the largest differences (losses,
gradients before every optimiser step, gradient norms, parameters), each step's batch size and accumulation, how many
of rank 0's modules are compiled, how many graphs Dynamo captured so far and rank 0's CPU seconds (``cpu``: the whole
run; ``cpu_first_step``: up to its first step, the build, placement and compilation included) as JSON. A run with
``doc_mask`` trains on windows of several documents each (end-of-text id :data:`EOT`) with ``--doc-mask`` on both
sides; a run's ``samples``, ``batch``, ``batch_start``, ``ramp``, ``micro`` and ``seq`` replace the spec's, and its
``name`` names its result. So that one launch pays the ranks' start-up once for every check of a layout size, the
spec's optional sections run in the same job after the runs: ``parallel`` (``tests/parallel_worker.py``'s configs on
its layouts, results under ``"parallel"``), ``cp_units`` (the context-parallel pieces, ``parallel_worker.cp_checks``;
``"cp_units": "ok"``) and ``meta`` (``tests/meta_init_worker.py``'s layouts, files in a ``meta`` folder next to the
spec); ``"cpu"`` holds rank 0's CPU seconds per section (``runs``: the process until its runs ended, start-up
included).

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
from kunlunbaize.train.step import evaluate, train_step

from . import meta_init_worker, parallel_worker
from .helpers import build, tiny
from .parallel_worker import resume_elsewhere

SPEC = get_arch("kunlunbaize")
RUN_SETTINGS = ("samples", "batch", "batch_start", "ramp", "micro", "seq")
"""The spec's settings a run may replace."""
LR = 1e-2
EOT = 0
"""The end-of-text id of a ``doc_mask`` run's windows."""


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def record_grads(optimizer, modules: list[torch.nn.Module], into: dict) -> None:
    """Make ``optimizer.step`` first store the full gradients (clipped, accumulated) of the parameters of ``modules``
    (a model, or a rank's pipeline stages) by name in ``into``."""
    step = optimizer.step

    def recorded(*args, **kwargs):
        into["grads"] = {name: torch.zeros_like(full(p.detach())) if p.grad is None else full(p.grad).detach().clone()
                         for m in modules for name, p in m.named_parameters()}
        return step(*args, **kwargs)

    optimizer.step = recorded


def deal(plan: BatchPlan, samples: torch.Tensor, consumed: int, global_batch: int, dp_rank: int) -> list:
    """This data-parallel rank's micro-batches of the step starting at sample ``consumed`` (the trainer's dealing)."""
    return [samples[s:s + plan.micro] for s in (plan.first_sample(consumed, m, dp_rank)
                                                for m in range(plan.accumulation(global_batch)))]


def train_config(spec: dict, run: dict) -> TrainConfig:
    """The training settings of a run: the batch ramp over the spec's token budget, micro-batches of ``micro``."""
    seq = run.get("seq", spec["seq"])
    return TrainConfig(seq_len=seq, tokens=seq * spec["samples"], batch_size=spec["batch"],
                       batch_size_start=spec["batch_start"], batch_ramp=spec["ramp"],
                       micro_batch_size=run.get("micro", spec["micro"]),
                       lr=run.get("lr", LR), compile=run.get("mode", "").startswith("compile"),
                       dtype="bf16" if run.get("mode") == "bf16" else "fp32",
                       activation_checkpointing=run.get("activation_checkpointing", False),
                       doc_mask=run.get("doc_mask", False), pp_schedule=run.get("schedule", "1f1b"),
                       pp_stages_per_rank=run.get("stages_per_rank", 1))


def compile_backend(mode: str) -> contextlib.AbstractContextManager:
    """Mode ``compile-BACKEND``: the blocks the trainer compiles use ``torch.compile``'s BACKEND (``aot_eager``:
    Dynamo and AOTAutograd without inductor's code generation, minutes faster on a CPU); ``compile``: inductor."""
    if not mode.startswith("compile-"):
        return contextlib.nullcontext()
    compile_module = torch.nn.Module.compile
    return mock.patch.object(torch.nn.Module, "compile",
                             lambda self, *args, **kw: compile_module(self, *args, **{**kw, "backend": mode[8:]}))


def windows(n: int, seq: int, vocab: int, doc_mask: bool) -> torch.Tensor:
    """``n`` training windows of random tokens; with ``doc_mask`` about one token in five is :data:`EOT`, so a
    window holds several documents (some shorter than an MTP depth) and none of them other end-of-text ids; in
    every other window a document also starts at each quarter of the window (the chunk starts of cp2)."""
    g = torch.Generator().manual_seed(1)
    if not doc_mask:
        return torch.randint(0, vocab, (n, seq), generator=g)
    out = torch.randint(1, vocab, (n, seq), generator=g)
    out = out.masked_fill(torch.rand(n, seq, generator=g) < 0.2, EOT)
    out[::2, seq // 4 - 1::seq // 4] = EOT
    return out


def placed(tcfg: TrainConfig, env: DistEnv, par: torch.nn.Module, layout, seen: dict, eot: int | None):
    """The copy placed by ``runner.place``: its step on this rank's micro-batches, the modules whose parameters this
    rank holds (the whole model, or its pipeline stages), the runner and the optimiser whose gradients are recorded
    in ``seen``."""
    runner = place(tcfg, env, par, SPEC, layout, tcfg.dtype, eot)
    if layout.pp > 1:  # the runner's own stage optimisers (the run's lr, the defaults otherwise)
        record_grads(runner.optimizer, runner.pipe.stages, seen)
        return (lambda batches: runner.step(batches, 1.0)), runner.pipe.stages, runner, runner.optimizer
    optimizer = build_optimizer(par, tcfg.lr)  # the runner's is left unused: this one records the gradients

    def step(batches):
        return train_step(runner.wrapped, optimizer, batches, grad_clip=1.0, autocast=runner.autocast,
                          loss_kwargs=runner.loss_kwargs, env=env, document_eot=eot)

    record_grads(optimizer, [par], seen)
    return step, [par], runner, optimizer


def largest(values: list[float]) -> list[float]:
    """The largest of each value over the ranks (a pipeline rank sees only its own stages' parameters)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def compare(run: dict, spec: dict, env: DistEnv, tmp: Path) -> dict:
    """Train the reference and the placed copy until the spec's samples are spent; the largest differences (and with
    the run's ``val``, those of the validation losses; with its ``resume``, those of the next step after the placed
    copy's checkpoint is resumed in one process, or on each layout of a list (``tests/parallel_worker.py``'s
    layouts: ``(dp_replicate, dp_shard, tp)``))."""
    spec = {**spec, **{k: run[k] for k in RUN_SETTINGS if k in run}}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in run["config"].items()}
    tcfg = train_config(spec, run)
    eot = EOT if tcfg.doc_mask else None
    cfg = tiny(**overrides)
    cpu = time.process_time()
    ref = build(cfg, seed=0).train()
    SPEC.set_activation_checkpointing(ref, tcfg.activation_checkpointing)
    par = copy.deepcopy(ref)
    layout = resolve_layout(env.world_size, "auto", *run["layout"])
    seen_ref, seen_par = {}, {}
    with compile_backend(run.get("mode", "")):
        step_par, held, runner, opt_par = placed(tcfg, env, par, layout, seen_par, eot)
    plan, one = plan_batches(tcfg, layout.dp), plan_batches(tcfg, 1)
    opt_ref = build_optimizer(ref, tcfg.lr)
    record_grads(opt_ref, [ref], seen_ref)
    reference = dict(ref.named_parameters())
    samples = windows(spec["samples"] + spec["batch"], tcfg.seq_len, ref.config.vocab_size, tcfg.doc_mask)
    out = {"loss": 0.0, "grad": 0.0, "grad_norm": 0.0, "param": 0.0, "steps": [], "losses": [], "ref_losses": [],
           "norms": []}
    consumed, start = 0, time.perf_counter()
    while consumed < spec["samples"]:
        global_batch = plan.ramp(consumed / spec["samples"])  # the parallel run's ramp: both train on its batches
        a = train_step(ref, opt_ref, deal(one, samples, consumed, global_batch, 0), grad_clip=1.0,
                       loss_kwargs=SPEC.train_kwargs(), document_eot=eot)
        b = step_par(deal(plan, samples, consumed, global_batch, layout.dp_rank(env.rank)))
        consumed += global_batch
        out["steps"].append([global_batch, plan.accumulation(global_batch)])
        out["losses"].append(b.losses[0].item())
        out["ref_losses"].append(a.losses[0].item())
        out["loss"] = max(out["loss"], (a.losses - b.losses).abs().max().item())
        grad_norm = abs(a.grad_norm.item() - b.grad_norm.item())
        out["grad_norm"] = max(out["grad_norm"], grad_norm)
        out["norms"].append(a.grad_norm.item())
        grad, param = largest([
            max((seen_ref["grads"][n] - g).abs().max().item() for n, g in seen_par["grads"].items()),
            max((reference[n].detach() - full(p).detach()).abs().max().item()
                for m in held for n, p in m.named_parameters())])
        out["grad"], out["param"] = max(out["grad"], grad), max(out["param"], param)
        if len(out["steps"]) == 1:  # the same parameters: the gradients differ only by float rounding
            out["first_grad"], out["first_grad_norm"] = grad, grad_norm
            out["cpu_first_step"] = round(time.process_time() - cpu, 2)  # the build, placement and compilation too
    if run.get("val"):  # validation losses too
        val_ref, val_par = evaluate(ref, [samples[:spec["batch"]]], ref.embed.weight.device,
                                    loss_kwargs=SPEC.train_kwargs()), runner.evaluate([samples[:spec["batch"]]])
        out["val"] = max(abs(val_ref[k] - val_par[k]) for k in val_ref)
    if run.get("resume"):  # the checkpoint's next step in one process, or on each layout of a list
        on = run["resume"] if isinstance(run["resume"], list) else [None]
        out["resume"] = resume_elsewhere(cfg, {"steps": len(out["steps"]), "resume_on": on, "accum": 1}, env, tmp,
                                         par, opt_par, ref, opt_ref, samples[:spec["batch"]])
    out["seconds"], out["cpu"] = round(time.perf_counter() - start, 2), round(time.process_time() - cpu, 2)
    out["compiled"] = sum(getattr(m, "_compiled_call_impl", None) is not None for h in held for m in h.modules())
    out["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # Dynamo graphs so far in this process
    return out


def run_key(run: dict) -> str:
    """The name of a run's result: its ``name``, else its config, layout and mode."""
    return run.get("name") or f"{json.dumps(run['config'])} {run['layout']} {run.get('mode', 'fp32')}" + (
        " recompute" if run.get("activation_checkpointing") else "") + (
        f" {run['schedule']}" if "schedule" in run else "") + (" doc-mask" if run.get("doc_mask") else "") + (
        f" seq {run['seq']}" if "seq" in run else "")


def main() -> None:
    """Every run of the spec, in order, then its sections; rank 0 writes ``result.json`` next to the spec."""
    path = Path(sys.argv[1])
    spec = json.loads(path.read_text())
    env = init_distributed("cpu")
    results = {run_key(run): compare(run, spec, env, path.parent / f"ckpt{i}") for i, run in enumerate(spec["runs"])}
    cpu = {"runs": time.process_time()}
    if "parallel" in spec:
        results["parallel"] = parallel_worker.run_spec({**spec["parallel"], "out": str(path.parent)}, env)
        cpu["parallel"] = time.process_time()
    if spec.get("cp_units"):
        parallel_worker.cp_checks(env.rank)
        results["cp_units"] = "ok"
        cpu["cp_units"] = time.process_time()
    if "meta" in spec:
        (path.parent / "meta").mkdir(exist_ok=True)
        meta_init_worker.run(spec["meta"], env, path.parent / "meta")
        cpu["meta"] = time.process_time()
    marks = list(cpu.values())
    results["cpu"] = {name: round(t - before, 2) for name, t, before in zip(cpu, marks, [0.0, *marks], strict=False)}
    if env.rank == 0:
        (path.parent / "result.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
