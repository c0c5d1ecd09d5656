"""Task files for evaluation: read them and convert the common public layouts to the canonical schemas.

No torch import (standard library only; pyarrow, imported on use, reads Parquet). Each task *kind* has one
canonical record schema that the evaluator relies on:

* ``mc`` (multiple choice by log-likelihood): ``{"question": str, "choices": [str, ...], "answer": int}``, with
  at least two non-empty choices and a 0-based answer index; optional ``"id"`` and ``"prompt"`` (a full context
  used verbatim instead of ``"Question: {question}\\nAnswer:"``); extra fields such as ``"subject"`` are kept.
* ``gen`` and ``math-avg`` (generative): ``{"prompt": str, "answer": str}``; optional ``"id"`` and ``"solution"``.
* ``code`` (the HumanEval schema): ``{"task_id", "prompt", "test", "entry_point"}`` (all strings, ``test`` defines
  ``check(candidate)``); optional ``"canonical_solution"``. The program checked is
  ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``.

Public layouts (:data:`LAYOUTS`) are recognised from a record's keys (:func:`detect_layout`) or named by the
caller; :data:`LAYOUT_KINDS` says which kinds each gives. Generative layouts that give only a question get the
prompt ``"Question: {question}\\nAnswer:"``, the format of the built-in ``arith`` task.

Command line: ``python -m kunlunbaize.eval.convert SRC DST --kind KIND [--layout NAME]``.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .scoring import extract_answer

__all__ = [
    "KINDS", "LAYOUTS", "LAYOUT_KINDS", "PROMPT_TEMPLATE", "TaskFileError", "convert_file", "detect_layout",
    "load_task_file", "main", "read_records", "to_canonical",
]

KINDS = ("mc", "gen", "math-avg", "code")
_GEN = ("gen", "math-avg")
LAYOUT_KINDS: dict[str, tuple[str, ...]] = {
    "mmlu": ("mc",),
    "ceval": ("mc",),
    "cmmlu": ("mc",),
    "arc": ("mc",),
    "hellaswag": ("mc",),
    "piqa": ("mc",),
    "gsm8k": _GEN,
    "math": _GEN,
    "aime": _GEN,
    "humaneval": ("code",),
    "mbpp": ("code",),
    "canonical": KINDS,
}
LAYOUTS = tuple(LAYOUT_KINDS)
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
SUFFIXES = (".jsonl", ".json", ".parquet")

_ID_KEYS = ("id", "ID", "task_id", "unique_id")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class TaskFileError(ValueError):
    """A task file or record that cannot be read or converted; the message says what is wrong and what to do."""


# ------------------------------------------------------------------------------------------------ reading


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records (JSON objects) of a ``.jsonl``, ``.json`` or ``.parquet`` task file.

    ``.jsonl``: one object per line, blank lines skipped. ``.json``: a list of objects, or an object holding
    exactly one list of them (``{"data": [...]}``); a ``.json`` file written as JSON Lines is read as such.
    ``.parquet`` needs pyarrow. Raises :class:`TaskFileError` for a missing, empty, binary, non-UTF-8 or malformed
    file.
    """
    path = Path(path)
    if not path.exists():
        raise TaskFileError(f"{path}: no such file; check the path (a task file is .jsonl, .json or .parquet)")
    if path.is_dir():
        raise TaskFileError(f"{path} is a directory; give one task file (.jsonl, .json or .parquet) inside it")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TaskFileError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
                            f"a task file is {', '.join(SUFFIXES)} (rename it if it is one of these)")
    if path.stat().st_size == 0:
        raise TaskFileError(f"{path} is empty; a task file needs at least one record")
    records = _read_parquet(path) if suffix == ".parquet" else _read_json(path, suffix)
    if not records:
        raise TaskFileError(f"{path} holds no records; a task file needs at least one")
    return records


def _read_text(path: Path) -> str:
    """The file's text, refusing binary (NUL bytes, known magic numbers) and non-UTF-8 content."""
    data = path.read_bytes()
    if data.startswith(b"PAR1"):
        raise TaskFileError(f"{path} is a Parquet file, not JSON text; rename it to {path.stem}.parquet")
    if data.startswith(b"\x1f\x8b"):
        raise TaskFileError(f"{path} is gzip-compressed; decompress it first (gunzip)")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise TaskFileError(f"{path} looks like a binary file (a NUL byte at byte offset {nul}, line {line}), "
                            "not JSON text; a task file is UTF-8 JSON Lines, JSON or Parquet")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TaskFileError(f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} "
                            f"(line {line}) cannot be decoded; re-save the file as UTF-8 "
                            "(e.g. iconv -f GBK -t UTF-8)") from None


