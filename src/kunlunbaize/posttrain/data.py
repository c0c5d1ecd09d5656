"""The JSONL schemas of post-training, read with errors that name the file, the record and the fix.

* **prompts** (rejection sampling, ``kunlun reward``): ``{"prompt": TEXT_OR_TURNS, …}``; other columns
  (``answer`` for math, ``test`` for code, ``kind``, ``id``) are passed to the reward functions;
* **SFT**: ``{"messages": [{"role", "content"}, …]}`` (at least one assistant turn), or ``{"prompt", "completion"}``;
* **preferences** (DPO, reward model): ``{"prompt": TEXT_OR_TURNS, "chosen": TEXT_OR_TURNS, "rejected": …}``.

TEXT_OR_TURNS is a string (one user turn for a prompt, one assistant turn for a reply) or a list of chat turns.
Files may be ``.jsonl``, ``.json`` (a list) or ``.parquet`` (:func:`kunlunbaize.eval.convert.read_records`).
Everything is turned into the conversational form TRL applies the chat template to.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .chat import ROLES

SCHEMAS = {
    "prompts": '{"prompt": "What is 2 + 3?", "answer": "5"}',
    "sft": '{"messages": [{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}]}',
    "preferences": '{"prompt": "…", "chosen": "a better reply", "rejected": "a worse reply"}',
}


class PosttrainDataError(ValueError):
    """A post-training dataset that cannot be used; the message names the file, the record and what to do."""


def _where(source: str, index: int) -> str:
    return f"{source}, record {index + 1}"


def turns(value: Any, source: str, index: int, field: str, default_role: str) -> list[dict[str, str]]:
    """``value`` as chat turns: a string becomes one ``default_role`` turn; a list must hold ``{"role", "content"}``."""
    if isinstance(value, str):
        if not value.strip():
            raise PosttrainDataError(f"{_where(source, index)}: {field!r} is empty")
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise PosttrainDataError(f"{_where(source, index)}: {field!r} must be a string or a non-empty list of chat "
                                 f"turns, got {type(value).__name__}")
    out = []
    for t in value:
        if not isinstance(t, dict) or t.get("role") not in ROLES or not isinstance(t.get("content"), str):
            raise PosttrainDataError(f"{_where(source, index)}: every turn of {field!r} needs a role "
                                     f"({', '.join(ROLES)}) and a string content, got {json.dumps(t)[:80]}")
        out.append({"role": t["role"], "content": t["content"]})
    return out


def read(path: str | Path) -> list[dict[str, Any]]:
    """The records of a dataset file; an error when it is missing, unreadable or empty."""
    from ..eval.convert import TaskFileError, read_records

    try:
        records = read_records(path)
    except TaskFileError as e:
        raise PosttrainDataError(str(e)) from None
    if not records:
        raise PosttrainDataError(f"{path} holds no records: give at least one JSON object per line")
    return records


def _require(record: dict[str, Any], fields: Iterable[str], source: str, index: int, schema: str) -> None:
    missing = [f for f in fields if f not in record or record[f] is None]
    if missing:
        raise PosttrainDataError(f"{_where(source, index)}: missing {', '.join(repr(f) for f in missing)} — a "
                                 f"{schema} record looks like {SCHEMAS[schema]} (docs/guide-posttrain.md)")


def prompt_records(records: list[dict[str, Any]], source: str = "prompts") -> list[dict[str, Any]]:
    """Prompt records with ``prompt`` as chat turns ending in a user turn; other columns kept."""
    if not records:
        raise PosttrainDataError(f"{source} holds no prompts")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise PosttrainDataError(f"{_where(source, i)}: expected a JSON object, got {type(r).__name__}")
        _require(r, ["prompt"], source, i, "prompts")
        prompt = turns(r["prompt"], source, i, "prompt", "user")
        if prompt[-1]["role"] != "user":
            raise PosttrainDataError(f"{_where(source, i)}: a prompt must end with a user turn")
        out.append({**r, "prompt": prompt})
    return out


def sft_records(records: list[dict[str, Any]], source: str = "sft data") -> list[dict[str, Any]]:
    """SFT records as ``{"messages": turns}`` with at least one assistant turn."""
    if not records:
        raise PosttrainDataError(f"{source} holds no examples")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise PosttrainDataError(f"{_where(source, i)}: expected a JSON object, got {type(r).__name__}")
        if "messages" in r:
            messages = turns(r["messages"], source, i, "messages", "user")
        else:
            _require(r, ["prompt", "completion"], source, i, "sft")
            messages = (turns(r["prompt"], source, i, "prompt", "user")
                        + turns(r["completion"], source, i, "completion", "assistant"))
        if not any(m["role"] == "assistant" for m in messages):
            raise PosttrainDataError(f"{_where(source, i)}: no assistant turn — there is nothing to learn from it")
        out.append({"messages": messages})
    return out


def preference_records(records: list[dict[str, Any]], source: str = "preferences") -> list[dict[str, Any]]:
    """Preference pairs as ``{"prompt": turns, "chosen": [assistant turn], "rejected": [assistant turn]}``."""
    if not records:
        raise PosttrainDataError(f"{source} holds no preference pairs")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise PosttrainDataError(f"{_where(source, i)}: expected a JSON object, got {type(r).__name__}")
        _require(r, ["prompt", "chosen", "rejected"], source, i, "preferences")
        pair = {"prompt": turns(r["prompt"], source, i, "prompt", "user"),
                "chosen": turns(r["chosen"], source, i, "chosen", "assistant"),
                "rejected": turns(r["rejected"], source, i, "rejected", "assistant")}
        if pair["chosen"] == pair["rejected"]:
            raise PosttrainDataError(f"{_where(source, i)}: chosen and rejected are the same reply")
        out.append(pair)
    return out


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON lines (to a temporary file renamed into place); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count


def split_heldout(records: list[Any], fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(train, held-out): a seeded shuffle, ``fraction`` of the records held out (at least one of each side)."""
    import random

    if len(records) < 2:
        raise PosttrainDataError(f"need at least 2 records to hold some out for validation, got {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = min(len(records) - 1, max(1, round(len(records) * fraction)))
    held = set(order[:k])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
