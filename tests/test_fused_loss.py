"""The chunked linear cross-entropy: the same loss and gradients as the logits path, without storing logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kunlunbaize.model.fused_loss import linear_cross_entropy

from .helpers import build, config_id, switch_configs


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(chunk):
    torch.manual_seed(0)
    h = torch.randn(2, 37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (2, 37))
    t[0, :5] = -100
    ref = F.cross_entropy((h @ w.t()).reshape(-1, 50), t.reshape(-1), ignore_index=-100)
    (ref * 1.7).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, t, chunk=chunk)
    (got * 1.7).backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)


def test_without_gradients_the_loss_is_the_same():
    torch.manual_seed(0)
    h, w = torch.randn(30, 8), torch.randn(12, 8)
    t = torch.randint(0, 12, (30,))
    t[:3] = -100
    with torch.no_grad():
        got = linear_cross_entropy(h, w, t, chunk=7)
    torch.testing.assert_close(got, F.cross_entropy(h @ w.t(), t, ignore_index=-100))


def test_no_valid_target_is_a_zero_loss_with_zero_gradients():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


@pytest.mark.slow
@pytest.mark.parametrize("cfg", switch_configs(), ids=config_id)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
def test_the_model_loss_without_logits_equals_the_logits_path_for_every_switch(cfg, padded):
    model = build(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (3, 20))
    labels = ids.clone()
    labels[0, :4] = -100
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        labels[1, :5] = -100
    ref = model(ids, labels=labels, attention_mask=mask)
    ref.loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got = model(ids, labels=labels, attention_mask=mask, logits=False)
    got.loss.backward()
    assert got.logits is None and got.mtp_logits == []  # nothing [B, T, V] was kept
    torch.testing.assert_close(got.loss, ref.loss)
    torch.testing.assert_close(got.main_loss, ref.main_loss)
    for a, b in zip(got.mtp_losses, ref.mtp_losses, strict=True):
        torch.testing.assert_close(a, b)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_logits_false_needs_labels_and_no_cache():
    model = build(switch_configs()[0])
    ids = torch.randint(0, 61, (1, 5))
    with pytest.raises(ValueError, match="labels"):
        model(ids, logits=False)
