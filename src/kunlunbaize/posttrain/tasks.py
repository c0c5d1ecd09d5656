"""Verifiable post-training tasks generated offline: arithmetic word problems and small Python functions with tests.

Both are deterministic (``random.Random`` bit streams only) and split by the SHA-256 of the prompt text into a
``train`` and a ``test`` (held-out) split that never share a prompt, for every seed:

* ``math``: the problems of the built-in ``arith`` evaluation task (:mod:`kunlunbaize.eval.arith`), in the same
  prompt format, so ``kunlun eval --tasks arith`` scores a post-trained model on exactly the held-out split;
* ``code``: "write a function" problems from a dozen families (add, scale, count, repeat, filter …), each with a
  reference solution and ``assert`` tests that :func:`kunlunbaize.posttrain.rewards.code_reward` runs in the
  sandbox.

Records are the prompt schema of ``kunlun posttrain`` (docs/guide-posttrain.md): ``{"id", "kind", "prompt",
"answer"}`` for math, ``{"id", "kind", "prompt", "test", "entry_point", "solution"}`` for code.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator

from ..eval.arith import _randint, arith_problems

KINDS = ("math", "code")
_TEST_BUCKETS = 5  # one code problem in five is held out
_MAX_MISSES = 100_000
CODE_TEST_SIZE = 200
CODE_MAX = {"train": 1000, "test": 250}  # the families hold about 1,050 train and 260 test problems


def split_of(text: str) -> str:
    """``"test"`` or ``"train"``: the split a prompt belongs to, from the SHA-256 of its text."""
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return "test" if digest % _TEST_BUCKETS == 0 else "train"


# ------------------------------------------------------------------------------------------------ code families
# Each family draws parameters and returns (name, description, body, f) where body is the reference function body and
# f the same function in Python, used to compute the expected test outputs (no exec of generated text).

Family = Callable[[random.Random], tuple[str, str, str, Callable[..., object], list[tuple]]]


def _ints(rng: random.Random, n: int, lo: int = -20, hi: int = 20) -> list[int]:
    return [_randint(rng, lo, hi) for _ in range(n)]


def _add(rng):
    k = _randint(rng, 1, 99)
    return (f"add_{k}", f"takes an integer x and returns x plus {k}", f"return x + {k}", lambda x: x + k,
            [(x,) for x in _ints(rng, 3, -50, 50)])


def _times(rng):
    k = _randint(rng, 2, 19)
    return (f"times_{k}", f"takes an integer x and returns x multiplied by {k}", f"return x * {k}",
            lambda x: x * k, [(x,) for x in _ints(rng, 3, -50, 50)])


def _multiple(rng):
    k = _randint(rng, 2, 12)
    return (f"is_multiple_of_{k}", f"takes an integer x and returns True if x is divisible by {k}, else False",
            f"return x % {k} == 0", lambda x: x % k == 0, [(k * 3,), (k * 3 + 1,), (_randint(rng, 0, 200),)])


def _clamp(rng):
    lo = _randint(rng, -20, 10)
    hi = lo + _randint(rng, 1, 30)
    return (f"clamp_{lo}_to_{hi}".replace("-", "minus"),
            f"takes an integer x and returns it limited to the range {lo} to {hi} (inclusive)",
            f"return max({lo}, min({hi}, x))", lambda x: max(lo, min(hi, x)), [(lo - 5,), (hi + 5,), ((lo + hi) // 2,)])


def _sum_times(rng):
    k = _randint(rng, 2, 9)
    return (f"sum_times_{k}", f"takes a list of integers xs and returns their sum multiplied by {k}",
            f"return sum(xs) * {k}", lambda xs: sum(xs) * k, [(_ints(rng, 4),), ([],), (_ints(rng, 2),)])


def _count_char(rng):
    c = "abcdefghijklmnopqrstuvwxyz"[_randint(rng, 0, 25)]
    words = ["banana", "abracadabra", "hello world", "mississippi", "", "zigzag", "queue"]
    return (f"count_{c}", f"takes a string s and returns how many times the letter '{c}' occurs in it",
            f"return s.count({c!r})", lambda s: s.count(c), [(words[_randint(rng, 0, 6)],), (c * 3 + "x",), ("",)])


def _repeat(rng):
    k = _randint(rng, 2, 6)
    return (f"repeat_{k}", f"takes a string s and returns s repeated {k} times", f"return s * {k}",
            lambda s: s * k, [("ab",), ("",), ("xyz",)])


def _max_plus(rng):
    k = _randint(rng, 1, 50)
    return (f"max_plus_{k}", f"takes a non-empty list of integers xs and returns its largest element plus {k}",
            f"return max(xs) + {k}", lambda xs: max(xs) + k, [(_ints(rng, 4),), (_ints(rng, 1),), (_ints(rng, 6),)])


def _first_n(rng):
    k = _randint(rng, 1, 5)
    return (f"first_{k}", f"takes a list xs and returns a list of its first {k} elements (fewer if it is shorter)",
            f"return xs[:{k}]", lambda xs: xs[:k], [(_ints(rng, 7),), (_ints(rng, 1),), ([],)])


def _keep_above(rng):
    k = _randint(rng, -10, 10)
    return (f"keep_above_{k}".replace("-", "minus"),
            f"takes a list of integers xs and returns a list of the elements greater than {k}, in order",
            f"return [x for x in xs if x > {k}]", lambda xs: [x for x in xs if x > k],
            [(_ints(rng, 6),), ([],), (_ints(rng, 3),)])


def _square_minus(rng):
    k = _randint(rng, 1, 99)
    return (f"square_minus_{k}", f"takes an integer x and returns x squared minus {k}", f"return x * x - {k}",
            lambda x: x * x - k, [(x,) for x in _ints(rng, 3)])


def _ends_with(rng):
    c = "aeiouxyz"[_randint(rng, 0, 7)]
    return (f"ends_with_{c}", f"takes a string s and returns True if it ends with the letter '{c}', else False",
            f"return s.endswith({c!r})", lambda s: s.endswith(c), [("pizza" + c,), ("",), ("tree",)])


_FAMILIES: tuple[Family, ...] = (_add, _times, _multiple, _clamp, _sum_times, _count_char, _repeat, _max_plus,
                                 _first_n, _keep_above, _square_minus, _ends_with)


def _signature(description: str) -> str:
    return "xs" if " list" in description.split(" and ")[0] else ("s" if "string s" in description else "x")


def code_prompt(name: str, description: str) -> str:
    """The instruction for one code problem."""
    return f"Write a Python function `{name}` that {description}."


def _code_generate(split: str, seed: int) -> Iterator[dict]:
    rng = random.Random(seed)
    seen: set[str] = set()
    i = misses = 0
    while True:
        family = _FAMILIES[i % len(_FAMILIES)]
        i += 1
        name, description, body, fn, cases = family(rng)
        prompt = code_prompt(name, description)
        if prompt in seen or split_of(prompt) != split:
            misses += 1
            if misses > _MAX_MISSES:
                raise RuntimeError(f"code tasks: no new {split} problem in {_MAX_MISSES} draws after {len(seen)}")
            continue
        misses = 0
        seen.add(prompt)
        arg = _signature(description)
        solution = f"def {name}({arg}):\n    {body}\n"
        test = "".join(f"assert {name}({', '.join(map(repr, args))}) == {fn(*args)!r}\n" for args in cases)
        yield {"id": f"code-{split}-{len(seen) - 1}", "kind": "code", "prompt": prompt, "test": test,
               "entry_point": name, "solution": solution}


def code_problems(split: str = "test", n: int | None = None, seed: int = 0) -> list[dict]:
    """The first ``n`` code problems of ``split`` (default: :data:`CODE_TEST_SIZE` for test, all 1,000 for train)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    n = (CODE_TEST_SIZE if split == "test" else CODE_MAX["train"]) if n is None else n
    if not 0 <= n <= CODE_MAX[split]:
        raise ValueError(f"n must be in [0, {CODE_MAX[split]}] for the {split} split of the code tasks, got {n}")
    gen = _code_generate(split, seed)
    return [next(gen) for _ in range(n)]


def math_problems(split: str = "test", n: int | None = None, seed: int = 0) -> list[dict]:
    """The ``arith`` problems of ``split`` in the post-training schema (prompt, answer)."""
    return [{"id": p["id"], "kind": "math", "prompt": p["prompt"], "answer": p["answer"]}
            for p in arith_problems(split, n, seed)]


def generate_tasks(kind: str, split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """``n`` problems of ``kind`` (``math``, ``code`` or ``mix``: alternating) from ``split``."""
    if kind == "math":
        return math_problems(split, n, seed)
    if kind == "code":
        return code_problems(split, n, seed)
    if kind == "mix":
        half = None if n is None else (n + 1) // 2
        maths, codes = math_problems(split, half, seed), code_problems(split, None if n is None else n - half, seed)
        out = [r for pair in zip(maths, codes, strict=False) for r in pair]
        return out + maths[len(codes):] + codes[len(maths):]
    raise ValueError(f"unknown task kind {kind!r}; expected math, code or mix")


def reference_reply(record: dict) -> str:
    """The correct assistant reply to a generated problem (the SFT target)."""
    if record.get("kind") == "code":
        return record["solution"]
    return str(record["answer"])
