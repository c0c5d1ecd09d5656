"""A torchrun worker for ``tests/test_meta_init.py``: per layout, the tiny model built on the meta device and placed
by the trainer's own ``runner.place`` (which materialises only what this rank holds); rank 0 saves the step-0 full
state dict of each layout and the one after loading whole weights into it (``Runner.load_weights``, what
``--init-from`` does); every rank records which of the one-process model's parameters it allocated and the losses
of two training steps from the step-0 weights. ``tests/parallel_layouts_worker.py`` runs a spec's ``meta`` section
through :func:`run` in its own launch (``tests/test_parallel_layouts.py``); run alone as
``python -m torch.distributed.run --nproc-per-node N -m tests.meta_init_worker SPEC.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from kunlunbaize.arch import get_arch
from kunlunbaize.config import ModelConfig
from kunlunbaize.train.config import TrainConfig
from kunlunbaize.train.distributed import init_distributed
from kunlunbaize.train.models import build, materialize
from kunlunbaize.train.parallel.layout import resolve_layout
from kunlunbaize.train.runner import ModelRunner, place

SPEC = get_arch("kunlunbaize")


def step0_weights(runner) -> dict[str, torch.Tensor]:
    """A copy of the whole model's weights under one-process names (on rank 0; a collective)."""
    if isinstance(runner, ModelRunner):
        sd = get_model_state_dict(runner.model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().cpu().clone() for k, v in sd.items()}  # a replicated tensor's is the parameter itself
    return {k: v.clone() for k, v in runner.state.full_weights().items()}


def batches(cfg: ModelConfig) -> list[torch.Tensor]:
    """Two micro-batches of one sequence, the same on every rank (so every layout's step is one process's)."""
    return list(torch.randint(0, cfg.vocab_size, (2, 1, 16), generator=torch.Generator().manual_seed(3)))


def run(spec: dict, env, folder: Path) -> None:
    """Every layout of ``spec`` (on all of the job's ranks): rank 0 saves ``NAME.pt`` and ``NAME_loaded.pt`` in
    ``folder``, every rank ``heldRANK.json``."""
    cfg = ModelConfig.from_dict(spec["model"])
    held, steps = {}, {}
    for name, sizes in spec["layouts"].items():
        tcfg = TrainConfig(seed=spec["seed"], seq_len=16, micro_batch_size=2, batch_size=4, tokens=64)
        model = build(SPEC, cfg, meta=True)
        layout = resolve_layout(env.world_size, "auto", *sizes)
        runner = place(tcfg, env, model, SPEC, layout, "fp32")
        held[name] = sorted(n for n, p in model.named_parameters() if not p.is_meta)
        weights = step0_weights(runner)
        steps[name] = [runner.step(batches(cfg), grad_clip=1.0).losses.tolist() for _ in range(2)]  # FSDP2 lazy init
        other = build(SPEC, cfg, meta=True)  # what an --init-from stage loads: whole weights, here another seed's
        materialize(other, torch.device("cpu"), spec["seed"] + 1)
        runner.load_weights(other.state_dict())
        loaded = step0_weights(runner)
        if env.rank == 0:
            torch.save(weights, folder / f"{name}.pt")
            torch.save(loaded, folder / f"{name}_loaded.pt")
    (folder / f"held{env.rank}.json").write_text(json.dumps({"held": held, "steps": steps}))
    dist.barrier()


def main() -> None:
    path = Path(sys.argv[1])
    env = init_distributed("cpu")
    run(json.loads(path.read_text()), env, path.parent)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
