"""A torchrun worker for the parallel-layout tests: per model config, a one-process reference and the same model
placed on a layout train on the same batches in every rank; the largest differences (losses, gradients, gradient
norms, parameters, and after resuming a checkpoint on other layouts) as JSON. ``tests/parallel_layouts_worker.py``
runs a spec's ``parallel`` section through :func:`run_spec` in its own launch (``tests/test_parallel_layouts.py``);
run alone as ``python -m torch.distributed.run --nproc-per-node N -m tests.parallel_worker SPEC.json``."""

from __future__ import annotations

import copy
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from kunlunbaize.arch import get_arch
from kunlunbaize.checkpoint.state import load_checkpoint, save_checkpoint
from kunlunbaize.train.distributed import init_distributed
from kunlunbaize.train.optim import build_optimizer
from kunlunbaize.train.parallel.layout import resolve_layout
from kunlunbaize.train.parallel.mesh import StepContext, build_mesh, context_parallel, data_parallel, tensor_parallel
from kunlunbaize.train.step import train_step

from .helpers import build, tiny

SPEC = get_arch("kunlunbaize")


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def place(model, layout_sizes, env):
    """``model`` placed on the layout ``(dp_replicate, dp_shard, tp)`` or ``(dp_replicate, dp_shard, cp, tp)``
    (``None``: left a plain one-process model)."""
    if layout_sizes is None:
        return model, {"logits": False}, nullcontext(), None
    rep, shard, cp, tp = layout_sizes if len(layout_sizes) == 4 else (*layout_sizes[:2], 1, layout_sizes[2])
    layout = resolve_layout(env.world_size, "auto", rep, shard, tp, cp)
    mesh = build_mesh(layout, env)
    placed = tensor_parallel(model, SPEC, layout, mesh)
    context_parallel(placed, SPEC, layout, mesh)
    data_parallel(placed, list(model.blocks), layout, mesh, env)
    return placed.wrapped, placed.loss_kwargs, StepContext(nullcontext, *placed.loss_contexts), layout


def micro_batches(batch: torch.Tensor, accum: int, layout, rank: int) -> list[torch.Tensor]:
    """This rank's micro-batches of a global ``batch``, as the trainer's plan deals them (by data-parallel rank)."""
    dp, dp_rank = (1, 0) if layout is None else (layout.dp, layout.dp_rank(rank))
    micro = batch.shape[0] // (dp * accum)
    return [batch[(m * dp + dp_rank) * micro:(m * dp + dp_rank + 1) * micro] for m in range(accum)]


def max_diff(ref, par) -> float:
    return max((p - full(q).detach()).abs().max().item() for p, q in zip(ref.parameters(), par.parameters(),
                                                                           strict=True))


def compare(cfg, sizes, spec, env, tmp: Path, resume: bool, recompute: bool) -> dict:
    """Train a reference and a copy placed on the layout ``sizes`` side by side; return the largest differences
    seen (and, with ``resume``, those of the next step after resuming on each layout of ``spec["resume_on"]``)."""
    ref = build(cfg, seed=0).train()
    ref.gradient_checkpointing = recompute
    par = copy.deepcopy(ref)
    model, kwargs, ctx, layout = place(par, sizes, env)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"]), generator=gen)
               for _ in range(spec["steps"] + 1)]
    out = {"loss": 0.0, "grad": 0.0, "grad_norm": 0.0, "param": 0.0}
    # gradients of one backward, before any step
    ref(batches[0], labels=batches[0], logits=False).loss.backward()
    (x,) = micro_batches(batches[0], 1, layout, env.rank)
    with ctx:
        model(x, labels=x, **kwargs).loss.backward()
    out["grad"] = max((p.grad - full(q.grad)).abs().max().item() for p, q in zip(ref.parameters(), par.parameters(),
                                                                                 strict=True))
    opt_ref, opt_par = build_optimizer(ref, 1e-2), build_optimizer(par, 1e-2)
    opt_ref.zero_grad(set_to_none=True)
    opt_par.zero_grad(set_to_none=True)
    for step in range(spec["steps"]):
        a = train_step(ref, opt_ref, micro_batches(batches[step], spec["accum"], None, 0), grad_clip=1.0,
                       loss_kwargs={"logits": False})
        b = train_step(model, opt_par, micro_batches(batches[step], spec["accum"], layout, env.rank), grad_clip=1.0,
                       autocast=ctx, loss_kwargs=kwargs, env=env)
        out["loss"] = max(out["loss"], (a.losses - b.losses).abs().max().item())
        out["grad_norm"] = max(out["grad_norm"], abs(a.grad_norm.item() - b.grad_norm.item()))
        out["param"] = max(out["param"], max_diff(ref, par))
    if resume:
        out["resume"] = resume_elsewhere(cfg, spec, env, tmp, par, opt_par, ref, opt_ref, batches[-1])
    return out


def resume_elsewhere(cfg, spec, env, tmp: Path, par, opt_par, ref, opt_ref, batch) -> dict:
    """Save the placed model's checkpoint, load it on each layout of ``spec["resume_on"]`` and take the next step
    there: its loss and parameters against the reference's next step."""
    state = {"step": spec["steps"], "consumed_samples": 0, "tokens": 0}
    ckpt = save_checkpoint(tmp, spec["steps"], par, opt_par, state, None, keep_last=0)
    want = train_step(ref, opt_ref, micro_batches(batch, spec["accum"], None, 0), grad_clip=1.0,
                      loss_kwargs={"logits": False})
    diffs = {}
    for sizes in spec["resume_on"]:
        fresh = build(cfg, seed=99).train()  # other weights: the checkpoint must overwrite them
        model, kwargs, ctx, layout = place(fresh, sizes, env)
        opt = build_optimizer(fresh, 1e-2)
        load_checkpoint(ckpt, fresh, opt)
        got = train_step(model, opt, micro_batches(batch, spec["accum"], layout, env.rank), grad_clip=1.0,
                         autocast=ctx, loss_kwargs=kwargs, env=env if layout is not None else None)
        diffs[str(sizes)] = {"loss": (want.losses - got.losses).abs().max().item(), "param": max_diff(ref, fresh)}
    return diffs


