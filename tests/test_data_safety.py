"""Data safety of ``kunlun prepare``: a few bad records are skipped and counted; the project's outputs are skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kunlunbaize.data import DataError
from kunlunbaize.data.clean import CleanReport, clean_documents
from kunlunbaize.data.sources import discover, read_documents

pytest.importorskip("tokenizers")


def cleaned(sources: list, skipped: list | None = None, **read_kw) -> tuple[list[str], CleanReport]:
    report = CleanReport()
    docs = read_documents(discover(sources) if skipped is None else discover(sources, skipped), report=report,
                          **read_kw)
    return [d.text for d in clean_documents(docs, report)], report


def test_jsonl_records_without_the_field_are_skipped_and_counted(tmp_path: Path) -> None:
    rows = [{"meta": 0}] + [{"text": f"doc {i}"} for i in range(50)] + [{"title": "no text"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts, report = cleaned([tmp_path])
    assert texts == [f"doc {i}" for i in range(50)]
    assert report.bad_records == 2  # the first record (before any with the field) is counted too
    assert report.bad_record_examples == [f"{tmp_path / 'a.jsonl'}:1 (no field 'text')",
                                          f"{tmp_path / 'a.jsonl'}:52 (no field 'text')"]
    with pytest.raises(DataError, match=r"a\.jsonl:1: JSONL record has no field 'body' \(its fields: 'meta'\), "
                                        r"nor does any other record.*52 record.*--text-field"):
        cleaned([tmp_path], text_field="body")  # a misnamed field still stops the run


@pytest.mark.slow
def test_run_checkpoint_and_export_folders_are_not_read(tmp_path: Path, trained_run: Path) -> None:
    import shutil

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "doc.txt").write_text("real text")
    shutil.copytree(trained_run, corpus / "runs" / "small")  # a run folder: metrics.jsonl, checkpoints, tensorboard
    ckpt = next((trained_run / "checkpoints").iterdir())
    shutil.copytree(ckpt, corpus / "a_checkpoint")
    (corpus / "export").mkdir()
    (corpus / "export" / "config.json").write_text(json.dumps({"model_type": "kunlunbaize"}))
    (corpus / "export" / "notes.jsonl").write_text(json.dumps({"x": 1}) + "\n")
    texts, report = cleaned([corpus])
    assert texts == ["real text"] and report.files_read == 1
    skipped: list[Path] = []
    discover([corpus], skipped)
    assert sorted(p.name for p in skipped) == ["a_checkpoint", "export", "small"]
