"""The built-in ``arith`` task: generated arithmetic problems with exact integer answers.

No downloads and no torch: the problems are generated deterministically from :class:`random.Random` bit streams
(``getrandbits`` only, with explicit integer arithmetic, never ``hash()``), so they are the same on every machine
and Python version. Four levels, taken in turn:

0. addition / subtraction of 1-2 digit numbers ("What is 23 + 45?");
1. multiplication (a 1-2 digit number times a number from 2 to 19);
2. a two-step expression with parentheses ("What is (12 + 7) * 3?");
3. a small word problem ("Tom has 3 apples and buys 4 more. How many apples does Tom have?").

Splits: every problem's question text is hashed with SHA-256 and one in five goes to ``test``, the rest to
``train``, so the splits are disjoint by construction for every seed. The test split has :data:`TEST_SIZE`
problems (fixed, so scores are comparable); the train split is as long as asked for.

Two schemas: :func:`arith_problems` gives the ``gen`` schema (``prompt``, ``answer``: the model writes the
number), :func:`arith_mc_problems` the same problems in the ``mc`` schema (``question``, four ``choices``,
``answer`` index: the model's log-likelihood picks the number).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "MAX_TRAIN", "PROMPT_TEMPLATE", "STOP", "TEST_SIZE", "arith_mc_problems", "arith_problems", "few_shot_prefix",
    "split_of", "write_jsonl",
]

TEST_SIZE = 500
TRAIN_SIZE = 5000
MAX_TRAIN = 50_000  # well below the ~100k distinct train problems, so generation always ends
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
STOP = ("\n\n", "\nQuestion:")  # stop sequences for generation: the model should answer on one line
_TEST_BUCKETS = 5  # one problem in five is a test problem
_MAX_MISSES = 100_000

_NAMES = ("Tom", "Anna", "Ben", "Maria", "Li", "Sara", "Omar", "Emma", "Ivan", "Yuki")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "coins", "cards")


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    """A uniform integer in ``[lo, hi]`` from ``rng.getrandbits`` by rejection (stable across Python versions)."""
    span = hi - lo + 1
    bits = span.bit_length()
    while True:
        r = rng.getrandbits(bits)
        if r < span:
            return lo + r


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    """A uniform choice from ``options`` via :func:`_randint`."""
    return options[_randint(rng, 0, len(options) - 1)]


def _level0(rng: random.Random) -> tuple[str, str]:
    """Addition or subtraction of 1-2 digit numbers: (question, expression)."""
    a, b = _randint(rng, 0, 99), _randint(rng, 0, 99)
    op = "+" if _randint(rng, 0, 1) == 0 else "-"
    return f"What is {a} {op} {b}?", f"{a} {op} {b}"


def _level1(rng: random.Random) -> tuple[str, str]:
    """Multiplication of a 1-2 digit number by a number from 2 to 19."""
    a, b = _randint(rng, 2, 99), _randint(rng, 2, 19)
    return f"What is {a} * {b}?", f"{a} * {b}"


def _level2(rng: random.Random) -> tuple[str, str]:
    """A two-step expression with parentheses."""
    a, b, c = _randint(rng, 1, 30), _randint(rng, 1, 30), _randint(rng, 2, 9)
    shape = _randint(rng, 0, 3)
    expr = ("({a} + {b}) * {c}", "({a} - {b}) * {c}", "{c} * ({a} + {b})", "({a} + {b}) - {c}")[shape]
    expr = expr.format(a=a, b=b, c=c)
    return f"What is {expr}?", expr


def _level3(rng: random.Random) -> tuple[str, str]:
    """A small word problem (buying more, giving away, or boxes of items)."""
    name, item = _pick(rng, _NAMES), _pick(rng, _ITEMS)
    kind = _randint(rng, 0, 2)
    if kind == 0:
        a, b = _randint(rng, 1, 20), _randint(rng, 1, 20)
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have?"
        return q, f"{a} + {b}"
    if kind == 1:
        a = _randint(rng, 2, 30)
        b = _randint(rng, 1, a)
        q = f"{name} has {a} {item} and gives {b} away. How many {item} does {name} have left?"
        return q, f"{a} - {b}"
    a, b = _randint(rng, 2, 9), _randint(rng, 2, 12)
    q = f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have?"
    return q, f"{a} * {b}"


_LEVELS = (_level0, _level1, _level2, _level3)


def _evaluate(expr: str) -> int:
    """The value of an expression made of integers, ``+ - *`` and parentheses (no ``eval``)."""
    tokens = expr.replace("(", " ( ").replace(")", " ) ").split()
    pos = 0

    def term() -> int:
        nonlocal pos
        value = atom()
        while pos < len(tokens) and tokens[pos] == "*":
            pos += 1
            value *= atom()
        return value

    def atom() -> int:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            value = sum_()
            pos += 1  # ")"
            return value
        return int(tok)

    def sum_() -> int:
        nonlocal pos
        value = term()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            pos += 1
            value = value + term() if op == "+" else value - term()
        return value

    return sum_()


def split_of(question: str) -> str:
    """``"test"`` or ``"train"``: the split a question belongs to, from the SHA-256 of its text."""
    digest = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    return "test" if digest % _TEST_BUCKETS == 0 else "train"


def _generate(split: str, seed: int) -> Iterator[dict]:
    """Problems of ``split`` in a fixed order, without duplicates, cycling through the levels."""
    rng = random.Random(seed)
    seen: set[str] = set()
    i = misses = 0
    while True:
        level = i % len(_LEVELS)
        i += 1
        question, expr = _LEVELS[level](rng)
        if question in seen or split_of(question) != split:
            misses += 1
            if misses > _MAX_MISSES:  # a broken split or an exhausted problem space: fail instead of looping
                raise RuntimeError(f"arith: no new {split} problem in {_MAX_MISSES} draws after {len(seen)}")
            continue
        misses = 0
        seen.add(question)
        yield {
            "id": f"arith-{split}-{len(seen) - 1}",
            "prompt": PROMPT_TEMPLATE.format(question=question),
            "answer": str(_evaluate(expr)),
            "level": level,
            "expression": expr,
        }


def arith_problems(split: str = "test", n: int | None = None, seed: int = 0) -> list[dict]:
    """The first ``n`` problems of ``split`` (``"train"`` or ``"test"``).

    Records: ``{"id", "prompt", "answer", "level", "expression"}``; ``prompt`` is ``"Question: ...\\nAnswer:"``,
    ``answer`` an exact integer as a string. ``n`` defaults to :data:`TEST_SIZE` for test (and may not exceed it)
    and :data:`TRAIN_SIZE` for train (at most :data:`MAX_TRAIN`). ``seed`` changes which problems are drawn; the
    splits stay disjoint.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    n = (TEST_SIZE if split == "test" else TRAIN_SIZE) if n is None else n
    limit = TEST_SIZE if split == "test" else MAX_TRAIN
    if not 0 <= n <= limit:
        raise ValueError(f"n must be in [0, {limit}] for the {split} split, got {n}")
    gen = _generate(split, seed)
    return [next(gen) for _ in range(n)]


