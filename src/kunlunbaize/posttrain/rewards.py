"""Rule-based rewards with TRL's reward-function signature, a registry, and weighted combinations.

Every reward is ``f(prompts, completions, **columns) -> list[float | None]``: ``completions`` are strings or
conversational turns (``[{"role": "assistant", "content": …}]``); the dataset's other columns (``answer``,
``test``, ``kind`` …) come as keyword lists; ``None`` means "does not apply to this sample" (e.g. the math reward
on a code problem), which TRL's GRPO trainer and :class:`Combined` both skip.

* ``math``: 1 when the answer extracted from the completion is mathematically equal to ``answer`` (math-verify,
  :func:`kunlunbaize.eval.scoring.math_equal`), else 0;
* ``code``: 1 when the problem's ``test`` code, run by the harness of :func:`kunlunbaize.eval.sandbox.judge` against
  the completion's program, returns (no network, rlimits, a private /tmp, a timeout; exiting early or redefining
  names cannot fake it), else 0;
* ``answer_tag``: 1 when the completion holds exactly one non-empty ``<answer>…</answer>``;
* ``no_repetition``: 1 − the fraction of repeated word 4-grams (1 for text without repeats, → 0 for a loop);
* ``length``: 1 up to ``max_chars`` characters, falling linearly to 0 at twice that.

``Combined`` sums registered rewards with weights (``"math=1,no_repetition=0.1"``) and can include a learned reward
model (:class:`kunlunbaize.posttrain.reward_model.ModelReward`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from ..eval.sandbox import CodeCheck, judge_all
from ..eval.scoring import extract_answer, math_equal

RewardFn = Callable[..., list[float | None]]

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of the last turn of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat turns, got {type(completion).__name__}")


def _column(columns: dict[str, Any], name: str, n: int) -> list[Any]:
    """Column ``name`` as a list of ``n`` values (None where the dataset has no such column)."""
    values = columns.get(name)
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def answer_of(text: str) -> str | None:
    """The final answer of a completion: the content of its last ``<answer>`` tag, else what
    :func:`kunlunbaize.eval.scoring.extract_answer` finds (boxed, "The answer is", the last number …)."""
    tags = _TAG.findall(text)
    if tags and tags[-1].strip():
        return extract_answer(tags[-1]) or tags[-1].strip()
    return extract_answer(text)


def math_reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
                **columns: Any) -> list[float | None]:
    """1.0 when the completion's answer equals ``answer`` (math-verify), 0.0 when not, None without an answer."""
    golds = _column({"answer": answer}, "answer", len(completions))
    out: list[float | None] = []
    for completion, gold in zip(completions, golds, strict=True):
        if gold is None or str(gold).strip() == "":
            out.append(None)
            continue
        out.append(1.0 if math_equal(str(gold), answer_of(completion_text(completion))) else 0.0)
    return out


def code_of(text: str) -> str:
    """The program in a completion: the first fenced code block when there is one, else the whole text."""
    fenced = _FENCE.search(text)
    return fenced.group(1) if fenced else text


def code_reward(prompts: Sequence[Any], completions: Sequence[Any], test: Sequence[Any] | None = None,
                timeout: float = 10.0, entry_point: Sequence[Any] | None = None,
                **columns: Any) -> list[float | None]:
    """1.0 when the problem's ``test`` code returns when run against the completion's program in the sandbox
    (:func:`kunlunbaize.eval.sandbox.judge`: the test calls the program's functions, ``entry_point`` and every
    other name it uses, with plain data), 0.0 when it fails, errors or times out, None without a test. The
    checks run in parallel, one sandboxed pair of processes each."""
    tests = _column({"test": test}, "test", len(completions))
    entries = _column({"entry_point": entry_point}, "entry_point", len(completions))
    todo = [i for i, t in enumerate(tests) if t is not None and str(t).strip()]
    checks = [CodeCheck(program=code_of(completion_text(completions[i])), test=str(tests[i]),
                        entry_point=str(entries[i]) if entries[i] else None) for i in todo]
    results = judge_all(checks, timeout=timeout) if checks else []
    out: list[float | None] = [None] * len(completions)
    for i, result in zip(todo, results, strict=True):
        out[i] = 1.0 if result.passed else 0.0
    return out


