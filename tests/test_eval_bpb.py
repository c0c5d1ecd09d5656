"""Bits per byte: the byte table, agreement with a direct computation, a uniform model, learning, the errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kunlunbaize.checkpoint import load_tokenizer
from kunlunbaize.data.format import DataError, open_split
from kunlunbaize.eval.bpb import TokenStream, _windows, bits_per_byte, byte_length_table, evaluate_bpb
from kunlunbaize.infer.load import load_model

TEXTS = ["def f(x):\n    return x + 1\n", "春眠不觉晓，处处闻啼鸟。", "emoji 🙂🚀 and ZWJ 👩‍👩‍👧",
         "café naïve Ærø Łódź",
         "  tabs\tand\r\nnewlines\n\n", "mixed 中文 text ünïcödé 🎉 end"]


@pytest.fixture(scope="module")
def tokenizer(dataset):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(dataset / "tokenizer.json"))


@pytest.fixture(scope="module")
def model_and_tok(trained_run):
    model, ckpt = load_model(trained_run)
    tok, eot = load_tokenizer(ckpt, model.config.vocab_size)
    return model, tok, eot


@pytest.mark.parametrize("text", TEXTS)
def test_byte_table_sums_to_utf8_length(tokenizer, text):
    table = byte_length_table(tokenizer)
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text  # byte-level: exact round trip
    assert int(table[ids].sum()) == len(text.encode("utf-8"))


def test_byte_table_special_tokens_count_zero(tokenizer, dataset):
    table = byte_length_table(tokenizer)
    eot = json.loads((dataset / "meta.json").read_text())["eot_id"]
    assert table[eot] == 0
    assert table.shape == (tokenizer.get_vocab_size(),)
    assert (table[:256] >= 1).sum() >= 250  # the byte alphabet: one byte each (most ids)


def test_windows_score_every_position_once():
    for n, seq_len, stride in [(10, 4, 4), (11, 4, 2), (3, 8, 8), (25, 5, 1), (9, 4, 3)]:
        scored = []
        for start, end, k in _windows(n, seq_len, stride):
            assert end - start <= seq_len + 1 and 1 <= k <= end - start - 1
            scored.extend(range(end - k, end))
        assert scored == list(range(1, n))


def _direct(model, ids: np.ndarray, seq_len: int, tok) -> tuple[float, int]:
    """Summed cross-entropy from model(ids).logits window by window, and bytes from decoding the targets."""
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, seq_len):
            w = torch.from_numpy(ids[s:s + seq_len + 1].astype(np.int64))[None]
            logits = model(w[:, :-1]).logits
            nats += float(F.cross_entropy(logits[0], w[0, 1:], reduction="sum"))
    text = tok.decode(ids[1:].tolist(), skip_special_tokens=True)
    return nats, len(text.encode("utf-8"))


def test_bpb_matches_direct_computation(model_and_tok, dataset):
    model, tok, _ = model_and_tok
    ids = np.concatenate([np.asarray(s) for s in open_split(dataset, "val")])[:150].astype(np.int64)
    nats, n_bytes = _direct(model, ids, 32, tok)
    res = bits_per_byte(model, [ids[:70], ids[70:]], byte_length_table(tok), seq_len=32, batch_size=3)
    assert res.tokens == len(ids) - 1 and res.windows == math.ceil((len(ids) - 1) / 32)
    assert res.bytes == n_bytes
    assert res.nats == pytest.approx(nats, rel=1e-5)
    assert res.bpb == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-5)
    assert res.bytes_per_token == pytest.approx(n_bytes / (len(ids) - 1))


def test_stride_gives_more_context_and_same_targets(model_and_tok, dataset):
    model, tok, _ = model_and_tok
    ids = np.asarray(open_split(dataset, "val")[0][:120]).astype(np.int64)
    table = byte_length_table(tok)
    plain = bits_per_byte(model, ids, table, seq_len=32)
    slid = bits_per_byte(model, ids, table, seq_len=32, stride=8, batch_size=4)
    assert (slid.tokens, slid.bytes) == (plain.tokens, plain.bytes)
    assert slid.windows > plain.windows and slid.nats != pytest.approx(plain.nats, rel=1e-6)


class _Uniform(torch.nn.Module):
    """A model whose logits are all zero: every token has probability 1/V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids, **_):
        return SimpleNamespace(logits=torch.zeros(*ids.shape, self.vocab))


