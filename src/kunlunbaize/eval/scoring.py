"""Answer scoring for generative evaluation: extraction, normalisation, exact match, mathematical equivalence.

No torch import. :func:`math_equal` uses `math-verify <https://github.com/huggingface/Math-Verify>`_ when it is
installed (the ``eval`` extra) and falls back to :func:`exact_match` otherwise.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation

__all__ = ["exact_match", "extract_answer", "has_math_verify", "math_equal", "normalize", "string_match_all",
           "string_match_part"]

STYLES = ("auto", "boxed", "answer", "gsm8k", "number")

_ANSWER_IS = re.compile(r"the (?:final )?answer is\s*:?\s*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE | re.MULTILINE)
_ANSWER_COLON = re.compile(r"answer\s*:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+/\d+|-?\d+(?:\.\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+)(?![\d,])")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with balanced braces; None if absent."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def _last_match(pattern: re.Pattern[str], text: str) -> str | None:
    """The first group of the last match of ``pattern`` in ``text``, stripped, or None."""
    matches = [m.group(1).strip() for m in pattern.finditer(text)]
    matches = [m for m in matches if m]
    return matches[-1] if matches else None


def _clean(answer: str | None) -> str | None:
    """Strip whitespace, surrounding ``$`` and a trailing period from an extracted answer."""
    if answer is None:
        return None
    answer = answer.strip().rstrip(".").strip().strip("$").strip()
    return answer or None


def _last_number(text: str) -> str | None:
    """The last number in ``text`` (integers, decimals, fractions ``a/b``, ``1,000``-style thousands)."""
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def extract_answer(text: str, style: str = "auto") -> str | None:
    """The model's final answer from a generation, or None when none is found.

    ``style`` picks one extractor; ``"auto"`` tries them in this order and returns the first hit:

    1. ``"boxed"``: the content of the last ``\\boxed{...}`` (balanced braces, so ``\\boxed{\\frac{1}{2}}`` works);
    2. ``"answer"``: the last "The answer is X" (up to the end of the line or sentence), else the last "Answer: X"
       (to the end of the line);
    3. ``"gsm8k"``: the last ``#### X`` line (GSM8K's format);
    4. ``"number"``: the last number in the text.

    Extracted answers have whitespace, surrounding ``$`` and a trailing period removed.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    extractors = {
        "boxed": _last_boxed,
        "answer": lambda t: _last_match(_ANSWER_IS, t) or _last_match(_ANSWER_COLON, t),
        "gsm8k": lambda t: _last_match(_GSM8K, t),
        "number": _last_number,
    }
    order = STYLES[1:] if style == "auto" else (style,)
    for name in order:
        found = _clean(extractors[name](text))
        if found is not None:
            return found
    return None


def _canonical_number(text: str) -> str | None:
    """``text`` as a canonical decimal string if it is a plain number ("2.50" -> "2.5", "-0" -> "0"), else None."""
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize(text: str) -> str:
    """A string normalised for exact match.

    Strips whitespace, surrounding ``$`` and a trailing period; collapses runs of whitespace to one space; removes
    thousands separators in numbers ("1,000" -> "1000"); a string that is a single number is written canonically
    ("2.50" -> "2.5", "3.0" -> "3", "-0" -> "0", "+5" -> "5"). Numbers inside longer text are not rewritten
    beyond the thousands separators.
    """
    text = " ".join(text.split())
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip("$").strip()
        if text.endswith(".") and not _PLAIN_NUMBER.fullmatch(text):
            text = text[:-1]
    text = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), text)
    return _canonical_number(text) or text


def exact_match(pred: str | None, gold: str) -> bool:
    """True when ``pred`` equals ``gold`` after :func:`normalize`; a missing prediction (None) never matches."""
    if pred is None:
        return False
    return normalize(pred) == normalize(gold)


def has_math_verify() -> bool:
    """Whether the optional ``math_verify`` package can be imported."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def _as_latex(text: str) -> str:
    """Wrap ``text`` in ``$...$`` unless it already has math delimiters or a ``\\boxed``.

    math-verify extracts LaTeX only from delimited math; a bare "2x+1" is otherwise read as the number 2.
    """
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return text
    return f"${text}$"


def math_equal(gold: str, pred: str | None, timeout_seconds: int = 5) -> bool:
    """True when ``pred`` is mathematically equivalent to ``gold`` ("1/2" == "0.5" == "\\frac{1}{2}").

    Uses math-verify: ``verify(parse(gold), parse(pred))`` with the GOLD FIRST, because ``verify`` is not symmetric
    (e.g. gold "x \\le 2" accepts the prediction "(-\\infty, 2]", but not the other way round). Bare answers without
    math delimiters are wrapped in ``$...$`` before parsing. The result is also True when the two strings
    :func:`exact_match`.

    Timeouts: math-verify limits parsing and comparison with ``signal.alarm``, which works only in the main thread.
    Called from any other thread, this function passes ``parsing_timeout=None`` and ``timeout_seconds=None``
    (math-verify then runs without a time limit; the caller must bound the time itself, e.g. with a process pool).
    In the main thread, ``timeout_seconds`` applies to each parse and each comparison.

    Without math-verify installed (``pip install 'kunlunbaize[eval]'``) this is :func:`exact_match`.
    """
    if pred is None:
        return False
    if exact_match(pred, gold):
        return True
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    limit = timeout_seconds if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(_as_latex(gold), parsing_timeout=limit)
    pred_parsed = parse(_as_latex(pred), parsing_timeout=limit)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=limit))


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's ``string_match_all`` for one sample: the fraction of ``references`` that occur in ``prediction``
    (case-insensitive substring)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER's ``string_match_part`` for one sample: 1 when any of ``references`` occurs in ``prediction``
    (case-insensitive substring), else 0."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))
