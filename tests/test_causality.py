"""Changing token t never changes main logits before t, nor MTP depth-j logits before t − j."""

import pytest
import torch

from .helpers import build, config_id, switch_configs

CONFIGS = switch_configs()


@pytest.mark.parametrize("cfg", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_causality(cfg):
    model = build(cfg)
    T = 20
    x = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        base = model(x)
        for t in (0, 7, T - 1):
            y = x.clone()
            y[:, t] = (y[:, t] + 1 + torch.randint(0, cfg.vocab_size - 1, (2,))) % cfg.vocab_size
            out = model(y)
            assert torch.equal(out.logits[:, :t], base.logits[:, :t])
            assert not torch.allclose(out.logits[:, t], base.logits[:, t])  # the change is seen at t
            for j, (a, b) in enumerate(zip(out.mtp_logits, base.mtp_logits, strict=True), start=1):
                if t - j > 0:
                    assert torch.equal(a[:, : t - j], b[:, : t - j]), f"depth {j} leaks token {t}"
                if t - j >= 0:
                    # position t − j reads token t (t_{i+j}) and must react to it: the mask is not too strict
                    assert not torch.allclose(a[:, t - j], b[:, t - j])
