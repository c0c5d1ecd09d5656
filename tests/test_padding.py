"""Left padding: every row of a padded batch computes what it would alone (full forward and cached)."""

import pytest
import torch

from .helpers import build, config_id, switch_configs

CONFIGS = switch_configs()[::2]
TOL = 1e-5


def padded_batch(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("cfg", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_left_padded_forward_equals_each_row_alone(cfg):
    model = build(cfg)
    rows = [torch.randint(1, cfg.vocab_size, (n,)) for n in (13, 5, 9)]
    ids, mask = padded_batch(rows)
    T = ids.shape[1]
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        for b, r in enumerate(rows):
            alone = model(r[None])
            pad = T - len(r)
            assert (out.logits[b, pad:] - alone.logits[0]).abs().max() <= TOL
            for a, ref in zip(out.mtp_logits, alone.mtp_logits, strict=True):
                assert (a[b, pad:] - ref[0]).abs().max() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_left_padded_cached_decoding_equals_each_row_alone(cfg):
    model = build(cfg)
    rows = [torch.randint(1, cfg.vocab_size, (n,)) for n in (11, 4)]
    cont = torch.randint(1, cfg.vocab_size, (2, 6))  # six more tokens per row, fed one by one
    ids, mask = padded_batch(rows)
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        steps = [model(ids, cache=cache, attention_mask=mask).logits[:, -1]]
        steps += [model(cont[:, i:i + 1], cache=cache).logits[:, -1] for i in range(cont.shape[1])]
        for b, r in enumerate(rows):
            full = model(torch.cat([r, cont[b]])[None]).logits[0]
            expect = full[len(r) - 1:]
            got = torch.stack([s[b] for s in steps])
            assert (got - expect).abs().max() <= TOL


def test_bad_attention_mask_shape():
    model = build(CONFIGS[0])
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