def _read_json(path: Path, suffix: str) -> list[dict[str, Any]]:
    """Records of a JSON or JSON Lines file."""
    text = _read_text(path)
    if not text.strip():
        raise TaskFileError(f"{path} is empty (only whitespace); a task file needs at least one record")
    if suffix == ".jsonl":
        return _parse_lines(path, text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json (as `datasets`' to_json writes)
            return _parse_lines(path, text)
        raise TaskFileError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return _records_of(path, value)


def _parse_lines(path: Path, text: str) -> list[dict[str, Any]]:
    """One object per non-blank line."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{path} line {number} is not valid JSON ({e.msg} at column {e.colno}): "
                                f"{_preview(line)}; each line must be one JSON object") from None
        if not isinstance(value, dict):
            raise TaskFileError(f"{path} line {number} is a JSON {_type(value)}, not an object; "
                                "each line must be one JSON object {...}")
        records.append(value)
    return records


def _records_of(path: Path, value: Any) -> list[dict[str, Any]]:
    """The list of objects a parsed ``.json`` file holds."""
    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) != 1:
            raise TaskFileError(f"{path} is a JSON object with {len(lists)} list values (keys: "
                                f"{', '.join(map(str, value)) or 'none'}); expected a list of records or an "
                                'object holding exactly one list, such as {"data": [...]}')
        value = value[lists[0]]
    if not isinstance(value, list):
        raise TaskFileError(f"{path} holds a JSON {_type(value)}; expected a list of records (objects)")
    for number, item in enumerate(value, 1):
        if not isinstance(item, dict):
            raise TaskFileError(f"{path}: item {number} of the list is a JSON {_type(item)}, not an object")
    return value


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet file as dicts."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskFileError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow "
                            "(or convert the file to JSON Lines)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, … for a damaged file
        raise TaskFileError(f"{path} is not a readable Parquet file: {e}") from None


def _type(value: Any) -> str:
    """A JSON type name for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _preview(text: str, width: int = 60) -> str:
    """A short quoted excerpt of ``text``."""
    text = text.strip()
    return repr(text if len(text) <= width else text[:width] + "…")


# ------------------------------------------------------------------------------------------------ detection


def detect_layout(record: dict[str, Any]) -> str:
    """The name of the public layout (one of :data:`LAYOUTS`) that ``record``'s keys match.

    Raises :class:`TaskFileError` listing the keys found and the supported layouts when none matches.
    """
    if not isinstance(record, dict):
        raise TaskFileError(f"a record must be a JSON object, got a JSON {_type(record)}")
    keys = set(record)
    if {"task_id", "prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    if {"code", "test_list"} <= keys and keys & {"text", "prompt"}:
        return "mbpp"
    if "endings" in keys and keys & {"ctx", "ctx_a"}:
        return "hellaswag"
    if {"goal", "sol1", "sol2"} <= keys:
        return "piqa"
    if "answerKey" in keys and keys & {"question", "question_stem"}:
        return "arc"
    if {"Question", "A", "B"} <= keys:
        return "cmmlu"
    if {"question", "A", "B"} <= keys:
        return "ceval"
    if {"choices", "answer", "prompt"} <= keys:
        return "canonical"
    if {"question", "choices", "answer"} <= keys:
        return "mmlu"
    if "question" in keys and isinstance(record.get("answer"), str) and "####" in record["answer"]:
        return "gsm8k"
    if {"problem", "solution"} <= keys:
        return "math"
    if keys & {"problem", "Problem", "question"} and keys & {"answer", "Answer"}:
        return "aime"
    if {"prompt", "answer"} <= keys:
        return "canonical"
    found = ", ".join(sorted(map(str, keys))) or "(none)"
    raise TaskFileError(f"cannot tell the layout of a record with keys {found}; "
                        f"supported layouts: {', '.join(LAYOUTS)} (see docs/guide-eval.md); convert the file to a "
                        "canonical schema or name its layout")


# ------------------------------------------------------------------------------------------------ fields


def _get(record: dict[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` present in ``record``; an error naming them when none is."""
    for name in names:
        if name in record:
            return record[name]
    raise TaskFileError(f"missing field {' or '.join(map(repr, names))} (keys found: "
                        f"{', '.join(sorted(map(str, record))) or 'none'})")


def _text(value: Any, field: str, *, empty_ok: bool = False) -> str:
    """``value`` as a string (numbers are written out); an error when it is not text or is empty."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if not isinstance(value, str):
        raise TaskFileError(f"{field} must be a string, got a JSON {_type(value)}")
    if not empty_ok and not value.strip():
        raise TaskFileError(f"{field} is empty")
    return value


def _choices(values: Any, field: str) -> list[str]:
    """A list of at least two non-empty choice strings."""
    if not isinstance(values, list):
        raise TaskFileError(f"{field} must be a list of strings, got a JSON {_type(values)}")
    if len(values) < 2:
        raise TaskFileError(f"{field} has {len(values)} choice(s); multiple choice needs at least 2")
    return [_text(v, f"{field}[{i}]") for i, v in enumerate(values)]


def _index(value: Any, n: int, field: str) -> int:
    """A 0-based answer index from an int or a digit string, checked against ``n`` choices."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, str) and not value.strip():
        raise TaskFileError(f"{field} is empty (a test split without labels cannot be scored; "
                            "use a split with answers, e.g. validation)")
    if not isinstance(value, int) or isinstance(value, bool):
        raise TaskFileError(f"{field} must be a 0-based index (an integer), got {value!r}")
    if not 0 <= value < n:
        hint = " (-1 marks a test split without answers: use a split with them)" if value == -1 else ""
        raise TaskFileError(f"{field} {value} is out of range for {n} choices (0..{n - 1}){hint}")
    return value


def _letter_index(value: Any, labels: list[str], field: str) -> int:
    """The position of the answer label ``value`` (a letter, or a digit in ARC) among ``labels``."""
    label = _text(value, field).strip()
    if label not in labels and label.upper() in labels:
        label = label.upper()
    if label not in labels:
        raise TaskFileError(f"{field} {label!r} is not among the choice labels {', '.join(labels)}")
    return labels.index(label)


def _question_prompt(question: str) -> str:
    """The default generative prompt for a bare question."""
    return PROMPT_TEMPLATE.format(question=question.strip())


def _keep(record: dict[str, Any], out: dict[str, Any], *names: str) -> dict[str, Any]:
    """``out`` with the record's id (as a string) and the metadata fields ``names`` that are present."""
    for key in _ID_KEYS:
        if record.get(key) is not None:
            out.setdefault("id", str(record[key]))
            break
    for name in names:
        if record.get(name) is not None:
            out.setdefault(name, record[name])
    return out


# ------------------------------------------------------------------------------------------------ converters


def _mmlu(record: dict[str, Any]) -> dict[str, Any]:
    choices = _choices(_get(record, "choices"), "choices")
    answer = _get(record, "answer")
    if isinstance(answer, str) and not answer.strip().isdigit():
        index = _letter_index(answer, list(_LETTERS[: len(choices)]), "answer")
    else:
        index = _index(answer, len(choices), "answer")
    out = {"question": _text(_get(record, "question"), "question"), "choices": choices, "answer": index}
    return _keep(record, out, "subject")


def _lettered(record: dict[str, Any]) -> dict[str, Any]:
    """C-Eval / CMMLU: options in columns A, B, C, … and the answer as a letter."""
    labels = []
    for letter in _LETTERS:
        if letter not in record:
            break
        labels.append(letter)
    if len(labels) < 2:
        raise TaskFileError("options must be in columns A, B, C, … (at least A and B)")
    choices = [_text(record[x], f"option {x}") for x in labels]
    out = {"question": _text(_get(record, "question", "Question"), "question"), "choices": choices,
           "answer": _letter_index(_get(record, "answer", "Answer"), labels, "answer")}
    return _keep(record, out, "subject")


def _arc(record: dict[str, Any]) -> dict[str, Any]:
    """ARC / CommonsenseQA / OpenBookQA, both the Hugging Face and the original JSONL shape."""
    question = _get(record, "question", "question_stem")
    if isinstance(question, dict):  # original: {"stem": ..., "choices": [{"text", "label"}, ...]}
        stem = _text(_get(question, "stem"), "question.stem")
        items = _get(question, "choices")
        if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
            raise TaskFileError('question.choices must be a list of {"text": ..., "label": ...} objects')
        texts, labels = [c.get("text") for c in items], [c.get("label") for c in items]
    else:
        stem = _text(question, "question")
        choices = _get(record, "choices")
        if not isinstance(choices, dict):
            raise TaskFileError('choices must be an object {"text": [...], "label": [...]}, '
                                f"got a JSON {_type(choices)}")
        texts, labels = _get(choices, "text"), _get(choices, "label")
    texts = _choices(texts, "choices.text")
    if not isinstance(labels, list) or len(labels) != len(texts):
        raise TaskFileError(f"choices have {len(texts)} texts but the labels are {labels!r}")
    labels = [_text(x, "choice label").strip() for x in labels]
    out = {"question": stem, "choices": texts,
           "answer": _letter_index(_get(record, "answerKey"), labels, "answerKey")}
    return _keep(record, out)


def _hellaswag(record: dict[str, Any]) -> dict[str, Any]:
    """A continuation task: the context is the prompt, the endings are the choices."""
    if record.get("ctx"):
        context = _text(record["ctx"], "ctx")
    else:
        parts = [_text(_get(record, "ctx_a"), "ctx_a"), _text(record.get("ctx_b") or "", "ctx_b", empty_ok=True)]
        context = " ".join(p.strip() for p in parts if p.strip())
    choices = _choices(_get(record, "endings"), "endings")
    context = context.strip()
    out = {"question": context, "prompt": context, "choices": choices,
           "answer": _index(_get(record, "label"), len(choices), "label")}
    return _keep(record, out)


def _piqa(record: dict[str, Any]) -> dict[str, Any]:
    choices = [_text(_get(record, "sol1"), "sol1"), _text(_get(record, "sol2"), "sol2")]
    if "label" not in record:
        raise TaskFileError("missing field 'label' (PIQA's original files keep the labels in a separate "
                            "*-labels.lst file: add each line's 0 or 1 as \"label\")")
    out = {"question": _text(_get(record, "goal"), "goal"), "choices": choices,
           "answer": _index(record["label"], 2, "label")}
    return _keep(record, out)


def _gsm8k(record: dict[str, Any]) -> dict[str, Any]:
    """The final answer after ``####`` (thousands separators removed); the reasoning before it is the solution."""
    question = _text(_get(record, "question"), "question")
    answer = _text(_get(record, "answer"), "answer")
    if "####" not in answer:
        raise TaskFileError(f"answer has no '#### <final answer>' line (GSM8K's format): {_preview(answer)}")
    reasoning, _, final = answer.rpartition("####")
    final = _THOUSANDS.sub("", final.strip())
    if not final:
        raise TaskFileError("answer has an empty final answer after '####'")
    out = {"prompt": _question_prompt(question), "answer": final, "solution": reasoning.strip()}
    return _keep(record, out)


def _math(record: dict[str, Any]) -> dict[str, Any]:
    """MATH / MATH-500: the answer field, else the last ``\\boxed{}`` of the solution."""
    problem = _text(_get(record, "problem"), "problem")
    solution = _text(_get(record, "solution"), "solution")
    answer = record.get("answer")
    if answer is None or answer == "":
        answer = extract_answer(solution, style="boxed")
        if answer is None:
            raise TaskFileError("no 'answer' field and no \\boxed{...} in the solution to take it from")
    out = {"prompt": _question_prompt(problem), "answer": _text(answer, "answer"), "solution": solution}
    return _keep(record, out, "subject", "level", "type")


def _aime(record: dict[str, Any]) -> dict[str, Any]:
    """AIME-style (and any question + short answer): answers are written as strings."""
    problem = _text(_get(record, "problem", "Problem", "question"), "problem")
    out = {"prompt": _question_prompt(problem), "answer": _text(_get(record, "answer", "Answer"), "answer")}
    solution = record.get("solution", record.get("Solution"))
    if solution:
        out["solution"] = _text(solution, "solution")
    return _keep(record, out)


def _humaneval(record: dict[str, Any]) -> dict[str, Any]:
    out = {key: _text(_get(record, key), key) for key in ("task_id", "prompt", "test", "entry_point")}
    if record.get("canonical_solution") is not None:
        out["canonical_solution"] = _text(record["canonical_solution"], "canonical_solution", empty_ok=True)
    return out


def _mbpp(record: dict[str, Any]) -> dict[str, Any]:
    """MBPP (full or sanitized): a docstring prompt with the task and its first test, the asserts as ``check``."""
    text = _text(_get(record, "text", "prompt"), "text").strip()
    code = _text(_get(record, "code"), "code")
    tests = _get(record, "test_list")
    if not isinstance(tests, list) or not tests:
        raise TaskFileError("test_list must be a non-empty list of assert statements")
    tests = [_text(t, f"test_list[{i}]").strip() for i, t in enumerate(tests)]
    setup = [_text(record.get("test_setup_code") or "", "test_setup_code", empty_ok=True).strip()]
    setup += [_text(line, "test_imports").strip() for line in record.get("test_imports") or []]
    body = "".join(textwrap.indent(t, "    ") + "\n" for t in tests)
    test = "".join(s + "\n" for s in setup if s) + "def check(candidate):\n" + body
    out = {"task_id": _text(_get(record, "task_id"), "task_id"), "prompt": f'"""\n{text}\n{tests[0]}\n"""\n',
           "test": test, "entry_point": _entry_point(code, tests[0]), "canonical_solution": code}
    return out


def _entry_point(code: str, first_test: str) -> str:
    """The last top-level function of ``code`` whose name the first test uses."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise TaskFileError(f"code does not parse as Python ({e.msg}, line {e.lineno})") from None
    names = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    try:
        used = {node.id for node in ast.walk(ast.parse(first_test)) if isinstance(node, ast.Name)}
    except SyntaxError:
        used = set(re.findall(r"[A-Za-z_]\w*", first_test))
    called = [name for name in names if name in used]
    if not called:
        raise TaskFileError(f"none of the functions defined in code ({', '.join(names) or 'none'}) is used in "
                            f"test_list[0]: {_preview(first_test)}")
    return called[-1]


def _canonical(record: dict[str, Any]) -> dict[str, Any]:
    """A record already in the schema: copied, with a numeric gen answer written as a string."""
    out = dict(record)
    if isinstance(out.get("answer"), int) and not isinstance(out["answer"], bool) and "choices" not in out:
        out["answer"] = str(out["answer"])
    return out


_CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "mmlu": _mmlu, "ceval": _lettered, "cmmlu": _lettered, "arc": _arc, "hellaswag": _hellaswag, "piqa": _piqa,
    "gsm8k": _gsm8k, "math": _math, "aime": _aime, "humaneval": _humaneval, "mbpp": _mbpp, "canonical": _canonical,
}


# ------------------------------------------------------------------------------------------------ validation


def _validate(record: dict[str, Any], kind: str) -> None:
    """Raise :class:`TaskFileError` unless ``record`` fits ``kind``'s canonical schema."""
    if kind == "mc":
        _text(_get(record, "question"), "question", empty_ok="prompt" in record)
        choices = _choices(_get(record, "choices"), "choices")
        answer = _get(record, "answer")
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise TaskFileError(f"answer must be a 0-based index into choices (an integer), got {answer!r}")
        _index(answer, len(choices), "answer")
        if "prompt" in record:
            _text(record["prompt"], "prompt")
    elif kind in _GEN:
        _text(_get(record, "prompt"), "prompt")
        answer = _get(record, "answer")
        if not isinstance(answer, str) or not answer.strip():
            raise TaskFileError(f"answer must be a non-empty string, got {answer!r}")
        if record.get("solution") is not None:
            _text(record["solution"], "solution", empty_ok=True)
    else:
        for key in ("task_id", "prompt", "test", "entry_point"):
            if not isinstance(_get(record, key), str) or not record[key].strip():
                raise TaskFileError(f"{key} must be a non-empty string, got {record[key]!r}")
        if not re.search(r"^def check\s*\(", record["test"], re.M):
            raise TaskFileError("test must define check(candidate) (HumanEval's schema: the program ends with "
                                f"check({record['entry_point']}))")
        if not record["entry_point"].isidentifier():
            raise TaskFileError(f"entry_point {record['entry_point']!r} is not a function name")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise TaskFileError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")


def _check_layout(layout: str, kind: str, guessed: bool) -> None:
    if layout not in LAYOUT_KINDS:
        raise TaskFileError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if kind not in LAYOUT_KINDS[layout]:
        how = "looks like" if guessed else "is"
        gives = " or ".join(LAYOUT_KINDS[layout])
        raise TaskFileError(f"the record {how} layout {layout!r}, which gives kind {gives}, not {kind}; "
                            f"use kind {LAYOUT_KINDS[layout][0]}" + (" or name the layout" if guessed else ""))


def to_canonical(record: dict[str, Any], kind: str, layout: str | None = None) -> dict[str, Any]:
    """``record`` (in ``layout``, detected when None) converted to ``kind``'s canonical schema.

    Raises :class:`TaskFileError` when the layout does not give ``kind`` or a field is missing or invalid.
    """
    _check_kind(kind)
    if not isinstance(record, dict):
        raise TaskFileError(f"a record must be a JSON object, got a JSON {_type(record)}")
    guessed = layout is None
    layout = detect_layout(record) if layout is None else layout
    _check_layout(layout, kind, guessed)
    try:
        out = _CONVERTERS[layout](record)
        _validate(out, kind)
    except TaskFileError as e:
        raise TaskFileError(f"{e} (layout {layout})") from None
    return out


# ------------------------------------------------------------------------------------------------ files


def _load(path: str | Path, kind: str, layout: str | None) -> tuple[str, list[dict[str, Any]]]:
    """The layout used (named, or detected from the first record) and the converted records."""
    _check_kind(kind)
    if layout is not None and layout not in LAYOUT_KINDS:
        raise TaskFileError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    path = Path(path)
    records = read_records(path)
    out = []
    for number, record in enumerate(records, 1):
        try:
            if layout is None:
                layout = detect_layout(record)
                _check_layout(layout, kind, guessed=True)
            out.append(to_canonical(record, kind, layout))
        except TaskFileError as e:
            raise TaskFileError(f"record {number} of {path.name}: {e}") from None
    assert layout is not None  # read_records never returns an empty list
    return layout, out


def load_task_file(path: str | Path, kind: str, layout: str | None = None) -> list[dict[str, Any]]:
    """Every record of the task file at ``path`` in ``kind``'s canonical schema.

    The layout is ``layout`` or, when None, the one detected from the first record (all records must share it).
    Errors name the 1-based record: ``record 7 of data.jsonl: …``.
    """
    return _load(path, kind, layout)[1]


def _convert(src: str | Path, dst: str | Path, kind: str, layout: str | None) -> tuple[int, str]:
    """Write ``src``'s records as canonical JSONL to ``dst``: (count, layout used)."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and dst.samefile(src)):
        raise TaskFileError(f"{dst} is the source file; write the converted records to another path")
    layout, records = _load(src, kind, layout)
    if dst.is_dir():
        raise TaskFileError(f"{dst} is a directory; give a file path such as {dst / (src.stem + '.jsonl')}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return len(records), layout


def convert_file(src: str | Path, dst: str | Path, kind: str, layout: str | None = None) -> int:
    """Convert the task file ``src`` to canonical JSONL at ``dst`` (UTF-8, one object per line); the count.

    Refuses to overwrite ``src``; ``dst`` is written only when every record converts.
    """
    return _convert(src, dst, kind, layout)[0]


# ------------------------------------------------------------------------------------------------ command line


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ``error: …``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m kunlunbaize.eval.convert",
                     description="Convert an evaluation task file (.jsonl, .json, .parquet) in a public layout to "
                                 "the canonical JSONL schema of a task kind.")
    parser.add_argument("src", help="the task file to read")
    parser.add_argument("dst", help="the canonical JSONL file to write")
    parser.add_argument("--kind", required=True, choices=KINDS, help="the task kind whose schema to write")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="the source layout (default: detected from the first record)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the converter's command line; the exit status (0, or 2 with one ``error: …`` line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (already printed) and --help
        return e.code if isinstance(e.code, int) else 2
    try:
        count, layout = _convert(args.src, args.dst, args.kind, args.layout)
    except (TaskFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} records (layout {layout} → kind {args.kind}) to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
