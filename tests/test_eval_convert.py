"""Task files for evaluation: reading, layout detection and conversion to the canonical schemas (no torch)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kunlunbaize.eval.convert import (
    KINDS,
    LAYOUT_KINDS,
    LAYOUTS,
    TaskFileError,
    convert_file,
    detect_layout,
    load_task_file,
    main,
    read_records,
    to_canonical,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")

# --- one record per public layout, in the dataset's own field layout -----------------------------------------------

MMLU = {
    "question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
    "subject": "abstract_algebra",
    "choices": ["0", "4", "2", "6"],
    "answer": 1,
}
CEVAL = {
    "id": 0,
    "question": "下列关于税法基本原则的表述中，不正确的是____。",
    "A": "税收法定原则包括税收要件法定原则和税务合法性原则",
    "B": "税收公平原则源于法律上的平等性原则",
    "C": "税收效率原则包含经济效率和行政效率两个方面",
    "D": "税务机关按法定程序依法征税，可以自由做出减征、停征或免征税款的决定",
    "answer": "D",
    "explanation": "",
}
CMMLU = {
    "Question": "在农业生产中被当作极其重要的劳动对象发挥作用，最主要的不可替代的基本生产资料是",
    "A": "农业生产工具",
    "B": "土地",
    "C": "劳动力",
    "D": "资金",
    "Answer": "B",
}
ARC = {
    "id": "Mercury_SC_415702",
    "question": "George wants to warm his hands quickly by rubbing them. Which skin surface will produce the most "
                "heat?",
    "choices": {
        "text": ["dry palms", "wet palms", "palms covered with oil", "palms covered with lotion"],
        "label": ["A", "B", "C", "D"],
    },
    "answerKey": "A",
}
ARC_ORIGINAL = {
    "id": "Mercury_7175875",
    "question": {
        "stem": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
                "likely effect of this increase in rotation?",
        "choices": [
            {"text": "Planetary density will decrease.", "label": "1"},
            {"text": "Planetary years will become longer.", "label": "2"},
            {"text": "Planetary days will become shorter.", "label": "3"},
            {"text": "Planetary gravity will become stronger.", "label": "4"},
        ],
    },
    "answerKey": "3",
}
CSQA = {
    "id": "075e483d21c29a511267ef62bedc0461",
    "question": "The sanctions against the school were a punishing blow, and they seemed to what the efforts the "
                "school had made to change?",
    "question_concept": "punishing",
    "choices": {"label": ["A", "B", "C", "D", "E"],
                "text": ["ignore", "enforce", "authoritarian", "yell at", "avoid"]},
    "answerKey": "A",
}
HELLASWAG = {
    "ind": 24,
    "activity_label": "Roof shingle removal",
    "ctx_a": "A man is sitting on a roof.",
    "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he",
    "endings": [
        "is using wrap to wrap a pair of skis.",
        "is ripping level tiles off.",
        "is holding a rubik's cube.",
        "starts pulling up roofing on a roof.",
    ],
    "source_id": "activitynet~v_-JhWjGDPHMY",
    "split": "val",
    "split_type": "indomain",
    "label": "3",
}
PIQA = {
    "goal": "When boiling butter, when it's ready, you can",
    "sol1": "Pour it onto a plate",
    "sol2": "Pour it into a jar",
    "label": 1,
}
GSM8K = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}
MATH = {
    "problem": "If $x^2+y^2=1$, what is the largest possible value of $|x|+|y|$?",
    "solution": "If $(x,y)$ lies on the circle, so does $(x,-y)$... so the largest value is $\\boxed{\\sqrt{2}}$.",
    "answer": "\\sqrt{2}",
    "subject": "Intermediate Algebra",
    "level": 3,
    "unique_id": "test/intermediate_algebra/1880.json",
}
AIME = {
    "ID": "2024-II-4",
    "Problem": "Let $x,y$ and $z$ be positive real numbers that satisfy the following system of equations ... "
               "Then the value of $\\left|\\log_2(x^4y^3z^2)\\right|$ is $\\tfrac{m}{n}$. Find $m+n$.",
    "Solution": "Denote $\\log_2(x) = a$ ... so $m+n = \\boxed{033}$.",
    "Answer": 33,
}
HUMANEVAL = {
    "task_id": "HumanEval/53",
    "prompt": "\n\ndef add(x: int, y: int):\n    \"\"\"Add two numbers x and y\n    >>> add(2, 3)\n    5\n"
              "    \"\"\"\n",
    "canonical_solution": "    return x + y\n",
    "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(0, 1) == 1\n"
            "    assert candidate(5, 7) == 12\n",
    "entry_point": "add",
}
MBPP = {
    "task_id": 2,
    "text": "Write a function to find the similar elements from the given two tuple lists.",
    "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
            "  return (res) ",
    "test_list": [
        "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
        "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
        "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
    ],
    "test_setup_code": "",
    "challenge_test_list": [],
}
MBPP_SANITIZED = {  # helper defined first, the tested function last; an import the tests need
    "source_file": "Benchmark Questions Verification V2.ipynb",
    "task_id": 7,
    "prompt": "Write a function to find all words which are at least 4 characters long in a string.",
    "code": "import re\ndef _words(text):\n    return re.findall(r\"\\b\\w{4,}\\b\", text)\n"
            "def find_char_long(text):\n  return _words(text)",
    "test_imports": ["import math"],
    "test_list": [
        "assert set(find_char_long('Please move back to stream')) == set(['Please', 'move', 'back', 'stream'])",
        "assert math.isclose(len(find_char_long('Jing Eco and Tech')), 2)",
    ],
}

EXPECTED = {
    "mmlu": (MMLU, "mc", {"question": MMLU["question"], "choices": ["0", "4", "2", "6"], "answer": 1,
                          "subject": "abstract_algebra"}),
    "ceval": (CEVAL, "mc", {"question": CEVAL["question"], "choices": [CEVAL[x] for x in "ABCD"], "answer": 3,
                            "id": "0"}),
    "cmmlu": (CMMLU, "mc", {"question": CMMLU["Question"], "choices": ["农业生产工具", "土地", "劳动力", "资金"],
                            "answer": 1}),
    "arc": (ARC, "mc", {"question": ARC["question"], "choices": ARC["choices"]["text"], "answer": 0,
                        "id": "Mercury_SC_415702"}),
    "hellaswag": (HELLASWAG, "mc", {"question": "A man is sitting on a roof. he",
                                    "prompt": "A man is sitting on a roof. he", "choices": HELLASWAG["endings"],
                                    "answer": 3}),
    "piqa": (PIQA, "mc", {"question": PIQA["goal"], "choices": ["Pour it onto a plate", "Pour it into a jar"],
                          "answer": 1}),
    "gsm8k": (GSM8K, "gen", {
        "prompt": f"Question: {GSM8K['question']}\nAnswer:",
        "answer": "72",
        "solution": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.",
    }),
    "math": (MATH, "gen", {"prompt": f"Question: {MATH['problem']}\nAnswer:", "answer": "\\sqrt{2}",
                           "solution": MATH["solution"], "id": "test/intermediate_algebra/1880.json",
                           "subject": "Intermediate Algebra", "level": 3}),
    "aime": (AIME, "gen", {"prompt": f"Question: {AIME['Problem']}\nAnswer:", "answer": "33",
                           "solution": AIME["Solution"], "id": "2024-II-4"}),
    "humaneval": (HUMANEVAL, "code", HUMANEVAL),
    "mbpp": (MBPP, "code", {
        "task_id": "2",
        "prompt": '"""\nWrite a function to find the similar elements from the given two tuple lists.\n'
                  'assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"""\n',
        "test": "def check(candidate):\n"
                "    assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
                "    assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n"
                "    assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n",
        "entry_point": "similar_elements",
        "canonical_solution": MBPP["code"],
    }),
}


