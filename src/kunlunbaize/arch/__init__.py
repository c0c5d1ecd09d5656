"""The architectures the system trains, checkpoints, decodes and exports, by name (see :class:`ArchSpec`).

A new architecture is one module here with its spec, added to :data:`ARCHS`; nothing else names it.
"""

from __future__ import annotations

from .kunlunbaize import KUNLUNBAIZE
from .llama import LLAMA
from .spec import HOOKS, ArchSpec

ARCHS: dict[str, ArchSpec] = {spec.name: spec for spec in (KUNLUNBAIZE, LLAMA)}
DEFAULT = KUNLUNBAIZE
BASELINE = LLAMA
"""The peer the paper's model is compared against (the ablation study's matched baseline)."""


def get_arch(name: str) -> ArchSpec:
    """The spec of architecture ``name``; ValueError naming the known ones otherwise."""
    try:
        return ARCHS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown architecture {name!r}: one of {', '.join(ARCHS)}") from None


__all__ = ["ARCHS", "BASELINE", "DEFAULT", "HOOKS", "ArchSpec", "get_arch"]