def cp_checks(rank: int) -> None:
    """Context parallelism's pieces on the 2 gloo ranks of the job's process group: the sequence split and gather,
    the attention over gathered keys/values (GQA, global causal mask) and the causal convolutions with their halos
    (kernel 7 over chunks of 4 tokens, so a halo spans two earlier chunks; kernel 3; kernel 1) equal the
    whole-sequence computation, outputs and gradients (inputs' and parameters'), also over packed documents."""
    from kunlunbaize.model.attention import Attention
    from kunlunbaize.model.layers import CausalDSConv, RotaryEmbedding
    from kunlunbaize.train.parallel.context import ContextGroup, attention_forward, conv_forward

    torch.manual_seed(0)
    B, T, d = 2, 16, 32
    cp = ContextGroup(dist.group.WORLD, rank, 2)
    assert cp.positions(T, torch.device("cpu")).tolist() == ([0, 1, 2, 3, 12, 13, 14, 15] if rank == 0
                                                             else [4, 5, 6, 7, 8, 9, 10, 11])
    x = torch.randn(B, T, d)
    assert torch.equal(cp.gather(cp.shard(x), 1), x)
    rope = RotaryEmbedding(8, 10000.0)
    attn = Attention(d, n_heads=4, n_kv_heads=2)
    pos = cp.positions(T, x.device)
    _same_as_whole(cp, attn, x, lambda m, t: m(t, t, rope(torch.arange(T)), rope(torch.arange(T))),
                   lambda m, t: attention_forward(m, cp, t, t, rope(pos), rope(pos)))
    for k in (7, 3, 1):
        conv = CausalDSConv(d, k, per_channel=True)
        _same_as_whole(cp, conv, x, lambda m, t: m(t), lambda m, t: conv_forward(m, m.forward, cp, t))
    _packed_documents(cp, attn, x, rope)


def _packed_documents(cp, attn, x, rope) -> None:
    """The same with packed documents (``--doc-mask``), documents starting on a chunk start (4, 8) and inside
    chunks (6, 13; 2, 9): attention under the documents' rows of the mask at positions within each document, and
    the convolutions' halos cut at document starts."""
    from kunlunbaize.model.documents import Documents
    from kunlunbaize.model.layers import CausalDSConv
    from kunlunbaize.train.parallel.context import attention_forward, conv_forward

    T, d = x.shape[1], x.shape[2]
    starts = torch.zeros(2, T, dtype=torch.long)
    starts[0, [4, 6, 13]] = starts[1, [2, 8, 9]] = 1
    docs = Documents(starts.cumsum(1))
    pos, dp = cp.positions(T, x.device), docs.positions
    _same_as_whole(cp, attn, x, lambda m, t: m(t, t, rope(dp), rope(dp), 0, 0, None, docs.mask),
                   lambda m, t: attention_forward(m, cp, t, t, rope(dp[:, pos]), rope(dp[:, pos]),
                                                  mask=docs.rows_mask(pos)))
    for k in (7, 3, 1):
        conv = CausalDSConv(d, k, per_channel=True)
        _same_as_whole(cp, conv, x, lambda m, t: m(t, doc_positions=dp),
                       lambda m, t: conv_forward(m, m.forward, cp, t, doc_positions=dp[:, pos]))


def _same_as_whole(cp, module, x, whole, split) -> None:
    """``split`` on this rank's part equals ``whole`` on the sequence: outputs, input and parameter gradients."""
    w = torch.randn_like(x)  # a loss that weighs every output differently
    x1, x2 = x.clone().requires_grad_(), cp.shard(x).requires_grad_()
    ref = whole(module, x1)
    (ref * w).sum().backward()
    ref_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    out = split(module, x2)
    (out * cp.shard(w)).sum().backward()
    assert (out - cp.shard(ref)).abs().max() < 1e-5, (out - cp.shard(ref)).abs().max()
    assert (x2.grad - cp.shard(x1.grad)).abs().max() < 1e-5
    for p, g in zip(module.parameters(), ref_grads, strict=True):
        total = p.grad.clone()
        dist.all_reduce(total)  # each rank's share of the parameter gradient
        assert (total - g).abs().max() < 1e-5, (type(module).__name__, (total - g).abs().max())
    module.zero_grad()


def run_spec(spec: dict, env) -> dict:
    """Every config of ``spec`` on every layout of it; the first config's checkpoint on each layout ``L`` resumed on
    the layouts ``spec["resume_on"][str(L)]``."""
    resume_on = spec.get("resume_on") or {}
    results = {}
    for i, overrides in enumerate(spec["configs"]):
        overrides = dict(overrides)
        recompute = overrides.pop("activation_checkpointing", False)
        cfg = tiny(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
        for j, sizes in enumerate(spec["layouts"]):
            key = f"{json.dumps(overrides)} {sizes}" + (" recompute" if recompute else "")
            on = resume_on.get(str(sizes)) if i == 0 else None
            results[key] = compare(cfg, sizes, {**spec, "resume_on": on}, env, Path(spec["out"]) / f"ckpt{i}_{j}",
                                   resume=bool(on), recompute=recompute)
    return results


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    env = init_distributed("cpu")
    results = run_spec(spec, env)
    if env.rank == 0:
        (Path(spec["out"]) / "result.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
