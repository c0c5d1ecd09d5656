"""Incremental decoding with the cache equals the full forward; cropping and re-feeding does too."""

import pytest
import torch

from kunlunbaize.model import CacheOverflowError

from .helpers import build, config_id, switch_configs

CONFIGS = switch_configs()
TOL = 1e-5


def run_chunks(model, x, sizes, cache):
    """Feed ``x`` in chunks; return main logits and, per chunk, (start, end, mtp logits)."""
    logits, chunks, pos = [], [], cache.length
    for n in sizes:
        out = model(x[:, pos:pos + n], cache=cache)
        logits.append(out.logits)
        chunks.append((pos, pos + n, out.mtp_logits))
        pos += n
    return torch.cat(logits, 1), chunks


def check_mtp(model, x, chunks):
    # An incremental chunk's MTP logits equal the full forward over the prefix that ends with the chunk:
    # depth j at position i reads tokens up to i + j, and a chunk only knows the tokens fed so far.
    for start, end, mtp in chunks:
        ref = model(x[:, :end]).mtp_logits
        for a, b in zip(mtp, ref, strict=True):
            assert (a - b[:, start:end]).abs().max() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=[config_id(c) for c in CONFIGS])
@pytest.mark.parametrize("sizes", [[1] * 24, [5, 1, 7, 3, 8], [24]], ids=["token", "chunks", "whole"])
def test_incremental_equals_full(cfg, sizes):
    model = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 32)
        logits, chunks = run_chunks(model, x, sizes, cache)
        assert cache.length == 24
        assert (logits - full.logits).abs().max() <= TOL
        check_mtp(model, x, chunks)


@pytest.mark.parametrize("cfg", CONFIGS[::3], ids=[config_id(c) for c in CONFIGS[::3]])
def test_crop_and_refeed(cfg):
    model = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 20))
    other = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(1, 24)
        model(x[:, :12], cache=cache)
        model(other[:, 12:18], cache=cache)  # a wrong continuation (a rejected draft) ...
        cache.crop(12)  # ... rolled back
        logits, chunks = run_chunks(model, x, [3, 5], cache)
        assert (logits - full.logits[:, 12:]).abs().max() <= TOL
        check_mtp(model, x, chunks)


def test_cache_errors():
    cfg = CONFIGS[0]
    model = build(cfg)
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="exceed the context of 8"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="cannot crop"):
            cache.crop(7)
        with pytest.raises(ValueError, match="batch"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(1, cfg.max_seq_len + 1)
    assert issubclass(CacheOverflowError, ValueError)


def test_cache_without_mtp_state_decodes_the_same_and_refuses_to_draft():
    cfg = CONFIGS[1]
    assert cfg.mtp_depth > 0
    model = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2, 16, mtp=False)
        assert cache.mtp == []
        logits = torch.cat([model(x[:, i:i + 1], cache=cache, mtp=False).logits for i in range(16)], 1)
        assert (logits - full).abs().max() <= TOL
        cache.crop(8)
        with pytest.raises(ValueError, match="no MTP state"):
            model(x[:, 8:9], cache=cache)


def test_reorder_cache_keeps_the_chosen_rows():
    model = build(CONFIGS[0])
    x = torch.randint(0, CONFIGS[0].vocab_size, (3, 10))
    with torch.no_grad():
        cache = model.new_cache(3, 12)
        model(x[:, :9], cache=cache)
        cache.reorder_cache(torch.tensor([2, 2, 0]))
        step = model(x[[2, 2, 0], 9:], cache=cache).logits
        full = model(x[[2, 2, 0]]).logits[:, 9:]
    assert (step - full).abs().max() <= TOL
    assert cache.get_seq_length() == 10