def program(record: dict, completion: str) -> str:
    """HumanEval's checking program."""
    return record["prompt"] + completion + "\n" + record["test"] + "\n" + f"check({record['entry_point']})"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# --- conversion ----------------------------------------------------------------------------------------------------

def test_constants() -> None:
    assert KINDS == ("mc", "gen", "math-avg", "code")
    assert set(LAYOUTS) == set(LAYOUT_KINDS) == {*EXPECTED, "canonical"}
    assert LAYOUT_KINDS["gsm8k"] == ("gen", "math-avg")
    assert LAYOUT_KINDS["canonical"] == KINDS


@pytest.mark.parametrize("layout", list(EXPECTED))
def test_each_layout_converts(layout: str) -> None:
    record, kind, expected = EXPECTED[layout]
    assert to_canonical(record, kind, layout) == expected
    assert to_canonical(record, kind) == expected  # detected


@pytest.mark.parametrize("layout", list(EXPECTED))
def test_each_layout_is_detected(layout: str) -> None:
    assert detect_layout(EXPECTED[layout][0]) == layout


@pytest.mark.parametrize(
    ("record", "layout"),
    [
        (ARC_ORIGINAL, "arc"),
        (CSQA, "arc"),
        (MBPP_SANITIZED, "mbpp"),
        ({"problem": "What is $1+1$?", "answer": "2"}, "aime"),
        ({"question": "What is 2 + 3?", "answer": 5}, "aime"),
        ({"prompt": "Question: What is 2 + 3?\nAnswer:", "answer": "5"}, "canonical"),
        ({"question": "q", "choices": ["a", "b"], "answer": 0, "prompt": "Q: q\nA:"}, "canonical"),
        ({"ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "endings": ["a", "b"], "label": 0}, "hellaswag"),
    ],
)
def test_detect_other_shapes(record: dict, layout: str) -> None:
    assert detect_layout(record) == layout


def test_arc_original_and_commonsenseqa() -> None:
    assert to_canonical(ARC_ORIGINAL, "mc") == {
        "question": ARC_ORIGINAL["question"]["stem"],
        "choices": [c["text"] for c in ARC_ORIGINAL["question"]["choices"]],
        "answer": 2,
        "id": "Mercury_7175875",
    }
    out = to_canonical(CSQA, "mc")
    assert out["choices"] == ["ignore", "enforce", "authoritarian", "yell at", "avoid"]
    assert out["answer"] == 0


def test_hellaswag_from_ctx_a_and_ctx_b_and_int_label() -> None:
    record = {k: v for k, v in HELLASWAG.items() if k != "ctx"} | {"label": 2}
    out = to_canonical(record, "mc", "hellaswag")
    assert out["prompt"] == "A man is sitting on a roof. he"
    assert out["answer"] == 2


def test_mmlu_letter_answer() -> None:
    assert to_canonical(MMLU | {"answer": "C"}, "mc", "mmlu")["answer"] == 2


def test_ceval_with_five_options_and_lowercase_answer() -> None:
    out = to_canonical({"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "E": "e", "answer": "e"}, "mc")
    assert out == {"question": "q", "choices": ["a", "b", "c", "d", "e"], "answer": 4}


def test_gsm8k_thousands_separator() -> None:
    record = {"question": "How much?", "answer": "He pays 1000+234 = <<1000+234=1234>>1,234 dollars.\n#### 1,234"}
    out = to_canonical(record, "math-avg")
    assert out == {"prompt": "Question: How much?\nAnswer:", "answer": "1234",
                   "solution": "He pays 1000+234 = <<1000+234=1234>>1,234 dollars."}


def test_math_without_answer_takes_the_last_boxed() -> None:
    record = {"problem": "What is $\\frac{2}{4}$ in lowest terms?", "level": "Level 1", "type": "Prealgebra",
              "solution": "We divide by $\\boxed{2}$: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$."}
    out = to_canonical(record, "gen")
    assert out == {"prompt": "Question: What is $\\frac{2}{4}$ in lowest terms?\nAnswer:",
                   "answer": "\\frac{1}{2}", "solution": record["solution"], "level": "Level 1",
                   "type": "Prealgebra"}


def test_aime_lowercase_and_question() -> None:
    out = to_canonical({"id": 60, "problem": "Find $n$.", "solution": "n is \\boxed{204}", "answer": "204",
                        "url": "https://artofproblemsolving.com/…"}, "gen", "aime")
    assert out == {"prompt": "Question: Find $n$.\nAnswer:", "answer": "204", "solution": "n is \\boxed{204}",
                   "id": "60"}


def test_canonical_records_pass_through() -> None:
    mc = {"id": "x1", "question": "2+2?", "choices": ["3", "4"], "answer": 1, "subject": "arith"}
    assert to_canonical(mc, "mc", "canonical") == mc
    gen = {"prompt": "Question: What is 2 + 3?\nAnswer:", "answer": "5", "solution": "2 + 3 = 5"}
    assert to_canonical(gen, "gen") == gen
    assert to_canonical({"prompt": "p", "answer": 5}, "math-avg") == {"prompt": "p", "answer": "5"}
    assert to_canonical(HUMANEVAL, "code", "canonical") == HUMANEVAL


def test_humaneval_program_runs() -> None:
    out = to_canonical(HUMANEVAL, "code")
    exec(program(out, out["canonical_solution"]), {})
    with pytest.raises(AssertionError):
        exec(program(out, "    return x - y\n"), {})


@pytest.mark.parametrize(
    ("record", "wrong"),
    [
        (MBPP, "def similar_elements(a, b):\n    return (5, 4)\n"),
        (MBPP_SANITIZED, "def find_char_long(text):\n    return text.split()\n"),
    ],
    ids=["mbpp", "mbpp-sanitized"],
)
def test_mbpp_program_runs_and_a_wrong_solution_fails(record: dict, wrong: str) -> None:
    out = to_canonical(record, "code")
    exec(program(out, out["canonical_solution"]), {})
    with pytest.raises(AssertionError):
        exec(program(out, wrong), {})


def test_mbpp_sanitized_fields() -> None:
    out = to_canonical(MBPP_SANITIZED, "code")
    assert out["entry_point"] == "find_char_long"  # the last def the first test uses, not the helper
    assert out["task_id"] == "7"
    assert out["test"].startswith("import math\ndef check(candidate):\n    assert set(find_char_long(")
    assert out["prompt"].startswith('"""\nWrite a function to find all words')


# --- conversion errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("record", "kind", "layout", "message"),
    [
        (GSM8K, "mc", None, "the record looks like layout 'gsm8k', which gives kind gen or math-avg, not mc; "
                            "use kind gen or name the layout"),
        (MMLU, "gen", "mmlu", "the record is layout 'mmlu', which gives kind mc, not gen; use kind mc"),
        (HUMANEVAL, "gen", None, "gives kind code, not gen"),
        (MMLU | {"answer": 4}, "mc", None, "answer 4 is out of range for 4 choices (0..3)"),
        (MMLU | {"answer": "E"}, "mc", None, "answer 'E' is not among the choice labels A, B, C, D"),
        (MMLU | {"answer": True}, "mc", None, "answer must be a 0-based index (an integer), got True"),
        (MMLU | {"choices": []}, "mc", None, "choices has 0 choice(s); multiple choice needs at least 2"),
        (MMLU | {"choices": ["a", " "]}, "mc", None, "choices[1] is empty"),
        (MMLU | {"choices": "abcd"}, "mc", None, "choices must be a list of strings, got a JSON string"),
        (CEVAL | {"answer": "F"}, "mc", None, "answer 'F' is not among the choice labels A, B, C, D"),
        (CEVAL | {"B": ""}, "mc", None, "option B is empty"),
        (ARC | {"answerKey": "E"}, "mc", None, "answerKey 'E' is not among the choice labels A, B, C, D"),
        (HELLASWAG | {"label": ""}, "mc", None, "label is empty (a test split without labels cannot be scored"),
        (HELLASWAG | {"label": "7"}, "mc", None, "label 7 is out of range for 4 choices (0..3)"),
        (PIQA | {"label": -1}, "mc", None, "label -1 is out of range for 2 choices (0..1)"),
        ({k: v for k, v in PIQA.items() if k != "label"}, "mc", "piqa", "missing field 'label' (PIQA's original"),
        (GSM8K | {"answer": "72"}, "gen", "gsm8k", "answer has no '#### <final answer>' line (GSM8K's format)"),
        ({"problem": "p", "solution": "no box here"}, "gen", None,
         "no 'answer' field and no \\boxed{...} in the solution to take it from (layout math)"),
        ({"Problem": "p"}, "gen", "aime", "missing field 'answer' or 'Answer' (keys found: Problem) (layout aime)"),
        (HUMANEVAL | {"test": "assert add(1, 2) == 3\n"}, "code", None, "test must define check(candidate)"),
        (MBPP | {"code": "def f(:\n"}, "code", None, "code does not parse as Python"),
        (MBPP | {"test_list": ["assert g(1) == 1"]}, "code", None,
         "none of the functions defined in code (similar_elements) is used in test_list[0]"),
        (MBPP | {"test_list": []}, "code", None, "test_list must be a non-empty list of assert statements"),
        ({"question": "q", "choices": ["a", "b"], "answer": "B", "prompt": "p"}, "mc", None,
         "answer must be a 0-based index into choices (an integer), got 'B' (layout canonical)"),
        ({"prompt": "p", "answer": ""}, "gen", None, "answer must be a non-empty string, got ''"),
        (MMLU, "bogus", None, "unknown kind 'bogus'; expected one of mc, gen, math-avg, code"),
        (MMLU, "mc", "mmmlu", "unknown layout 'mmmlu'; expected one of mmlu, ceval"),
    ],
)
def test_conversion_errors(record: dict, kind: str, layout: str | None, message: str) -> None:
    with pytest.raises(TaskFileError) as e:
        to_canonical(record, kind, layout)
    assert message in str(e.value)


def test_converted_files_load_again_unchanged(tmp_path: Path) -> None:
    """A converted file is canonical: read back with auto-detection, every record stays as written."""
    for layout, (record, kind, expected) in EXPECTED.items():
        src = write_jsonl(tmp_path / f"{layout}.jsonl", [record])
        dst = tmp_path / f"{layout}-canonical.jsonl"
        assert convert_file(src, dst, kind) == 1
        assert load_task_file(dst, kind) == [expected], layout


def test_undetectable_record() -> None:
    with pytest.raises(TaskFileError) as e:
        detect_layout({"text": "hello", "label": 1})
    assert str(e.value).startswith("cannot tell the layout of a record with keys label, text; supported layouts: "
                                   "mmlu, ceval, cmmlu, arc, hellaswag, piqa, gsm8k, math, aime, humaneval, mbpp, "
                                   "canonical")
    assert issubclass(TaskFileError, ValueError)
    with pytest.raises(TaskFileError, match="a record must be a JSON object, got a JSON array"):
        detect_layout([1, 2])  # type: ignore[arg-type]


# --- reading files -------------------------------------------------------------------------------------------------

def test_read_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(MMLU) + "\n\n  \n" + json.dumps(PIQA) + "\n", encoding="utf-8")
    assert read_records(path) == [MMLU, PIQA]


def test_read_json_list_and_data_object(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([MMLU, PIQA]), encoding="utf-8")
    assert read_records(tmp_path / "a.json") == [MMLU, PIQA]
    (tmp_path / "b.json").write_text(json.dumps({"version": "1", "data": [GSM8K]}), encoding="utf-8")
    assert read_records(tmp_path / "b.json") == [GSM8K]
    (tmp_path / "c.json").write_text(json.dumps(GSM8K) + "\n" + json.dumps(GSM8K) + "\n", encoding="utf-8")
    assert read_records(tmp_path / "c.json") == [GSM8K, GSM8K]  # JSON Lines saved as .json


def test_read_utf8_with_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CMMLU, ensure_ascii=False).encode("utf-8") + b"\n")
    assert read_records(path) == [CMMLU]


