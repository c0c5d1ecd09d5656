"""The paper's LR schedule and batch ramp at their breakpoints; weight-decay groups."""

import itertools

import pytest
import torch

from kunlunbaize import KunlunBaize
from kunlunbaize.train.optim import decays, param_groups
from kunlunbaize.train.schedule import PAPER_TOKENS, BatchRamp, LRSchedule

from .helpers import tiny

T = PAPER_TOKENS


def test_lr_schedule_at_paper_breakpoints():
    s = LRSchedule()  # paper defaults: peak 2.2e-4, 2000 warm-up steps
    assert s(0, 0.0) == pytest.approx(2.2e-4 / 2000)
    assert s(999, 0.0) == pytest.approx(2.2e-4 * 1000 / 2000)
    assert s(1999, 0.0) == pytest.approx(2.2e-4)
    assert s(5000, 5e12 / T) == pytest.approx(2.2e-4)  # constant until 10T
    assert s(10**6, 10e12 / T - 1e-9) == pytest.approx(2.2e-4)
    assert s(10**6, 10.9e12 / T) == pytest.approx(2.2e-5 + (2.2e-4 - 2.2e-5) * 0.5, rel=1e-6)  # cosine midpoint
    assert s(10**6, 11.8e12 / T - 1e-12) == pytest.approx(2.2e-5, rel=1e-4)  # cosine ends at 10% of peak
    assert s(10**6, 11.9e12 / T) == pytest.approx(2.2e-5)  # constant 2.2e-5 for 333B tokens
    assert s(10**6, (11.8e12 + 333e9) / T - 1e-9) == pytest.approx(2.2e-5)
    assert s(10**6, (11.8e12 + 334e9) / T) == pytest.approx(7.3e-6)  # last 167B tokens
    assert s(10**6, 1.0) == pytest.approx(7.3e-6)


def test_lr_schedule_is_monotone_after_warmup():
    s = LRSchedule(peak=1.0, warmup_steps=0)
    values = [s(10, f / 1000) for f in range(1001)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_batch_ramp_values():
    r = BatchRamp()  # 3072 -> 15360 sequences over the first 469B tokens
    assert r(0.0) == 3072
    assert r(469e9 / T / 2) == (3072 + 15360) // 2
    assert r(469e9 / T) == 15360
    assert r(0.9) == 15360
    r = BatchRamp(start=3, end=16, ramp=0.5, granularity=4)  # whole micro-batches on every rank
    assert [r(f) for f in (0.0, 0.25, 0.49, 0.5)] == [4, 8, 12, 16]
    with pytest.raises(ValueError):
        BatchRamp(start=1, end=2, granularity=4)


def test_weight_decay_groups():
    model = KunlunBaize(tiny())
    groups = param_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        expect = p.dim() >= 2  # matrices (linear, embedding, conv) only
        assert (id(p) in decayed) == expect, name
        if name.endswith("beta") or "dense.logits" in name or "norm" in name:
            assert id(p) not in decayed, name
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert not decays("x.norm.weight", torch.zeros(3, 3))  # a 2-D norm scale would still be exempt


def test_dense_lr_mult_scales_only_the_dense_logits_step():
    """With dense_lr_mult the dense-residual logits get their own group: Adam's first step moves them by
    lr × mult (the sign of the gradient), every other parameter exactly as with the shared learning rate."""
    from kunlunbaize.train.optim import build_optimizer
    from kunlunbaize.train.trainer import TrainConfig

    moved = {}
    for mult in (1.0, 10.0):
        torch.manual_seed(0)
        model = KunlunBaize(tiny(n_layers=3))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(model, 1e-3, dense_lr_mult=mult)
        assert len(opt.param_groups) == (2 if mult == 1.0 else 3)
        for group in opt.param_groups:  # as the trainer sets the scheduled LR
            group["lr"] = 1e-3 * group.get("lr_mult", 1.0)
        x = torch.randint(0, 61, (2, 12))
        model(x, labels=x).loss.backward()
        opt.step()
        moved[mult] = {n: (p.detach() - before[n]) for n, p in model.named_parameters()}
    for name, delta in moved[10.0].items():
        want = moved[1.0][name] * (10.0 if "dense.logits" in name else 1.0)
        assert torch.allclose(delta, want, atol=1e-7, rtol=1e-4), name
    assert moved[10.0]["dense.logits.2"].abs().max() == pytest.approx(1e-2, rel=1e-3)
    with pytest.raises(ValueError, match="dense_lr_mult"):
        TrainConfig(dense_lr_mult=0.0).validate()
