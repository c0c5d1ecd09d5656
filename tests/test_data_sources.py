"""Reading sources and cleaning: formats, text fields, decode errors, binary files, duplicates, filters, limits."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from kunlunbaize.data import DataError
from kunlunbaize.data.clean import CleanReport, clean_documents, looks_binary
from kunlunbaize.data.prepare import prepare
from kunlunbaize.data.sources import discover, read_documents, stdlib_files, stdlib_root

QUIET = dict(progress=False, log=None, vocab_size=300, workers=1)


def cleaned(sources: list, **kwargs) -> tuple[list[str], CleanReport]:
    """Texts kept from ``sources`` and the report, without tokenizing."""
    read_kw = {k: kwargs.pop(k) for k in ("text_field", "decode_errors") if k in kwargs}
    report = CleanReport()
    docs = read_documents(discover(sources), report=report, **read_kw)
    return [d.text for d in clean_documents(docs, report, **kwargs)], report


def test_folder_is_recursive_sorted_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "deep" / "z.txt").write_text("deep z")
    (tmp_path / "b" / "a.md").write_text("b a")
    (tmp_path / "a.txt").write_text("top a")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git" / "config").write_text("git")
    texts, report = cleaned([tmp_path])
    assert texts == ["top a", "b a", "deep z"]
    assert report.files_read == 3 and report.kept == 3


def test_glob_and_repeated_paths(tmp_path: Path) -> None:
    for name in ("x1.txt", "x2.txt", "y.log"):
        (tmp_path / name).write_text(f"content of {name}")
    files = discover([str(tmp_path / "x*.txt"), tmp_path / "x1.txt"])
    assert [f.path.name for f in files] == ["x1.txt", "x2.txt"]  # x1 listed once
    with pytest.raises(DataError, match=r"does not exist"):
        discover([tmp_path / "missing.txt"])


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with pytest.raises(DataError, match=r"no input files found"):
        prepare([tmp_path / "in"], tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "in"]  # no temporary folder left behind


def test_only_binary_file_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    blob = tmp_path / "in" / "image.png"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"no documents left") as err:
        prepare([tmp_path / "in"], tmp_path / "out", **QUIET)
    assert str(blob) in str(err.value) and "binary" in str(err.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "in"]


def test_binary_detection() -> None:
    assert looks_binary(b"abc\x00def")
    assert looks_binary(bytes(range(128, 256)) * 10)  # almost all invalid UTF-8
    assert not looks_binary("plain text, ünïcödé 昆仑 🙂".encode())
    assert not looks_binary("café au lait".encode("latin-1"))  # a few bad bytes: text, decoded with U+FFFD
    assert not looks_binary(b"")


def test_non_utf8_replace_and_skip(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("déjà vu, naïve café".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("fine")
    texts, report = cleaned([tmp_path], decode_errors="replace")
    assert texts[0] == "d\ufffdj\ufffd vu, na\ufffdve caf\ufffd" and texts[1] == "fine"
    assert report.replaced == 1 and report.kept == 2
    texts, report = cleaned([tmp_path], decode_errors="skip")
    assert texts == ["fine"]
    assert report.skipped_decode == 1 and report.decode_skipped_files == [str(tmp_path / "latin1.txt")]
    assert "undecodable files skipped" in report.format()


def test_utf8_bom_is_removed(tmp_path: Path) -> None:
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello")
    assert cleaned([tmp_path])[0] == ["hello"]


def test_duplicates_are_removed_and_counted(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"copy{i}.txt").write_text("the same text\n")
    (tmp_path / "other.txt").write_text("another text\n")
    texts, report = cleaned([tmp_path])
    assert texts == ["the same text\n", "another text\n"]
    assert report.duplicates == 3 and report.kept == 2 and report.documents_read == 5


def test_length_filters(tmp_path: Path) -> None:
    for name, text in {"a": "   \n\t ", "b": "abc", "c": "  abcdefgh  ", "d": "x" * 50}.items():
        (tmp_path / f"{name}.txt").write_text(text)
    texts, report = cleaned([tmp_path])  # default: at least 1 character after stripping
    assert texts == ["abc", "  abcdefgh  ", "x" * 50] and report.too_short == 1
    texts, report = cleaned([tmp_path], min_chars=4, max_chars=10)
    assert texts == ["  abcdefgh  "] and report.too_short == 2 and report.too_long == 1
    assert report.kept + report.duplicates + report.too_short + report.too_long == report.documents_read


def test_limits_stop_reading_early(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text(f"document number {i} " * 10)
    texts, report = cleaned([tmp_path], max_docs=3)
    assert len(texts) == 3 and report.files_read == 3 and report.stopped_by == "--max-docs"
    texts, report = cleaned([tmp_path], max_bytes=450)
    assert len(texts) == 3 and report.bytes_kept >= 450 and report.stopped_by == "--max-bytes"


@pytest.mark.slow
def test_single_huge_line(tmp_path: Path) -> None:
    words = ["alpha", "beta", "gamma", "δέλτα", "昆仑", "x=1;", "🙂", "0123456789"]
    rng = random.Random(0)
    line = " ".join(rng.choice(words) for _ in range(320_000))  # ~2 MB, no newline
    assert len(line.encode()) > 2_000_000 and "\n" not in line
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one_line.txt").write_text(line)
    out = prepare([tmp_path / "in"], tmp_path / "out", **{**QUIET, "workers": 2})
    meta = json.loads((out / "meta.json").read_text())
    assert meta["report"]["kept"] == 1
    # One document cannot be split by document: validation is its tail, >= 1024 tokens.
    assert meta["splits"]["val"]["tokens"] >= 1024 and meta["splits"]["train"]["tokens"] > 0


def test_jsonl_plain_and_gzip_with_custom_field(tmp_path: Path) -> None:
    records = [{"content": "first record 🙂", "id": 1}, {"content": "second\nrecord", "id": 2},
               {"content": None, "id": 3}, {"content": "first record 🙂", "id": 4}]
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n{broken json\n[1, 2]\n"
    (tmp_path / "a.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"content": "from gzip"}) + "\n")
        f.write('{"content": "lone surrogate \\ud800 here"}\n')
    texts, report = cleaned([tmp_path], text_field="content")
    assert texts == ["first record 🙂", "second\nrecord", "from gzip", "lone surrogate \ufffd here"]
    assert report.files_read == 2 and report.duplicates == 1 and report.replaced == 1
    assert report.bad_records == 3  # null text, broken JSON, a JSON array
    assert any("invalid JSON" in e for e in report.bad_record_examples)


def test_jsonl_bad_field_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x", "meta": 1}) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:1: JSONL record has no field 'text'.*'content', 'meta'.*"
                                        r"--text-field"):
        cleaned([tmp_path])
    with pytest.raises(DataError, match=r"no field 'body'"):
        prepare([tmp_path / "a.jsonl"], tmp_path / "out", text_field="body", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_parquet_with_custom_field(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"body": ["parquet one", None, "parquet ünï two", "parquet one"], "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=2)
    texts, report = cleaned([tmp_path / "data.parquet"], text_field="body")
    assert texts == ["parquet one", "parquet ünï two"]
    assert report.bad_records == 1 and report.duplicates == 1
    with pytest.raises(DataError, match=r"no column 'text' \(its columns: body, n\).*--text-field"):
        cleaned([tmp_path / "data.parquet"])


@pytest.mark.slow
def test_hf_dataset_on_disk_with_custom_field(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"story": ["once upon a time", "the end"], "k": [1, 2]}).save_to_disk(
        str(tmp_path / "ds"))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"story": ["split train"]}),
                               "test": datasets.Dataset.from_dict({"story": ["split test"]})})
    dd.save_to_disk(str(tmp_path / "corpus" / "nested_dd"))
    (tmp_path / "corpus" / "note.txt").write_text("a text file next to a dataset")
    texts, report = cleaned([tmp_path / "ds", tmp_path / "corpus"], text_field="story")
    # The nested saved dataset is read as a dataset, not as its .arrow/.json files.
    assert texts == ["once upon a time", "the end", "a text file next to a dataset", "split train", "split test"]
    assert report.files_read == 3 and report.skipped_binary == 0
    with pytest.raises(DataError, match=r"has no column 'text' \(its columns: story, k\)"):
        cleaned([tmp_path / "ds"])


def test_stdlib_files() -> None:
    files = stdlib_files()
    assert len(files) > 500
    assert all(f.path.suffix == ".py" and "site-packages" not in f.path.parts for f in files)
    assert [f.path.parts for f in files] == sorted(f.path.parts for f in files)
    assert all(f.path.is_relative_to(stdlib_root()) for f in files)
