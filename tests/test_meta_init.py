"""Training at any scale (issue 29): the model is built on the meta device, placed (FSDP2 shards, tensor-parallel
DTensors, pipeline stages), and only then is what each rank holds allocated and initialised, each parameter drawn
from a generator seeded by (run seed, its one-process name): the step-0 weights are the same under every layout, and
a pipeline rank never allocates another stage's parameters. The real ranks' side (FSDP2 dp2, tp2, pp2, dp2 x tp2,
pp2 x dp2) runs in ``tests/test_parallel_layouts.py``'s 2- and 4-rank launches, which pay the ranks' start-up once
for all of that file's checks; it asserts with :func:`assert_same_weights`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kunlunbaize import KunlunBaize
from kunlunbaize.arch import get_arch
from kunlunbaize.model.init import init_weights
from kunlunbaize.train.config import TrainConfig
from kunlunbaize.train.distributed import DistEnv
from kunlunbaize.train.models import build, is_meta, materialize
from kunlunbaize.train.parallel.layout import resolve_layout
from kunlunbaize.train.parallel.pipeline_stages import build_stage_modules
from kunlunbaize.train.runner import place

from .helpers import tiny

SPEC = get_arch("kunlunbaize")
SEED = 7
MODEL = {"n_layers": 4, "dense_init": "identity", "conv_init": "fan_in", "eswish_per_channel": True}


def one_process(cfg, seed: int = SEED, steps: int = 0) -> dict[str, torch.Tensor]:
    """The step-0 weights of a one-process run: the trainer's own path (meta build, ``place``); with ``steps``,
    also the losses of that many training steps on the worker's batches (under ``"steps"``)."""
    from .meta_init_worker import batches

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = build(SPEC, cfg, meta=True)
    assert is_meta(model)
    runner = place(TrainConfig(seed=seed), env, model, SPEC, resolve_layout(1), "fp32")
    assert not is_meta(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    if steps:
        weights["steps"] = [runner.step(batches(cfg), grad_clip=1.0).losses.tolist() for _ in range(steps)]
    return weights


def test_one_process_training_initialises_every_parameter_by_its_name():
    """The one-process run's weights are :func:`init_weights` of the run seed: another seed gives others, and two
    tensors of one shape under different names differ; a model built on the CPU and initialised by name is equal."""
    cfg = tiny(**MODEL)
    weights = one_process(cfg)
    reference = KunlunBaize(cfg)
    init_weights(reference, SEED, cfg.init_std)
    assert weights.keys() == reference.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in reference.state_dict().items())
    other = one_process(cfg, seed=SEED + 1)
    assert not torch.equal(weights["embed.weight"], other["embed.weight"])
    assert not torch.equal(weights["blocks.0.attn.wq.weight"], weights["blocks.1.attn.wq.weight"])


def test_the_named_initialisation_keeps_what_each_tensor_starts_at():
    """Per-name draws change only which random numbers a weight gets: the same deterministic tensors (norms, eSwish
    β, identity dense-residual logits, rotary tables) as the module-order initialiser, weights of the same spread."""
    cfg = tiny(**MODEL, d_model=64, vocab_size=512)
    torch.manual_seed(0)
    old = KunlunBaize(cfg)
    with torch.device("meta"):
        new = KunlunBaize(cfg)
    materialize(new, torch.device("cpu"), SEED)
    for (name, a), b in zip(old.state_dict().items(), new.state_dict().values(), strict=True):
        if "norm" in name or name.endswith("beta") or name.startswith("dense."):
            assert torch.equal(a, b), name
        else:  # N(0, init_std), or the fan-in std of the convolutions
            assert abs(a.std().item() / b.std().item() - 1) < 0.25, name
    assert torch.equal(old.rope.inv_freq, new.rope.inv_freq)
    assert new.embed.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)


def test_a_pipeline_stage_materialised_alone_has_the_one_process_weights():
    """Cut from a model on the meta device, the last of two stages is allocated and initialised alone: its weights
    are the one-process model's, names included, and the first stage's blocks are never allocated."""
    cfg = tiny(**MODEL)
    weights = one_process(cfg)
    model = build(SPEC, cfg, meta=True)
    (stage,) = build_stage_modules(model, 2, indices=[1])
    materialize(stage, torch.device("cpu"), SEED)
    own = stage.state_dict()
    assert {"blocks.2.attn.wq.weight", "norm.weight", "embed.weight", "dense.logits.3"} <= own.keys()
    assert all(torch.equal(v, weights[k]) for k, v in own.items())
    assert all(p.is_meta for n, p in model.named_parameters() if n.startswith(("blocks.0.", "blocks.1.")))


def assert_same_weights(folder: Path, names: list[str]) -> None:
    """Each layout's step-0 weights in ``folder`` (``tests/meta_init_worker.py``'s files) are the one-process run's,
    its first two training steps give the one-process losses, and whole weights loaded into it (another seed's) come
    back exactly."""
    want = one_process(tiny(**MODEL), steps=2)["steps"]
    for name in names:
        got = json.loads((folder / "held0.json").read_text())["steps"][name]
        assert max(abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)) < 1e-5, \
            (name, got, want)
    for suffix, seed in (("", SEED), ("_loaded", SEED + 1)):
        weights = one_process(tiny(**MODEL), seed)
        for name in names:
            placed = torch.load(folder / f"{name}{suffix}.pt")
            assert placed.keys() == weights.keys(), name
            assert all(torch.equal(placed[k], v) for k, v in weights.items()), name + suffix
