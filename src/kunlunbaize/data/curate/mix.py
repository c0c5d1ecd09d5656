"""Domain mixing: choose how many copies of each document to keep so that every domain's share of the *tokens*
matches a requested mixture, by down-sampling large domains and repeating small ones."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

from ..format import DataError

MIX_TOLERANCE = 1e-3  # how far the requested fractions may sum from 1


def parse_mix(spec: str) -> dict[str, float]:
    """``"code=0.4,en=0.5,zh=0.1"`` → ``{"code": 0.4, "en": 0.5, "zh": 0.1}`` (fractions > 0 summing to 1)."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, raw = part.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not sep or not name.strip() or not value > 0 or name.strip() in mix:
            raise DataError(f"--mix {spec!r}: {part!r} must look like DOMAIN=FRACTION with a fraction > 0, each "
                            f"domain once, e.g. --mix code=0.4,en=0.5,zh=0.1")
        mix[name.strip()] = value
    if not mix:
        raise DataError("--mix is empty; give DOMAIN=FRACTION pairs, e.g. --mix code=0.4,en=0.6")
    total = sum(mix.values())
    if abs(total - 1) > MIX_TOLERANCE:
        raise DataError(f"--mix fractions sum to {total:g}, not 1; fix them so they add up to 1")
    return {k: v / total for k, v in mix.items()}


def _order(doc_ids: Sequence[str], indices: list[int], seed: int) -> list[int]:
    """``indices`` in a fixed pseudo-random order (by a hash of the seed and document id)."""
    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{doc_ids[i]}".encode(), digest_size=8).digest()
    return sorted(indices, key=key)


def _fill(order: list[int], tokens: Sequence[int], target: int) -> dict[int, int]:
    """Copies per document so that their tokens come as close to ``target`` as whole documents allow: whole passes
    over the domain, then documents in ``order`` that still fit."""
    available = sum(tokens[i] for i in order)
    passes, rest = divmod(target, available)
    copies = dict.fromkeys(order, passes)
    for i in order:
        if tokens[i] <= rest:
            copies[i] += 1
            rest -= tokens[i]
    return {i: n for i, n in copies.items() if n}


def plan_mixture(domains: Sequence[str], tokens: Sequence[int], doc_ids: Sequence[str], mix: dict[str, float], *,
                 total_tokens: int | None = None, seed: int = 0) -> dict[int, int]:
    """Copies of each document (index → count; absent = dropped) meeting ``mix`` in tokens.

    ``total_tokens`` is the size of the result (default: the tokens of the mixed domains as they are). Domains not
    in ``mix`` are dropped; a domain of ``mix`` with no document raises DataError naming the domains found.
    """
    by_domain: dict[str, list[int]] = defaultdict(list)
    for i, domain in enumerate(domains):
        by_domain[domain].append(i)
    missing = [d for d in mix if not sum(tokens[i] for i in by_domain.get(d, []))]
    if missing:
        found = ", ".join(f"{d} ({len(ix):,} docs)" for d, ix in sorted(by_domain.items())) or "none"
        raise DataError(f"--mix names domain(s) with no documents left after filtering: {', '.join(missing)}; "
                        f"domains found: {found} (a domain is a NAME=PATH source's name, 'code' for code files, or "
                        f"the language code of prose, e.g. en, zh)")
    if total_tokens is None:
        total_tokens = sum(tokens[i] for d in mix for i in by_domain[d])
    plan: dict[int, int] = {}
    for domain, fraction in mix.items():
        order = _order(doc_ids, by_domain[domain], seed)
        plan.update(_fill(order, tokens, round(fraction * total_tokens)))
    return plan
