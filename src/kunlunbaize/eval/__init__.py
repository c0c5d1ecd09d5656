"""Evaluation helpers. Lightweight on import (no torch): the sandbox lives in :mod:`kunlunbaize.eval.sandbox`."""

from __future__ import annotations

__all__ = ["sandbox"]