def test_read_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([ARC, ARC | {"id": "x", "answerKey": "B"}]), tmp_path / "arc.parquet")
    assert read_records(tmp_path / "arc.parquet") == [ARC, ARC | {"id": "x", "answerKey": "B"}]
    assert [r["answer"] for r in load_task_file(tmp_path / "arc.parquet", "mc")] == [0, 1]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(TaskFileError, match=re.escape("bad.parquet is not a readable Parquet file")):
        read_records(tmp_path / "bad.parquet")


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "t.parquet").write_bytes(b"PAR1....PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(TaskFileError, match=re.escape("reading Parquet needs pyarrow: pip install pyarrow")):
        read_records(tmp_path / "t.parquet")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "empty.jsonl is empty; a task file needs at least one record"),
        ("blank.jsonl", b"\n  \n", "blank.jsonl is empty (only whitespace)"),
        ("none.json", b"[]", "none.json holds no records"),
        ("gbk.jsonl", b'{"q": "a"}\n{"q": "\xd6\xd0\xce\xc4"}\n',
         "gbk.jsonl is not UTF-8 text: byte 0xd6 at byte offset 18 (line 2) cannot be decoded; re-save the file "
         "as UTF-8"),
        ("bin.jsonl", b'{"q": 1}\n\x00\x01\x02', "bin.jsonl looks like a binary file (a NUL byte at byte offset 9, "
                                                 "line 2)"),
        ("gz.jsonl", b"\x1f\x8b\x08\x00rest", "gz.jsonl is gzip-compressed; decompress it first"),
        ("pq.jsonl", b"PAR1\x00\x00", "pq.jsonl is a Parquet file, not JSON text; rename it to pq.parquet"),
        ("bad.jsonl", b'{"q": 1}\n{"q": 2}\n{"q": 3,}\n', "bad.jsonl line 3 is not valid JSON"),
        ("list.jsonl", b'{"q": 1}\n[1, 2]\n', "list.jsonl line 2 is a JSON array, not an object"),
        ("obj.json", b'{"a": 1}', "obj.json is a JSON object with 0 list values (keys: a)"),
        ("two.json", b'{"a": [], "b": []}', "two.json is a JSON object with 2 list values (keys: a, b)"),
        ("items.json", b'[{"q": 1}, "x"]', "items.json: item 2 of the list is a JSON string, not an object"),
        ("broken.json", b'[{"q": 1}', "broken.json is not valid JSON"),
        ("data.csv", b"a,b\n1,2\n", "data.csv: unsupported file type '.csv'; a task file is .jsonl, .json, .parquet"),
    ],
)
def test_read_errors(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TaskFileError) as e:
        read_records(path)
    assert message in str(e.value)


