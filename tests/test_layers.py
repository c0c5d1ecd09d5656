"""The house plan holds: no module imports a higher layer (function-local imports included), and the
architecture registry is the one place that names an architecture."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kunlunbaize"

# Lowest first; a module may import its own layer's package and any layer below. Packages on one layer are
# siblings and do not import each other. Keep in step with the map in docs/ARCHITECTURE.md.
LAYERS: list[set[str]] = [
    {"rope_scaling"},
    {"config", "defaults", "progress"},
    {"model", "data", "memory"},
    {"arch"},
    {"checkpoint", "plan"},
    {"train", "infer"},
    {"hf"},
    {"eval", "serve", "vllm"},
    {"ablate", "posttrain", "demo", "lm_eval"},
    {"cli"},
]
ALLOWED = {
    # registers the transformers classes the moment transformers is imported, from `import kunlunbaize`
    ("_hf_hook", "hf"),
}
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _package(module: str) -> str:
    """The top-level part of ``kunlunbaize.X.…`` (``""`` for the package root and the names it defines)."""
    parts = module.split(".")
    if len(parts) < 2 or not ((SRC / parts[1]).is_dir() or (SRC / f"{parts[1]}.py").is_file()):
        return ""
    return parts[1]


def _imports(file: Path) -> list[tuple[str, int]]:
    """(imported kunlunbaize module, line) of every import in ``file``, function-local ones included."""
    module = "kunlunbaize." + ".".join(file.relative_to(SRC).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if file.name != "__init__.py" else module.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            found += [(t, node.lineno) for t in names if t.startswith("kunlunbaize")]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("kunlunbaize")]
    return found


def _layer_violations() -> list[str]:
    bad = []
    for file in sorted(SRC.rglob("*.py")):
        own = _package("kunlunbaize." + ".".join(file.relative_to(SRC).with_suffix("").parts))
        if own not in RANK:
            continue  # the package root and its hook: checked through ALLOWED
        for target, line in _imports(file):
            other = _package(target)
            if other in ("", own) or (own, other) in ALLOWED:
                continue
            if other not in RANK:
                bad.append(f"{file.relative_to(SRC)}:{line} imports {target}, which is on no layer")
            elif RANK[other] >= RANK[own]:
                bad.append(f"{file.relative_to(SRC)}:{line} ({own}) imports {target} ({other}), not below it")
    return bad


def test_every_package_is_on_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
                if (p.suffix == ".py" or (p / "__init__.py").is_file()) and not p.name.startswith("__")}
    assert packages - RANK.keys() <= {"_hf_hook"}, "put new packages on a layer in LAYERS and in ARCHITECTURE.md"


def test_no_import_runs_up_the_layers():
    assert _layer_violations() == []


def test_the_checker_sees_a_function_local_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "kunlunbaize"
    (fake / "model").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "model" / "x.py").write_text("def f():\n    from ..train import trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert _layer_violations() == ["model/x.py:2 (model) imports kunlunbaize.train (train), not below it"]


@pytest.mark.parametrize("quote", ['"', "'"])
def test_only_the_registry_and_the_command_line_name_an_architecture(quote):
    from kunlunbaize.arch import ARCHS

    named = []
    for file in sorted(SRC.rglob("*.py")):
        rel = file.relative_to(SRC)
        if rel.parts[0] in ("arch", "cli", "cli.py"):
            continue
        text = file.read_text(encoding="utf-8")
        named += [f"{rel}: {quote}{name}{quote}" for name in ARCHS if name != "kunlunbaize"
                  and f"{quote}{name}{quote}" in text]
    assert named == []
