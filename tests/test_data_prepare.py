"""The prepare pipeline end to end: shards and meta.json, determinism, atomic output, validation split, the CLI."""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from kunlunbaize.cli import prepare as prepare_command
from kunlunbaize.data import FORMAT, DataError, is_prepared, load_meta, open_split, pack
from kunlunbaize.data.pack import plan_split, select_validation
from kunlunbaize.data.prepare import prepare

QUIET = dict(progress=False, log=None, vocab_size=400, workers=2)


def make_docs(n: int = 40, seed: int = 0) -> list[str]:
    """Varied documents: prose, code, CJK, emoji, and text that looks like special tokens."""
    rng = random.Random(seed)
    words = ["the", "model", "learns", "tokens", "from", "data", "昆仑", "白泽", "café", "🙂", "def", "return",
             "self.x", "= 42", "\n", "    ", "\t", "import", "numpy", "(", ")", ":", "\r\n", "'''", "#"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 400))) for _ in range(n)]
    docs[3] = "a document that mentions <|endoftext|> and <|user|> as plain text\n"
    return docs


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny tokenization chunks, so that tiny corpora are spread over several worker processes."""
    monkeypatch.setattr(pack, "CHUNK_BYTES", 4096)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """A folder of text files (plus one duplicate and one empty file); returns it and the expected kept texts."""
    root = tmp_path / "corpus"
    root.mkdir()
    docs = make_docs()
    for i, text in enumerate(docs):
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8", newline="")
    (root / "zz_duplicate.txt").write_text(docs[0], encoding="utf-8", newline="")
    (root / "zz_empty.txt").write_text("  \n")
    return root, docs


def read_split(out: Path, split: str) -> np.ndarray:
    maps = open_split(out, split)
    return np.concatenate(maps) if maps else np.zeros(0, dtype=np.uint16)


def split_docs(tokens: np.ndarray, eot: int) -> list[list[int]]:
    ends = np.flatnonzero(tokens == eot)
    assert len(ends) and ends[-1] == len(tokens) - 1, "a split must end with the end-of-text token"
    return [seg[:-1].tolist() for seg in np.split(tokens, ends + 1)[:-1]]  # without the EOT


def all_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shards_decode_back_to_the_documents(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    src, docs = corpus
    out = prepare([src], tmp_path / "ds", **QUIET)
    meta = load_meta(out)
    assert meta["format"] == FORMAT and meta["dtype"] == "uint16" and meta["eot_id"] == 0
    assert meta["report"]["kept"] == len(docs) and meta["report"]["duplicates"] == 1
    assert meta["report"]["too_short"] == 1
    assert meta["tokenizer"]["type"] == "trained-bpe" and meta["tokenizer"]["special_tokens"]["<|endoftext|>"] == 0
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert meta["vocab_size"] == tok.get_vocab_size() <= 400

    decoded = {}
    for split in ("train", "val"):
        segments = split_docs(read_split(out, split), meta["eot_id"])
        assert len(segments) == meta["splits"][split]["documents"]
        decoded[split] = [tok.decode(ids, skip_special_tokens=False) for ids in segments]
    val = set(decoded["val"])
    assert decoded["train"] == [d for d in docs if d not in val]  # train keeps the input order
    assert sorted(decoded["train"] + decoded["val"]) == sorted(docs)
    # special-token look-alikes inside a document are text: one EOT per document, no chat-role ids
    train = read_split(out, "train")
    assert int((train == 0).sum()) == len(decoded["train"]) and not np.isin(train, [1, 2, 3, 4]).any()
    # the folder is a Hugging Face tokenizer giving the same ids
    hf = PreTrainedTokenizerFast.from_pretrained(str(out))
    assert hf.eos_token_id == 0 and hf.encode(docs[0], add_special_tokens=False) == tok.encode(docs[0]).ids


def test_validation_split_size(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, _ = corpus
    meta = load_meta(prepare([src], tmp_path / "ds", **QUIET))
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert 1 <= meta["splits"]["val"]["documents"] < meta["report"]["kept"]
    assert 1024 <= meta["splits"]["val"]["tokens"] <= total // 2
    none = load_meta(prepare([src], tmp_path / "no_val", val_fraction=0.0, **QUIET))
    assert none["splits"]["val"] == {"shards": [], "tokens": 0, "documents": 0,
                                     "index": {"file": "val_documents.bin", "documents": 0}}
    assert open_split(tmp_path / "no_val", "val") == []


def test_select_validation_rules() -> None:
    rng = random.Random(0)
    digests = [rng.randbytes(32) for _ in range(1000)]
    lengths = np.array([rng.randint(50, 500) for _ in range(1000)], dtype=np.int64)
    total = int(lengths.sum())
    mask = select_validation(digests, lengths, 0.05)
    assert 0.05 * total <= lengths[mask].sum() < 0.05 * total + 500
    # chosen by content digest, so independent of the documents' order
    perm = np.array(rng.sample(range(1000), 1000))
    mask_perm = select_validation([digests[i] for i in perm], lengths[perm], 0.05)
    assert sorted(perm[mask_perm].tolist()) == sorted(np.flatnonzero(mask).tolist())
    # the 1024-token floor applies when the corpus allows it, never taking more than half
    assert lengths[select_validation(digests, lengths, 1e-9)].sum() >= 1024
    small = np.array([100, 120, 90, 300], dtype=np.int64)
    held = small[select_validation(digests[:4], small, 0.005)].sum()
    assert 0 < held <= small.sum() // 2
    assert not select_validation(digests[:4], small, 0.0).any()
    assert not select_validation(digests[:1], small[:1], 0.5).any()
    # a single document: the validation split is its tail
    train, val, n_train, n_val = plan_split(digests[:1], np.array([5000]), 0.005)
    assert train == [(0, 5000 - 1024)] and val == [(5000 - 1024, 5000)] and n_train == n_val == 1


def test_runs_are_deterministic_and_independent_of_workers(corpus: tuple[Path, list[str]], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = corpus
    pools: list[int] = []
    real_pool = pack._pool
    monkeypatch.setattr(pack, "_pool", lambda workers, initargs: pools.append(workers) or real_pool(workers, initargs))
    a = all_files(prepare([src], tmp_path / "a", **{**QUIET, "workers": 2}))
    b = all_files(prepare([src], tmp_path / "b", **{**QUIET, "workers": 2}))
    c = all_files(prepare([src], tmp_path / "c", **{**QUIET, "workers": 1}))
    assert pools == [2, 2]  # two runs in worker processes, one in this process
    assert a == b == c
    assert {"meta.json", "tokenizer.json", "train_00000.bin", "val_00000.bin"} <= set(a)


def test_shard_size_limit(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, _ = corpus
    one = prepare([src], tmp_path / "one", **QUIET)
    many = prepare([src], tmp_path / "many", shard_tokens=1000, **QUIET)
    meta = load_meta(many)
    sizes = [s["tokens"] for s in meta["splits"]["train"]["shards"]]
    assert len(sizes) > 2 and all(n == 1000 for n in sizes[:-1]) and 0 < sizes[-1] <= 1000
    assert [s["file"] for s in meta["splits"]["train"]["shards"]][:2] == ["train_00000.bin", "train_00001.bin"]
    for split in ("train", "val"):
        assert np.array_equal(read_split(one, split), read_split(many, split))


def test_existing_output_is_refused_then_overwritten(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, _ = corpus
    out = prepare([src], tmp_path / "ds", **QUIET)
    before = all_files(out)
    with pytest.raises(DataError, match=r"already holds a prepared dataset.*--overwrite"):
        prepare([src], out, **QUIET)
    assert all_files(out) == before
    prepare([src], out, max_docs=10, overwrite=True, **QUIET)
    assert load_meta(out)["report"]["kept"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ds"]  # no .tmp-* / .old-* left


def test_foreign_folder_is_never_replaced(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, _ = corpus
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(DataError, match=r"not a prepared dataset.*refusing"):
            prepare([src], tmp_path / "mine", overwrite=overwrite, **QUIET)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    assert is_prepared(prepare([src], tmp_path / "empty", **QUIET))  # an empty folder is fine


def test_damaged_dataset_needs_overwrite(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, _ = corpus
    out = prepare([src], tmp_path / "ds", **QUIET)
    shard = out / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-1])  # truncated
    with pytest.raises(DataError, match=r"truncated"):
        load_meta(out)
    with pytest.raises(DataError, match=r"incomplete or damaged.*--overwrite"):
        prepare([src], out, **QUIET)
    assert is_prepared(prepare([src], out, overwrite=True, **QUIET))


def test_leftover_tmp_folder(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, _ = corpus
    stale = tmp_path / "ds.tmp-999999"
    stale.mkdir()
    (stale / "train_00000.bin").write_bytes(b"\x00\x01" * 10)
    assert not is_prepared(stale)
    messages: list[str] = []
    out = prepare([src], tmp_path / "ds", **{**QUIET, "log": messages.append})
    assert is_prepared(out) and not is_prepared(stale)
    assert any("ds.tmp-999999" in m and "leftover" in m for m in messages)


def test_datasets_inside_a_source_folder_are_not_inputs(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, docs = corpus
    prepare(str(src), src / "prepared", **QUIET)  # a single path as a string is one source
    (src / "run.tmp-4242").mkdir()
    (src / "run.tmp-4242" / "tokenizer.json").write_text('{"half": "written"}')
    meta = load_meta(prepare([src], tmp_path / "again", **QUIET))
    assert meta["report"]["kept"] == len(docs) and meta["report"]["files_read"] == len(docs) + 2


def test_failure_leaves_nothing_behind(corpus: tuple[Path, list[str]], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = corpus
    with pytest.raises(DataError, match=r"too small"):
        prepare([src], tmp_path / "ds", **{**QUIET, "vocab_size": 10})
    with pytest.raises(DataError, match=r"no tokenizer at"):
        prepare([src], tmp_path / "ds", tokenizer=tmp_path / "missing", **QUIET)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C after tokenizing, while writing shards
    monkeypatch.setattr("kunlunbaize.data.prepare.write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], tmp_path / "ds", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_loaded_tokenizer_gives_the_same_tokens(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, _ = corpus
    first = prepare([src], tmp_path / "first", **QUIET)
    again = prepare([src], tmp_path / "again", tokenizer=first, **QUIET)
    meta = load_meta(again)
    assert meta["tokenizer"]["type"] == "loaded" and meta["tokenizer"]["source"] == str(first.resolve())
    for split in ("train", "val"):
        assert np.array_equal(read_split(first, split), read_split(again, split))


@pytest.mark.slow
def test_large_loaded_vocabulary_uses_uint32(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "<|endoftext|>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "in").mkdir()
    for i in range(6):
        (tmp_path / "in" / f"{i}.txt").write_text(" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(400)))
    out = prepare([tmp_path / "in"], tmp_path / "ds", tokenizer=tmp_path / "big.json", **QUIET)
    meta = load_meta(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002 and meta["eot_id"] == 1
    train = read_split(out, "train")
    assert train.dtype == np.uint32 and train.max() > 65535
    assert (out / "train_00000.bin").stat().st_size == 4 * meta["splits"]["train"]["tokens"]


@pytest.mark.slow
def test_default_source_is_the_stdlib(tmp_path: Path) -> None:
    out = prepare([], tmp_path / "stdlib", max_docs=25, **QUIET)
    meta = load_meta(out)
    assert meta["sources"][0].startswith("python-stdlib:") and meta["report"]["kept"] == 25
    assert meta["report"]["stopped_by"] == "--max-docs" and meta["splits"]["val"]["tokens"] >= 1024


def run_cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    prepare_command.add_parser(sub)
    args = p.parse_args(argv)
    prepare_command.run(args)


def test_cli(corpus: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = corpus
    out = tmp_path / "cli_ds"
    run_cli(["prepare", str(src), "--out", str(out), "--vocab-size", "400", "--workers", "2", "--min-chars", "5",
             "--val-fraction", "0.1", "--shard-tokens", "5_000"])
    printed = capsys.readouterr().out
    assert f"dataset ready in {out}" in printed and "duplicates removed" in printed
    meta = load_meta(out)
    assert meta["settings"]["val_fraction"] == 0.1 and meta["settings"]["shard_tokens"] == 5000
    assert "workers" not in meta["settings"]  # does not change the output, so not recorded

    with pytest.raises(SystemExit) as exit_info:
        run_cli(["prepare", str(src), "--out", str(out)])
    assert exit_info.value.code == 1
    assert "already holds a prepared dataset" in capsys.readouterr().err

    (tmp_path / "nothing").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["prepare", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 1 and "no input files found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_defaults() -> None:
    p = argparse.ArgumentParser()
    prepare_command.add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["prepare"])
    assert args.sources == [] and args.out == os.path.join("data", "stdlib") and args.vocab_size == 8192
    assert args.decode_errors == "replace" and args.val_fraction == 0.005 and args.shard_tokens == 100_000_000
    assert args.workers is None and args.tokenizer is None and not args.overwrite
    with pytest.raises(SystemExit):
        p.parse_args(["prepare", "--decode-errors", "ignore"])
