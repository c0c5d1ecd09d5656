"""`kunlun generate` on a trained checkpoint: plain == speculative greedy, stop strings, batches, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kunlunbaize.checkpoint import CheckpointError, load_tokenizer
from kunlunbaize.cli import main
from kunlunbaize.infer import generate, speculative_generate
from kunlunbaize.infer.load import load_model
from kunlunbaize.infer.text import TextStream


@pytest.fixture
def run(trained_run) -> Path:
    return trained_run


def cli(capsys, *args: str) -> tuple[str, str]:
    main(["generate", *args])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_checkpoint_loads_with_identical_logits(run):
    model, ckpt = load_model(run)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["tokens"] >= 32 * 8 * 20  # the whole budget was trained
    again, _ = load_model(ckpt)
    x = torch.randint(0, model.config.vocab_size, (1, 16))
    assert torch.equal(model(x).logits, again(x).logits)


@pytest.mark.slow
def test_speculative_greedy_equals_plain_on_a_trained_checkpoint(run):
    model, ckpt = load_model(run, dtype=torch.float64)
    tok, _ = load_tokenizer(ckpt, model.config.vocab_size)
    for text in ("def ", "import os\n", "class Heap:\n    "):
        ids = tok.encode(text).ids
        plain = generate(model, [ids], 30).tokens[0]
        for k in (1, 2):
            assert speculative_generate(model, ids, 30, draft_len=k).tokens[0] == plain


def test_generate_cli_plain_speculative_and_stop(run, capsys):
    out, err = cli(capsys, "def ", "--checkpoint", str(run), "--max-new-tokens", "24")
    assert out.startswith("def ") and "finished" in err
    spec, err2 = cli(capsys, "def ", "--checkpoint", str(run), "--max-new-tokens", "24", "--speculative")
    assert spec == out and "acceptance_depth_1" in err2
    small, _ = cli(capsys, "def ", "--checkpoint", str(run), "--max-new-tokens", "24", "--speculative", "--adaptive",
                   "--draft-vocab", "40")  # the training data's 40 most frequent tokens
    assert small == out
    body = out[len("def "):].rstrip("\n")
    if len(body) > 3:
        stop = body[1:3]
        cut, err3 = cli(capsys, "def ", "--checkpoint", str(run), "--max-new-tokens", "24", "--stop", stop)
        assert cut == "def " + body[: body.index(stop)] + "\n" and "stop" in err3


@pytest.mark.slow
def test_generate_cli_compile_gives_the_same_text(run, capsys, monkeypatch):
    """--compile decodes through a StaticDecoder (compiled here with the eager backend to keep the test fast; the
    inductor build is exercised by benchmarks/decode.py --compile and the GPU suite)."""
    import kunlunbaize.infer.static as static

    real, built = torch.compile, []

    def compile_eager(fn, **kw):
        built.append(kw)
        return real(fn, **{**kw, "backend": "eager"})

    monkeypatch.setattr(static.torch, "compile", compile_eager)
    out, _ = cli(capsys, "def ", "--checkpoint", str(run), "--max-new-tokens", "16")
    compiled, err = cli(capsys, "def ", "--checkpoint", str(run), "--max-new-tokens", "16", "--compile")
    assert compiled == out and "compiling" in err
    spec, _ = cli(capsys, "def ", "--checkpoint", str(run), "--max-new-tokens", "16", "--compile", "--speculative")
    assert spec == out
    batch, _ = cli(capsys, "import ", "x = [", "--checkpoint", str(run), "--max-new-tokens", "10")
    assert cli(capsys, "import ", "x = [", "--checkpoint", str(run), "--max-new-tokens", "10", "--compile")[0] == batch
    tuned, _ = cli(capsys, "def ", "--checkpoint", str(run), "--max-new-tokens", "16", "--compile-mode", "max-autotune")
    assert tuned == out
    # each of the 4 decoders wraps its verification/decoding step, its drafting step and its prompt fill (only the
    # ones called are traced); max-autotune on a CPU is inductor settings (StaticDecoder's CPU_MAX_AUTOTUNE), not
    # torch.compile's mode
    assert len(built) == 12 and all(kw["fullgraph"] and kw["dynamic"] is False for kw in built)
    assert [kw["mode"] for kw in built] == [None] * 12


def test_generate_cli_batch_matches_single(run, capsys):
    batch, _ = cli(capsys, "import ", "x = [", "--checkpoint", str(run), "--max-new-tokens", "10")
    single, _ = cli(capsys, "x = [", "--checkpoint", str(run), "--max-new-tokens", "10")
    assert single.rstrip("\n") in batch


def test_generate_cli_errors(run, tmp_path, capsys):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        main(["generate", "x", "--checkpoint", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="fit the context"):
        main(["generate", "word " * 200, "--checkpoint", str(run), "--max-new-tokens", "8"])
    main(["generate", "word " * 200, "--checkpoint", str(run), "--max-new-tokens", "8", "--truncate"])
    with pytest.raises(SystemExit) as usage:  # a usage error: exit status 2, the message on stderr
        main(["generate", "x", "--checkpoint", str(run), "--draft-vocab", "40"])
    assert usage.value.code == 2 and "apply to --speculative" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"cannot count tokens of .*give --draft-data"):
        main(["generate", "x", "--checkpoint", str(run), "--speculative", "--draft-vocab", "40",
              "--draft-data", str(tmp_path / "nodata")])
    with pytest.raises(SystemExit, match="exceeds the vocabulary of"):
        main(["generate", "x", "--checkpoint", str(run), "--speculative", "--draft-vocab", "100000"])
    with pytest.raises(SystemExit, match="empty prompt"):
        main(["generate", "", "--checkpoint", str(run)])
    bad = tmp_path / "bad"
    shutil.copytree(load_model(run)[1], bad)
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SystemExit, match="damaged"):
        main(["generate", "x", "--checkpoint", str(bad)])
    other = tmp_path / "other"
    shutil.copytree(load_model(run)[1], other)
    cfg = json.loads((other / "config.json").read_text())
    with pytest.raises(CheckpointError, match="not trained together"):
        load_tokenizer(other, cfg["vocab_size"] + 1)


class _Chars:
    """A stand-in tokenizer: token i is the character chr(i)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))