@pytest.mark.parametrize("seq_len,stride,max_tokens", [(16, None, None), (7, 3, 50), (200, None, None)])
def test_uniform_model_bpb_is_log2_vocab_per_byte(tokenizer, seq_len, stride, max_tokens):
    table = byte_length_table(tokenizer)
    ids = np.asarray(tokenizer.encode(" ".join(TEXTS)).ids, dtype=np.int64)
    vocab = tokenizer.get_vocab_size()
    res = bits_per_byte(_Uniform(vocab), ids, table, seq_len=seq_len, stride=stride, max_tokens=max_tokens)
    n = len(ids) - 1 if max_tokens is None else max_tokens
    assert res.tokens == n and res.bytes == int(table[ids[1:n + 1]].sum())
    assert res.bpb == pytest.approx(math.log2(vocab) * res.tokens / res.bytes, rel=1e-6)
    assert res.perplexity == pytest.approx(vocab, rel=1e-6)


def test_trained_beats_random_init(trained_run, dataset):
    from kunlunbaize import KunlunBaize

    trained, ckpt = load_model(trained_run)
    torch.manual_seed(0)
    fresh = KunlunBaize(trained.config).eval()
    tok, _ = load_tokenizer(ckpt, trained.config.vocab_size)
    split = open_split(dataset, "val")
    table = byte_length_table(tok)
    good = bits_per_byte(trained, split, table, seq_len=32, max_tokens=2000)
    bad = bits_per_byte(fresh, split, table, seq_len=32, max_tokens=2000)
    assert good.bpb < bad.bpb - 0.3


def test_evaluate_bpb_fields(trained_run, dataset):
    out = evaluate_bpb(trained_run, dataset, max_tokens=500, progress=False)
    for key in ("checkpoint", "data", "split", "split_tokens", "tokens", "bytes", "nats", "bpb", "nats_per_token",
                "perplexity", "bytes_per_token", "seq_len", "stride", "windows"):
        assert key in out, key
    json.dumps(out)
    assert out["split"] == "val" and out["tokens"] == 500 and out["seq_len"] == 32 and out["stride"] == 32
    assert 0 < out["bpb"] < math.log2(320) * out["tokens"] / out["bytes"]  # better than uniform
    assert Path(out["checkpoint"]).is_dir()


def test_short_split_is_scored_as_one_window(trained_run, dataset):
    out = evaluate_bpb(trained_run, dataset, seq_len=64, max_tokens=10, progress=False)
    assert out["windows"] == 1 and out["tokens"] == 10
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate_bpb(trained_run, dataset, seq_len=10_000, progress=False)


def _copy_dataset(dataset: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    return out


def test_empty_split_is_a_clear_error(trained_run, dataset, tmp_path):
    ds = _copy_dataset(dataset, tmp_path)
    meta = json.loads((ds / "meta.json").read_text())
    meta["splits"]["val"] = {"tokens": 0, "shards": []}
    (ds / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="val-fraction"):
        evaluate_bpb(trained_run, ds, progress=False)


def test_mismatched_tokenizer_is_a_clear_error(trained_run, dataset, tmp_path):
    ds = _copy_dataset(dataset, tmp_path)
    tok = json.loads((ds / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]  # swap two ids: same size, different meaning
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (ds / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DataError, match="another tokenizer"):
        evaluate_bpb(trained_run, ds, progress=False)
    meta = json.loads((ds / "meta.json").read_text())
    meta["vocab_size"] = 512
    (ds / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="vocabulary of 512"):
        evaluate_bpb(trained_run, ds, progress=False)


def test_token_stream_spans_parts():
    s = TokenStream([np.arange(3), np.arange(3, 4), np.arange(4, 10)])
    assert len(s) == 10 and s.slice(2, 7).tolist() == [2, 3, 4, 5, 6]
    assert len(TokenStream([])) == 0
