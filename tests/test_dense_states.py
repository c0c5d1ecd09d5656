"""The trunk's dense residual (DenseStates: one buffer, a matrix-vector product per mix) computes eq. 1–2 exactly
as the reference (a multiply and an add per earlier output, autograd through each): loss and every gradient."""

import pytest
import torch

from kunlunbaize.model.dense_residual import DenseResidual, DenseStates, _DenseMix

from .helpers import build, tiny


class ReferenceStates:
    """H_0 … in a list, mixed by :meth:`DenseResidual.mix` (the reference)."""

    def __init__(self, dense: DenseResidual, first: torch.Tensor) -> None:
        self.dense, self.list = dense, [first]

    def append(self, h: torch.Tensor) -> None:
        self.list.append(h)

    def mix(self, layer: int, latest: torch.Tensor) -> torch.Tensor:
        assert latest is self.list[layer]
        return self.dense.mix(layer, self.list)


def loss_and_grads(model, x, reference: bool, monkeypatch, **kw):
    with monkeypatch.context() as m:
        if reference:
            m.setattr(DenseResidual, "states", lambda self, first: ReferenceStates(self, first))
        model.zero_grad(set_to_none=True)
        out = model(x, labels=x, **kw)
        out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("overrides", "kw"), [
    (dict(n_layers=1), {}),
    (dict(n_layers=2), {}),
    (dict(n_layers=5), {}),
    (dict(n_layers=4, transformerx=False, mtp_depth=0), {}),
    (dict(n_layers=4, dense_init="identity"), dict(logits=False)),
    (dict(n_layers=3, mtp_depth=1), dict(attention_mask="left-padded")),
])
@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_dense_states_equal_the_reference_mix(overrides, kw, checkpointing, monkeypatch):
    model = build(tiny(**overrides), seed=3).double()
    with torch.no_grad():  # weights away from their start, so every term of every mix matters
        for p in model.dense.logits:
            p.normal_()
    model.gradient_checkpointing = checkpointing
    model.train()
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    if kw.get("attention_mask") == "left-padded":
        mask = torch.ones_like(x)
        mask[0, :5] = 0
        kw = dict(attention_mask=mask)
    fast_loss, fast = loss_and_grads(model, x, False, monkeypatch, **kw)
    ref_loss, ref = loss_and_grads(model, x, True, monkeypatch, **kw)
    assert torch.allclose(fast_loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert fast.keys() == ref.keys() and any(n.startswith("dense.") for n in fast)
    for name in ref:
        assert torch.allclose(fast[name], ref[name], rtol=1e-9, atol=1e-12), name


def test_the_trunk_mixes_through_the_buffer(monkeypatch):
    """Proof the fast path runs: every mix is a _DenseMix node reading the shared buffer, and inference (no grad)
    gives the reference's logits."""
    model = build(tiny(n_layers=3), seed=1)
    calls = []
    original = DenseStates.mix

    def counting(self, layer, latest):
        out = original(self, layer, latest)
        calls.append(type(out.grad_fn).__name__ if out.grad_fn is not None else None)
        return out

    monkeypatch.setattr(DenseStates, "mix", counting)
    x = torch.randint(0, model.config.vocab_size, (1, 9))
    model(x, labels=x).loss.backward()
    assert calls == [_DenseMix.__name__ + "Backward"] * 3
    with torch.no_grad():
        fast = model(x).logits
    monkeypatch.setattr(DenseResidual, "states", lambda self, first: ReferenceStates(self, first))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, fast, atol=1e-5)


def test_mixing_out_of_order_is_refused():
    dense = DenseResidual(3)
    states = dense.states(torch.zeros(1, 2, 4))
    with pytest.raises(RuntimeError, match="needs H_0"):
        states.mix(1, torch.zeros(1, 2, 4))


def test_under_autocast_the_mix_stays_in_the_states_dtype(monkeypatch):
    """bf16 autocast (as `kunlun train --dtype bf16`) leaves the mix in float32 like the reference's elementwise ops."""
    model = build(tiny(n_layers=3), seed=2)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_loss, fast = loss_and_grads(model, x, False, monkeypatch)
        ref_loss, ref = loss_and_grads(model, x, True, monkeypatch)
    assert torch.allclose(fast_loss, ref_loss, rtol=1e-3)
    for name in ref:
        assert fast[name].dtype == ref[name].dtype
        assert torch.allclose(fast[name], ref[name], rtol=5e-2, atol=1e-4), name
