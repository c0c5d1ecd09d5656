"""The paper's LR schedule and batch ramp at their breakpoints; weight-decay groups."""

import itertools

import pytest
import torch

from kunlunbaize import KunlunBaize
from kunlunbaize.train.optim import decays, param_groups
from kunlunbaize.train.schedule import PAPER_TOKENS, BatchRamp, LRSchedule

from .conftest import tiny

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
