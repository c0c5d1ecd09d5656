"""Answer scoring (extraction, normalisation, exact match, math-verify equivalence) and the built-in arith task."""

from __future__ import annotations

import hashlib
import json
import re
import threading

import pytest

from kunlunbaize.eval import arith, scoring
from kunlunbaize.eval.arith import TEST_SIZE, arith_problems, few_shot_prefix, split_of, write_jsonl
from kunlunbaize.eval.scoring import exact_match, extract_answer, math_equal, normalize

needs_math_verify = pytest.mark.skipif(not scoring.has_math_verify(), reason="math-verify is not installed")


# --- extraction ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"First \boxed{1}, finally $\boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        ("So 3 + 4 = 7. The answer is 7.", "7"),
        ("The final answer is $3.50$. Done after 12 steps", "3.50"),
        ("work 5 and 6\nAnswer: 1,000\n", "1,000"),
        ("Natalia sold 48 clips.\n#### 72", "72"),
        ("I got 3 then 4.5 in the end", "4.5"),
        ("roughly -12 degrees", "-12"),
        ("no digits here at all", None),
        ("", None),
    ],
)
def test_extract_answer_auto(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_order_and_styles() -> None:
    text = "The answer is 5.\n#### 6\n\\boxed{7} and 8"
    assert extract_answer(text) == "7"  # boxed first
    assert extract_answer(text, "answer") == "5"
    assert extract_answer(text, "gsm8k") == "6"
    assert extract_answer(text, "number") == "8"
    assert extract_answer("The answer is 5.\n#### 6") == "5"  # "the answer is" before ####
    assert extract_answer("no box 3", "boxed") is None
    with pytest.raises(ValueError, match="unknown style"):
        extract_answer("1", "nope")


def test_extract_unbalanced_boxed_falls_back() -> None:
    assert extract_answer(r"\boxed{\frac{1}{2} oops 9") == "9"


# --- normalisation and exact match ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  42 ", "42"),
        ("$2.50$", "2.5"),
        ("3.0", "3"),
        ("-0", "0"),
        ("-0.00", "0"),
        ("+5", "5"),
        ("1,000", "1000"),
        ("1,234,567.50", "1234567.5"),
        ("7.", "7"),
        ("x  =\n 1,234 .", "x = 1234"),
        ("(1, 2)", "(1, 2)"),  # a tuple, not a thousands separator
        ("Paris.", "Paris"),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_exact_match() -> None:
    assert exact_match("2.50", "2.5")
    assert exact_match(" $1,000$.", "1000")
    assert exact_match("-0", "0")
    assert not exact_match("2", "-2")
    assert not exact_match("0.5", "1/2")  # equivalence is math_equal's job
    assert not exact_match(None, "1")


# --- math_equal ----------------------------------------------------------------------------------------------------

@needs_math_verify
@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        ("1/2", "0.5"),
        (r"\frac{1}{2}", "0.5"),
        ("2x+1", "1+2x"),
        (r"\{1, 2\}", r"\{2, 1\}"),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
        ("3", r"The answer is $\boxed{3}$"),
        ("1000", "1,000"),
    ],
)
def test_math_equal_equivalences(gold: str, pred: str) -> None:
    assert not exact_match(pred, gold) or gold == "1000"
    assert math_equal(gold, pred)


@needs_math_verify
@pytest.mark.parametrize(
    ("gold", "pred"),
    [("1/2", "1/3"), ("2", "-2"), ("(1, 2]", "[1, 2]"), ("2x+1", "2x-1"), ("5", "")],
)
def test_math_equal_non_equivalences(gold: str, pred: str) -> None:
    assert not math_equal(gold, pred)


@needs_math_verify
def test_math_equal_gold_first() -> None:
    # math-verify converts a gold inequality into an interval, not the other way round
    assert math_equal(r"x \le 2", r"(-\infty, 2]")
    assert not math_equal(r"(-\infty, 2]", r"x \le 2")


@needs_math_verify
def test_math_equal_passes_gold_first_and_no_timeout_off_main_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    import math_verify

    calls: list[tuple] = []
    monkeypatch.setattr(math_verify, "parse", lambda s, parsing_timeout=5: [s])
    monkeypatch.setattr(math_verify, "verify", lambda g, p, timeout_seconds=5: calls.append((g, p, timeout_seconds)))
    math_equal("G", "P", timeout_seconds=3)
    worker = threading.Thread(target=math_equal, args=("G", "P"))
    worker.start()
    worker.join()
    assert calls == [(["$G$"], ["$P$"], 3), (["$G$"], ["$P$"], None)]


@needs_math_verify
def test_math_equal_in_a_worker_thread() -> None:
    results: dict[str, object] = {}

    def work() -> None:
        try:
            results["eq"] = math_equal(r"\frac{1}{2}", "0.5")
            results["ne"] = math_equal("1/2", "1/3")
        except Exception as e:  # the test fails below with the exception shown
            results["error"] = e

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=60)
    assert results == {"eq": True, "ne": False}


