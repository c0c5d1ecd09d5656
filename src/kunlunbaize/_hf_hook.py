"""Register KunlunBaize with transformers' Auto classes without importing transformers eagerly.

Importing transformers' modeling code takes seconds, which every ``kunlun`` command and every
torchrun worker would pay on ``import kunlunbaize``. Instead: if transformers is already imported,
register now; otherwise register the moment it is imported (an import hook). Either way
``import kunlunbaize`` followed by ``AutoModelForCausalLM.from_pretrained(exported_folder)`` works, whatever
imports transformers (``import transformers``, ``import transformers.models.auto``, TRL, lm-eval …) and however
often libraries probe for it with ``importlib.util.find_spec("transformers")`` first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType


def _register() -> None:
    importing = sys.modules.get(f"{__package__}.hf")
    if importing is not None and not hasattr(importing, "register"):
        return  # transformers is being imported by kunlunbaize.hf itself, which registers when it is complete
    try:
        from .hf import register
    except ImportError as e:  # transformers outside the supported range, or broken: say so, do not break the import
        warnings.warn(f"kunlunbaize: the Hugging Face integration is unavailable ({e})", RuntimeWarning, stacklevel=2)
        return
    register()


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of ``transformers`` so that registration follows its execution.

    It stays on ``sys.meta_path`` until transformers has actually been executed: a ``find_spec`` probe (TRL,
    lm-eval, accelerate … call ``importlib.util.find_spec("transformers")`` before importing it) only gets a
    wrapped spec that nobody executes, and the real import later finds the hook still in place.
    """

    def find_spec(self, name: str, path=None, target=None) -> ModuleSpec | None:
        if name != "transformers":
            return None
        spec = _find_elsewhere(self, name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        hook = self

        def exec_and_register(module: ModuleType) -> None:
            exec_module(module)
            _uninstall(hook)  # executed: from now on transformers is in sys.modules
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


def _find_elsewhere(hook: _RegisterOnImport, name: str, path, target) -> ModuleSpec | None:
    """The spec the finders after ``hook`` give for ``name`` (what the import would use without the hook)."""
    for finder in list(sys.meta_path):
        if finder is hook or isinstance(finder, _RegisterOnImport) or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(name, path, target)
        if spec is not None:
            return spec
    return None


def _uninstall(hook: _RegisterOnImport) -> None:
    if hook in sys.meta_path:
        sys.meta_path.remove(hook)


def install() -> None:
    """Register now if transformers is imported, else as soon as it is (nothing if it is not installed)."""
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path) \
            and importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _RegisterOnImport())
