"""Input discovery and reading: text files, JSONL (optionally gzipped), Parquet, Hugging Face datasets on disk.

Every source is expanded to a deterministic (sorted) list of :class:`SourceFile`; :func:`read_documents` yields the
decoded text of each document, counting everything it has to skip in a :class:`~.clean.CleanReport`.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import sysconfig
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .clean import BINARY_SNIFF_BYTES, MAX_LISTED_PATHS, CleanReport, decode_text, looks_binary
from .format import FORMAT, META_FILE, DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
HF_MARKERS = (("dataset_info.json", "state.json"), ("dataset_dict.json",))
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")
INSTALL_DATA_HINT = "install it with `pip install 'kunlunbaize[data]'`"
_READ_ERRORS = (OSError, EOFError, zlib.error)
_TEMP_OUTPUT = re.compile(r"\.(tmp|old)-\d+$")  # folders kunlun prepare builds in / swaps out
_TEMP_EXPORT = re.compile(r"\.(tmp|old)-export$|^step_\d+\.tmp$")  # kunlun export / checkpoint saves in progress


@dataclass(frozen=True)
class SourceFile:
    """One input: a file of some ``kind`` ("text", "jsonl", "parquet") or a saved HF dataset folder ("hf")."""

    path: Path
    kind: str


def stdlib_root() -> Path:
    """The standard-library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[SourceFile]:
    """The ``.py`` files of the running interpreter's standard library (no site-packages), sorted."""
    root = stdlib_root()
    files = [SourceFile(p, "text") for p in _walk(root, exclude=STDLIB_EXCLUDED_DIRS, skip_hidden=False)
             if p.suffix == ".py"]
    if not files:
        raise DataError(f"found no .py files under the standard library folder {root}; give input sources "
                        f"explicitly, e.g. `kunlun prepare my_texts/`")
    return files