def test_math_equal_without_math_verify_is_exact_match(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_math_verify(name: str, *args, **kwargs):
        if name.startswith("math_verify"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    assert not scoring.has_math_verify()
    assert math_equal("2.5", "2.50")
    assert not math_equal("1/2", "0.5")


# --- arith ---------------------------------------------------------------------------------------------------------

def _question(prompt: str) -> str:
    m = re.fullmatch(r"Question: (.+)\nAnswer:", prompt)
    assert m, prompt
    return m.group(1)


def _recompute(question: str) -> int:
    """The answer computed from the question text alone, independently of arith's own evaluator."""
    m = re.fullmatch(r"What is ([\d+\-*() ]+)\?", question)
    if m:
        return eval(m.group(1), {"__builtins__": {}})  # digits, + - * and parentheses only (checked by the regex)
    nums = [int(x) for x in re.findall(r"\d+", question)]
    if "buys" in question:
        return nums[0] + nums[1]
    if "gives" in question:
        return nums[0] - nums[1]
    assert "boxes" in question, question
    return nums[0] * nums[1]


def test_arith_deterministic_and_pinned() -> None:
    assert arith_problems("test") == arith_problems("test")
    assert arith_problems("train", 50) == arith_problems("train", 50)
    first5 = json.dumps(arith_problems("test", 5), sort_keys=True).encode()
    assert hashlib.sha256(first5).hexdigest() == "314d456517694e470537611c5eb650de4f46368d740752d0e0051d7219f1b1ef"
    assert arith_problems("test", 5, seed=1) != arith_problems("test", 5)


def test_arith_sizes_and_records() -> None:
    test = arith_problems("test")
    assert len(test) == TEST_SIZE == 500
    assert arith_problems("test", 10) == test[:10]
    assert len({p["id"] for p in test}) == len({p["prompt"] for p in test}) == TEST_SIZE
    assert {p["level"] for p in test} == {0, 1, 2, 3}
    assert all(p["prompt"].endswith("\nAnswer:") and re.fullmatch(r"-?\d+", p["answer"]) for p in test)
    with pytest.raises(ValueError):
        arith_problems("test", TEST_SIZE + 1)
    with pytest.raises(ValueError):
        arith_problems("dev")


def test_arith_splits_disjoint() -> None:
    test = {p["prompt"] for p in arith_problems("test")}
    for seed in (0, 1):
        train = {p["prompt"] for p in arith_problems("train", 5000, seed=seed)}
        assert not test & train
    assert all(split_of(_question(p)) == "test" for p in test)


def test_arith_generation_ends_when_a_split_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arith, "split_of", lambda question: "train")
    monkeypatch.setattr(arith, "_MAX_MISSES", 1000)
    with pytest.raises(RuntimeError, match="no new test problem"):
        arith_problems("test", 1)


def test_arith_answers_correct() -> None:
    for p in arith_problems("test") + arith_problems("train", 500):
        assert int(p["answer"]) == _recompute(_question(p["prompt"])), p


def test_few_shot_prefix_from_train() -> None:
    prefix = few_shot_prefix(4)
    blocks = prefix.strip().split("\n\n")
    assert len(blocks) == 4 and prefix.endswith("\n\n")
    train = {f"{p['prompt']} {p['answer']}" for p in arith_problems("train", 4)}
    test = {p["prompt"] for p in arith_problems("test")}
    assert set(blocks) == train
    assert not any(b.rsplit(" ", 1)[0] in test for b in blocks)
    assert few_shot_prefix(0) == ""


def test_write_jsonl_gen_schema(tmp_path) -> None:
    path = tmp_path / "arith.jsonl"
    assert write_jsonl(path, arith_problems("test", 3)) == 3
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"prompt": p["prompt"], "answer": p["answer"]} for p in arith_problems("test", 3)]


def test_scoring_a_perfect_and_a_wrong_model() -> None:
    problems = arith_problems("test", 20)
    right = [f" {p['answer']}\n\nQuestion: What is 1 + 1?" for p in problems]  # a model that runs on
    cut = [g.split(arith.STOP[0])[0] for g in right]
    assert all(exact_match(extract_answer(g), p["answer"]) for g, p in zip(cut, problems, strict=True))
    assert not any(exact_match(extract_answer(f" {int(p['answer']) + 1}"), p["answer"]) for p in problems)


# --- the eval extra -----------------------------------------------------------------------------------------------
def test_the_eval_extra_asks_only_for_extras_its_packages_provide_and_brings_antlr4():
    """pip warned "math-verify 0.9.0 does not provide the extra 'antlr4_13_2'" for the old ``eval`` extra."""
    from importlib import metadata
    from pathlib import Path

    import tomllib

    requirements = pytest.importorskip("packaging.requirements")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    specs = [requirements.Requirement(s) for s in pyproject["project"]["optional-dependencies"]["eval"]]
    assert "antlr4-python3-runtime" in {s.name for s in specs}  # math-verify's LaTeX parser needs it
    for spec in specs:
        try:
            provided = metadata.metadata(spec.name).get_all("Provides-Extra") or []
        except metadata.PackageNotFoundError:
            continue
        assert spec.extras <= set(provided), (spec.name, spec.extras, provided)