def test_read_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match=re.escape("nope.jsonl: no such file")):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(TaskFileError, match=re.escape("is a directory; give one task file")):
        read_records(tmp_path)


# --- whole files ---------------------------------------------------------------------------------------------------

def test_load_task_file_numbers_the_bad_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [MMLU] * 6 + [MMLU | {"answer": 9}])
    with pytest.raises(TaskFileError) as e:
        load_task_file(path, "mc")
    assert str(e.value) == "record 7 of data.jsonl: answer 9 is out of range for 4 choices (0..3) (layout mmlu)"


def test_load_task_file_wrong_kind_and_mixed_layouts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gsm.jsonl", [GSM8K])
    with pytest.raises(TaskFileError) as e:
        load_task_file(path, "mc")
    assert str(e.value).startswith("record 1 of gsm.jsonl: the record looks like layout 'gsm8k', which gives kind "
                                   "gen or math-avg, not mc")
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [GSM8K, MATH])
    with pytest.raises(TaskFileError, match=re.escape("record 2 of mixed.jsonl: missing field 'question'")):
        load_task_file(mixed, "gen")


def test_load_task_file_empty_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(TaskFileError, match=re.escape("e.jsonl is empty")):
        load_task_file(tmp_path / "e.jsonl", "gen")


def test_convert_file_writes_canonical_jsonl(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "cmmlu.jsonl", [CMMLU, CMMLU])
    dst = tmp_path / "out" / "mc.jsonl"
    assert convert_file(src, dst, "mc") == 2
    text = dst.read_text(encoding="utf-8")
    assert text == 2 * (json.dumps(EXPECTED["cmmlu"][2], ensure_ascii=False) + "\n")
    assert "土地" in text  # not \u-escaped
    assert load_task_file(dst, "mc", "canonical") == [EXPECTED["cmmlu"][2]] * 2


