"""The ablation study (paper Table 4) as one command, ``kunlun ablate``: plan (:mod:`.plan`), resumable runs in
worker processes (:mod:`.run`, :mod:`.worker`) and the report (:mod:`.report`)."""

from __future__ import annotations

__all__ = ["plan", "report", "run"]