def answer_tag_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """1.0 when the completion holds exactly one non-empty ``<answer>…</answer>``, else 0.0."""
    out: list[float | None] = []
    for c in completions:
        tags = _TAG.findall(completion_text(c))
        out.append(1.0 if len(tags) == 1 and tags[0].strip() else 0.0)
    return out


def repetition_fraction(text: str, n: int = 4) -> float:
    """The fraction of word ``n``-grams of ``text`` that repeat an earlier one (0 for fewer than ``n`` words)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def no_repetition_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """1 − the fraction of repeated word 4-grams of each completion."""
    return [1.0 - repetition_fraction(completion_text(c)) for c in completions]


def length_reward(prompts: Sequence[Any], completions: Sequence[Any], max_chars: int = 512,
                  **columns: Any) -> list[float | None]:
    """1.0 up to ``max_chars`` characters, falling linearly to 0.0 at ``2 * max_chars``."""
    out: list[float | None] = []
    for c in completions:
        over = len(completion_text(c)) - max_chars
        out.append(1.0 if over <= 0 else max(0.0, 1.0 - over / max_chars))
    return out


REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "code": code_reward,
    "answer_tag": answer_tag_reward,
    "no_repetition": no_repetition_reward,
    "length": length_reward,
}
"""The rule-based rewards by name (``kunlun reward --rewards``, ``kunlun posttrain rs --rewards``)."""

MODEL_REWARD = "rm"
"""The name of the learned reward model in a reward spec (its path is given separately)."""


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """``"math=1,no_repetition=0.1"`` (or ``"math,code"``: weight 1) as ``[(name, weight), …]``."""
    out: list[tuple[str, float]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, raw = part.partition("=")
        name = name.strip()
        if name not in REWARDS and name != MODEL_REWARD:
            raise ValueError(f"unknown reward {name!r}; known: {', '.join([*REWARDS, MODEL_REWARD])} "
                             f"({MODEL_REWARD} is the learned reward model given with --reward-model)")
        try:
            weight = float(raw) if raw else 1.0
        except ValueError:
            raise ValueError(f"reward {name!r}: weight {raw!r} is not a number (write name=weight)") from None
        if any(name == n for n, _ in out):
            raise ValueError(f"reward {name!r} is named twice in {spec!r}")
        out.append((name, weight))
    if not out:
        raise ValueError("no reward given: name at least one, e.g. --rewards math or --rewards math=1,length=0.1")
    return out


class Combined:
    """A weighted sum of rewards, itself a reward function (TRL's signature).

    A sample's total is ``Σ w_i r_i`` over the rewards that apply to it (not None); None when none applies.
    :meth:`score` also returns every component, for reports and datasets.
    """

    def __init__(self, parts: list[tuple[str, float, RewardFn]]) -> None:
        if not parts:
            raise ValueError("a combined reward needs at least one part")
        self.parts = parts
        self.__name__ = "+".join(f"{w:g}*{n}" for n, w, _ in parts)  # TRL logs rewards under their __name__

    @classmethod
    def from_spec(cls, spec: str, model_reward: RewardFn | None = None, **options: Any) -> Combined:
        """From a spec (:func:`parse_spec`). ``rm`` needs ``model_reward``; ``options`` (``max_chars``,
        ``timeout``) go to the rewards that take them."""
        parts: list[tuple[str, float, RewardFn]] = []
        for name, weight in parse_spec(spec):
            if name == MODEL_REWARD:
                if model_reward is None:
                    raise ValueError("the spec names the reward model (rm) but none was given: pass --reward-model")
                parts.append((name, weight, model_reward))
                continue
            fn = REWARDS[name]
            keep = {k: v for k, v in options.items() if v is not None and k in _accepts(fn)}
            parts.append((name, weight, (lambda f, kw: lambda p, c, **cols: f(p, c, **kw, **cols))(fn, keep)))
        return cls(parts)

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> dict[str, list]:
        """``{"reward": totals, name: component values …}`` for every completion."""
        table: dict[str, list] = {}
        for name, _, fn in self.parts:
            values = fn(prompts, completions, **columns)
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            table[name] = values
        totals: list[float | None] = []
        for i in range(len(completions)):
            terms = [w * table[n][i] for n, w, _ in self.parts if table[n][i] is not None]
            totals.append(sum(terms) if terms else None)
        return {"reward": totals, **table}

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        return self.score(prompts, completions, **columns)["reward"]


def _accepts(fn: RewardFn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)