def test_text_stream_never_shows_a_stop_string():
    shown = []
    stream = TextStream(_Chars(), 1, stop=["END"], write=lambda row, t: shown.append(t))
    tokens = []
    for ch in "abc ENxEND tail":
        tokens.append(ord(ch))
        if stream.update(0, tokens):
            break
    assert stream.finish(0, tokens) == "abc ENx"
    assert "".join(shown) == "abc ENx"


def test_the_sample_after_training_is_sampled_reproducible_and_what_generate_gives(run, dataset, capsys):
    """`kunlun train`'s sample draws with a repetition penalty and a fixed seed; the header names the options
    with which `kunlun generate --speculative` prints the same text."""
    from kunlunbaize.infer.sample import SAMPLING, SEED, print_sample

    print_sample(run, "def ", dataset, 24)
    first = capsys.readouterr().out
    print_sample(run, "def ", dataset, 24)
    assert capsys.readouterr().out == first
    header, *text, note = first.strip("\n").splitlines()
    assert header.startswith("sample (temperature 0.8, top-p 0.95, repetition penalty 1.3, seed 0; MTP self-spec")
    assert note.startswith("(a short run writes text shaped like its corpus") and "--repetition-penalty 1.3" in note
    out, _ = cli(capsys, "def ", "--checkpoint", str(run), "--max-new-tokens", "24", "--speculative", "--temperature",
                 str(SAMPLING.temperature), "--top-p", str(SAMPLING.top_p), "--repetition-penalty",
                 str(SAMPLING.repetition_penalty), "--seed", str(SEED))
    assert out.rstrip("\n") == "\n".join(text)
    greedy, _ = cli(capsys, "def ", "--checkpoint", str(run), "--max-new-tokens", "24")
    assert greedy.rstrip("\n") != "\n".join(text)