def test_convert_file_refuses_to_overwrite_its_source(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "g.jsonl", [GSM8K])
    before = src.read_bytes()
    with pytest.raises(TaskFileError, match=re.escape("is the source file; write the converted records")):
        convert_file(src, tmp_path / "." / "g.jsonl", "gen")
    assert src.read_bytes() == before


def test_convert_file_writes_nothing_on_error(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "g.jsonl", [GSM8K, GSM8K | {"answer": "no marker"}])
    with pytest.raises(TaskFileError, match=re.escape("record 2 of g.jsonl")):
        convert_file(src, tmp_path / "out.jsonl", "gen")
    assert not (tmp_path / "out.jsonl").exists()


# --- command line --------------------------------------------------------------------------------------------------

def test_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_jsonl(tmp_path / "he.jsonl", [HUMANEVAL])
    dst = tmp_path / "code.jsonl"
    assert main([str(src), str(dst), "--kind", "code"]) == 0
    assert capsys.readouterr().out == f"wrote 1 records (layout humaneval → kind code) to {dst}\n"
    assert json.loads(dst.read_text(encoding="utf-8")) == HUMANEVAL

    assert main([str(src), str(dst), "--kind", "code", "--layout", "mbpp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: record 1 of he.jsonl: missing field 'code'")
    assert err.count("\n") == 1

    assert main([str(src), str(dst), "--kind", "mcq"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --kind: invalid choice: 'mcq'")
    assert err.count("\n") == 1

    assert main([str(tmp_path / "missing.jsonl"), str(dst), "--kind", "gen"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.jsonl'}: no such file; check the path " \
                                      "(a task file is .jsonl, .json or .parquet)\n"


def _run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "kunlunbaize.eval.convert", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=60)


@pytest.mark.subprocess
def test_command_line_subprocess(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "gsm8k.jsonl", [GSM8K, GSM8K])
    r = _run_module("gsm8k.jsonl", "gen.jsonl", "--kind", "gen", cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "wrote 2 records (layout gsm8k → kind gen) to gen.jsonl\n", "")
    assert load_task_file(tmp_path / "gen.jsonl", "gen") == [EXPECTED["gsm8k"][2]] * 2

    r = _run_module("gsm8k.jsonl", "mc.jsonl", "--kind", "mc", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == ("error: record 1 of gsm8k.jsonl: the record looks like layout 'gsm8k', which gives kind "
                        "gen or math-avg, not mc; use kind gen or name the layout\n")
    assert not (tmp_path / "mc.jsonl").exists()


@pytest.mark.subprocess
def test_module_imports_no_torch() -> None:
    code = "import sys, kunlunbaize.eval.convert; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr
