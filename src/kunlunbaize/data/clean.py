"""Decoding and cleaning of raw documents, with a report of everything that was dropped or changed.

Nothing is dropped silently: every skipped file or record is counted in a :class:`CleanReport`, and the paths of the
first few skipped files are listed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

BINARY_SNIFF_BYTES = 8192
BINARY_BAD_RATIO = 0.3
MAX_LISTED_PATHS = 10


@dataclass
class CleanReport:
    """Counts of the reading and cleaning steps (files, documents, and why documents were dropped)."""

    files_read: int = 0
    documents_read: int = 0
    skipped_binary: int = 0
    skipped_decode: int = 0
    skipped_unreadable: int = 0
    bad_records: int = 0
    replaced: int = 0
    duplicates: int = 0
    too_short: int = 0
    too_long: int = 0
    kept: int = 0
    bytes_kept: int = 0
    chars_kept: int = 0
    stopped_by: str | None = None
    binary_files: list[str] = field(default_factory=list)
    decode_skipped_files: list[str] = field(default_factory=list)
    unreadable_files: list[str] = field(default_factory=list)
    bad_record_examples: list[str] = field(default_factory=list)

    def note(self, kind: str, origin: str) -> None:
        """Count one skipped item of ``kind`` (binary, decode, unreadable, bad_record) and list its origin."""
        counter, listing = {
            "binary": ("skipped_binary", self.binary_files),
            "decode": ("skipped_decode", self.decode_skipped_files),
            "unreadable": ("skipped_unreadable", self.unreadable_files),
            "bad_record": ("bad_records", self.bad_record_examples),
        }[kind]
        setattr(self, counter, getattr(self, counter) + 1)
        if len(listing) < MAX_LISTED_PATHS:
            listing.append(origin)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (for meta.json)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}

    def format(self) -> str:
        """Human-readable multi-line summary."""
        rows = [
            ("files read", self.files_read),
            ("documents read", self.documents_read),
            ("skipped: binary files", self.skipped_binary),
            ("skipped: undecodable (--decode-errors skip)", self.skipped_decode),
            ("skipped: unreadable files", self.skipped_unreadable),
            ("skipped: bad records (not text / bad JSON)", self.bad_records),
            ("decoded with U+FFFD replacements", self.replaced),
            ("duplicates removed", self.duplicates),
            ("too short (--min-chars)", self.too_short),
            ("too long (--max-chars)", self.too_long),
            ("documents kept", self.kept),
            ("bytes kept (UTF-8)", self.bytes_kept),
        ]
        lines = [f"  {name:<45} {value:>14,}" for name, value in rows]
        for title, paths, count in (("binary files skipped", self.binary_files, self.skipped_binary),
                                    ("undecodable files skipped", self.decode_skipped_files, self.skipped_decode),
                                    ("unreadable files", self.unreadable_files, self.skipped_unreadable),
                                    ("bad records", self.bad_record_examples, self.bad_records)):
            if paths:
                more = f" (first {len(paths)} of {count})" if count > len(paths) else ""
                lines.append(f"  {title}{more}:")
                lines.extend(f"    {p}" for p in paths)
        if self.stopped_by:
            lines.append(f"  reading stopped early at the {self.stopped_by} limit")
        return "\n".join(lines)


def looks_binary(data: bytes) -> bool:
    """Whether raw file content is binary: a NUL byte in the first 8 KB, or mostly bytes that are not UTF-8."""
    head = data[:BINARY_SNIFF_BYTES]
    if b"\x00" in head:
        return True
    if not data:
        return False
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        pass
    valid = len(data.decode("utf-8", "ignore").encode("utf-8"))
    return (len(data) - valid) / len(data) > BINARY_BAD_RATIO


def decode_text(data: bytes, errors: str, report: CleanReport, origin: str) -> str | None:
    """UTF-8 text of ``data``, or None when it is dropped (``errors="skip"`` and invalid UTF-8); counts in ``report``.

    A leading UTF-8 byte-order mark is removed. With ``errors="replace"`` invalid bytes become U+FFFD.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    if errors == "skip":
        report.note("decode", origin)
        return None
    report.replaced += 1
    return data.decode("utf-8-sig", "replace")


@dataclass(frozen=True)
class CleanDocument:
    """A kept document and the SHA-256 digest of its text."""

    text: str
    digest: bytes


def clean_documents(docs: Iterable[str], report: CleanReport, *, min_chars: int = 1, max_chars: int | None = None,
                    max_docs: int | None = None, max_bytes: int | None = None,
                    dedup: bool = True) -> Iterator[CleanDocument]:
    """Documents of ``docs`` that pass the length filters and (with ``dedup``) are not exact duplicates of an
    earlier one.

    Lengths are counted in characters after stripping leading/trailing whitespace; kept text is unchanged except
    that lone surrogate code points (not encodable as UTF-8) become U+FFFD and count as replaced.
    Stops after ``max_docs`` kept documents, or once the kept documents reach ``max_bytes`` UTF-8 bytes.
    """
    seen: set[bytes] = set()
    for text in docs:
        report.documents_read += 1
        length = len(text.strip())
        if length < min_chars:
            report.too_short += 1
            continue
        if max_chars is not None and length > max_chars:
            report.too_long += 1
            continue
        try:
            encoded = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, e.g. from "\ud800" escapes in JSON
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            encoded = text.encode("utf-8")
            report.replaced += 1
        digest = hashlib.sha256(encoded).digest()
        if dedup and digest in seen:
            report.duplicates += 1
            continue
        seen.add(digest)
        report.kept += 1
        report.bytes_kept += len(encoded)
        report.chars_kept += len(text)
        yield CleanDocument(text, digest)
        if max_docs is not None and report.kept >= max_docs:
            report.stopped_by = "--max-docs"
            return
        if max_bytes is not None and report.bytes_kept >= max_bytes:
            report.stopped_by = "--max-bytes"
            return
