"""Register KunlunBaize with transformers' Auto classes without importing transformers eagerly.

Importing transformers' modeling code takes seconds, which every ``kunlun`` command and every
torchrun worker would pay on ``import kunlunbaize``. Instead: if transformers is already imported,
register now; otherwise register the moment it is imported (a one-shot import hook). Either way
``import kunlunbaize`` followed by ``AutoModelForCausalLM.from_pretrained(exported_folder)`` works.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType


def _register() -> None:
    try:
        from .hf import register
    except ImportError:  # transformers too old or broken: the HF integration is simply unavailable
        return
    register()


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of ``transformers`` so registration follows its import."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: ModuleType) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if "transformers" in sys.modules:
        _register()
    elif importlib.util.find_spec("transformers") is not None and not any(
            isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
