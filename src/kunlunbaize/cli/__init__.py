"""The ``kunlun`` command line: one module per command (``add_parser(sub)`` and ``run(args)``), the argument types
they share (:mod:`.args`), and the entry point :func:`main` (:mod:`.main`).

Library packages never import this one. Building the parser (``kunlun --help``) imports no torch.
"""

from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]