def is_hf_dataset_dir(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets`` ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return any(all((path / m).is_file() for m in markers) for markers in HF_MARKERS)


def file_kind(path: Path) -> str:
    """Reader kind for a file, from its name: "jsonl", "parquet", or "text" (anything else)."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _is_token_dataset(path: Path) -> bool:
    """Whether ``path`` is a ``kunlun prepare`` output (finished or temporary) -- never an input."""
    if _TEMP_OUTPUT.search(path.name):
        return True
    meta = path / META_FILE
    try:
        return meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _json_field(path: Path, key: str) -> object:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def is_project_output(path: Path) -> bool:
    """Whether folder ``path`` was written by this project: a ``kunlun prepare`` dataset (finished or temporary),
    a ``kunlun train`` run folder, one of its checkpoints or TensorBoard logs, or a ``kunlun export`` folder."""
    if _is_token_dataset(path) or _TEMP_EXPORT.search(path.name):
        return True
    if (path / "train_config.json").is_file() or (path / "trainer_state.json").is_file():  # run / checkpoint
        return True
    if path.name == "tensorboard" and (path.parent / "metrics.jsonl").is_file():  # a run's, even without config
        return True
    if (path / "metrics.jsonl").is_file() and ((path / "checkpoints").is_dir() or (path / "tensorboard").is_dir()):
        return True
    return _json_field(path / "config.json", "model_type") == "kunlunbaize"  # a Hugging Face export


def _walk(root: Path, *, exclude: Iterable[str] = (), skip_hidden: bool = True,
          datasets_out: list[Path] | None = None, skipped_out: list[Path] | None = None) -> list[Path]:
    """All files under ``root``, recursively, sorted by path; saved HF datasets go to ``datasets_out`` instead.

    Folders written by this project (:func:`is_project_output`) are not entered; they are listed in ``skipped_out``.
    """
    excluded = set(exclude)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in dirnames:
            if d in excluded or (skip_hidden and d.startswith(".")):
                continue
            if is_project_output(here / d):
                if skipped_out is not None:
                    skipped_out.append(here / d)
                continue
            if datasets_out is not None and is_hf_dataset_dir(here / d):
                datasets_out.append(here / d)
                continue
            keep.append(d)
        dirnames[:] = sorted(keep)
        found.extend(here / f for f in filenames if not (skip_hidden and f.startswith(".")))
    return sorted(found, key=lambda p: p.parts)


def _expand_dir(path: Path, skipped: list[Path] | None) -> list[SourceFile]:
    if is_hf_dataset_dir(path):
        return [SourceFile(path, "hf")]
    datasets: list[Path] = []
    files = [SourceFile(p, file_kind(p)) for p in _walk(path, datasets_out=datasets, skipped_out=skipped)]
    return files + [SourceFile(d, "hf") for d in sorted(datasets, key=lambda p: p.parts)]


def discover(sources: Sequence[str | os.PathLike[str]], skipped: list[Path] | None = None) -> list[SourceFile]:
    """Input files of ``sources`` (files, folders searched recursively, globs), in order, each path once.

    Hidden files and folders (names starting with ".") and the project's own outputs inside folders (prepared
    datasets, training runs and their checkpoints, exports: :func:`is_project_output`) are ignored; the latter are
    appended to ``skipped``. Raises DataError for a path that does not exist. An empty result is not an error here.
    """
    out: list[SourceFile] = []
    seen: set[Path] = set()

    def add(items: Iterable[SourceFile]) -> None:
        for item in items:
            key = item.path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(item)

    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            add(_expand_dir(path, skipped))
        elif path.is_file():
            add([SourceFile(path, file_kind(path))])
        elif glob.has_magic(str(source)):
            for match in sorted(glob.glob(os.path.expanduser(str(source)), recursive=True)):
                m = Path(match)
                add(_expand_dir(m, skipped) if m.is_dir() else [SourceFile(m, file_kind(m))])
        else:
            raise DataError(f"input source {str(source)!r} does not exist (not a file, folder or matching glob); "
                            f"check the path")
    return out


def read_documents(files: Iterable[SourceFile], *, text_field: str = "text", decode_errors: str = "replace",
                   report: CleanReport) -> Iterator[str]:
    """Text of every document of ``files`` in order: a whole text file, a JSONL line, or a Parquet/dataset row.

    Binary, undecodable (with ``decode_errors="skip"``) and unreadable files, and records without text, are skipped
    and counted in ``report``; so are JSONL records lacking the ``text_field`` key when other records of the same
    file have it. A file or dataset in which no record has the ``text_field`` column/key raises DataError.
    """
    readers = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf_dataset}
    for item in files:
        report.files_read += 1
        yield from readers[item.kind](item.path, text_field, decode_errors, report)


def _read_text(path: Path, _field: str, errors: str, report: CleanReport) -> Iterator[str]:
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except _READ_ERRORS as e:
        report.note("unreadable", f"{path} ({e})")
        return
    if looks_binary(data):
        report.note("binary", str(path))
        return
    text = decode_text(data, errors, report, str(path))
    if text is not None:
        yield text


def _read_jsonl(path: Path, field: str, errors: str, report: CleanReport) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    found_field = False
    missing: list[str] = []  # the first records without the field seen before any record with it (listed)
    n_missing = 0  # all of them (counted)
    first_fields = ""
    try:
        with opener(path, "rb") as f:
            if b"\x00" in f.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES]:
                report.note("binary", str(path))
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                origin = f"{path}:{lineno}"
                raw = decode_text(line, errors, report, origin)
                if raw is None:
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    report.note("bad_record", f"{origin} (invalid JSON: {e.msg})")
                    continue
                if not isinstance(record, dict):
                    report.note("bad_record", f"{origin} (a JSON {type(record).__name__}, not an object)")
                    continue
                if field not in record:
                    if found_field:
                        report.note("bad_record", f"{origin} (no field {field!r})")
                    else:  # counted once the field shows up; an error if no record of the file has it
                        n_missing += 1
                        if len(missing) < MAX_LISTED_PATHS:
                            missing.append(f"{origin} (no field {field!r})")
                        first_fields = first_fields or ", ".join(map(repr, list(record)[:20])) or "none"
                    continue
                if not found_field:
                    found_field = True
                    for origin_missing in missing:
                        report.note("bad_record", origin_missing)
                    report.bad_records += n_missing - len(missing)  # counted, not listed
                    missing.clear()
                    n_missing = 0
                value = record[field]
                if not isinstance(value, str):
                    report.note("bad_record", f"{origin} (field {field!r} is {type(value).__name__}, not text)")
                    continue
                yield value
    except _READ_ERRORS as e:
        report.note("unreadable", f"{path} ({e})")
    if missing:  # no record of the file has the field: a misnamed --text-field, or not a corpus file
        raise DataError(f"{missing[0].split(' (')[0]}: JSONL record has no field {field!r} (its fields: "
                        f"{first_fields}), nor does any other record of {path} ({n_missing:,} record(s)); pass "
                        f"the name of the text field with --text-field")


def _text_values(values: Iterable[object], origin: str, field: str, errors: str,
                 report: CleanReport) -> Iterator[str]:
    for i, value in enumerate(values):
        if isinstance(value, str):
            yield value
        elif isinstance(value, bytes):
            text = decode_text(value, errors, report, f"{origin} row {i}")
            if text is not None:
                yield text
        else:
            report.note("bad_record", f"{origin} row {i} (field {field!r} is {type(value).__name__}, not text)")


def _read_parquet(path: Path, field: str, errors: str, report: CleanReport) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading the Parquet file {path} needs pyarrow: {INSTALL_DATA_HINT}") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        report.note("unreadable", f"{path} ({e})")
        return
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"Parquet file {path} has no column {field!r} (its columns: {', '.join(names)}); pass the "
                        f"name of the text column with --text-field")

    def values() -> Iterator[object]:
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            yield from batch.column(0).to_pylist()

    try:
        yield from _text_values(values(), str(path), field, errors, report)
    except (OSError, pa.ArrowException) as e:  # damaged past its footer: keep the rows read so far
        report.note("unreadable", f"{path} (stopped part-way: {e})")


def _read_hf_dataset(path: Path, field: str, errors: str, report: CleanReport) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the saved Hugging Face dataset {path} needs `datasets`: "
                        f"{INSTALL_DATA_HINT}") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid … for damaged folders
        report.note("unreadable", f"{path} ({type(e).__name__}: {e})")
        return
    parts = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, ds in parts:
        origin = f"{path}[{split}]" if split else str(path)
        if field not in ds.column_names:
            raise DataError(f"dataset {origin} has no column {field!r} (its columns: {', '.join(ds.column_names)}); "
                            f"pass the name of the text column with --text-field")

        def values(ds: datasets.Dataset = ds) -> Iterator[object]:
            for batch in ds.select_columns([field]).with_format(None).iter(batch_size=1024):
                yield from batch[field]

        yield from _text_values(values(), origin, field, errors, report)