def question_of(record: dict) -> str:
    """The question text of an arith record (its prompt without ``Question: `` and ``\nAnswer:``)."""
    head, tail = PROMPT_TEMPLATE.split("{question}")
    return record["prompt"].removeprefix(head).removesuffix(tail)


def _distractors(answer: int, rng: random.Random) -> list[int]:
    """Three distinct wrong answers near ``answer``: off by one, by ten, a digit slip, a sign error."""
    candidates = [answer + 1, answer - 1, answer + 10, answer - 10, answer + 2, -answer, answer * 10]
    digits = str(abs(answer))
    if len(digits) > 1:  # the last two digits swapped
        swapped = int(digits[:-2] + digits[-1] + digits[-2])
        candidates.append(swapped if answer >= 0 else -swapped)
    out: list[int] = []
    while len(out) < 3:
        pick = candidates[rng.getrandbits(16) % len(candidates)]
        if pick != answer and pick not in out:
            out.append(pick)
    return out


def arith_mc_problems(split: str = "test", n: int | None = None, seed: int = 0) -> list[dict]:
    """The problems of :func:`arith_problems` as multiple choice: ``{"id", "question", "choices", "answer",
    "level"}`` with four distinct integer choices (the answer and three near misses) and ``answer`` the index of
    the right one, its position drawn so that each position is about equally likely."""
    out = []
    for p in arith_problems(split, n, seed):
        digest = hashlib.sha256(f"{seed}:{p['id']}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        right = int(p["answer"])
        choices = _distractors(right, rng)
        position = rng.getrandbits(16) % 4
        choices.insert(position, right)
        out.append({"id": p["id"].replace("arith-", "arith-mc-", 1), "question": question_of(p),
                    "choices": [str(c) for c in choices], "answer": position, "level": p["level"]})
    return out


def few_shot_prefix(k: int, seed: int = 0) -> str:
    """``k`` solved train problems, each ``"Question: ...\\nAnswer: X"`` followed by a blank line."""
    return "".join(f"{p['prompt']} {p['answer']}\n\n" for p in arith_problems("train", k, seed=seed))


def write_jsonl(path: str | Path, records: Iterable[dict], fields: tuple[str, ...] = ("prompt", "answer")) -> int:
    """Write ``records`` as JSON lines with only ``fields`` (default: the ``gen`` schema); returns the count."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({k: r[k] for k in fields}, ensure_ascii=False) + "\n")
            count += 1
    return count
