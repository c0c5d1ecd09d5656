"""transformers' own common test files, taken from the source distribution of the installed transformers.

``scripts/setup.sh --dev`` downloads ``transformers-<version>.tar.gz`` (the sdist on PyPI) into
``.cache/transformers-tests/``; :func:`load` extracts ``tests/test_modeling_common.py`` and
``tests/test_configuration_common.py`` from it, byte for byte, into a temporary package (a unique name, so they
never clash with this repository's ``tests``) and imports them. Nothing is downloaded here.

The sdist carries those two files but not three helper modules they import; the package gets them from here:
``exporters.test_export.ExportTesterMixin`` (the export tests: not run, see test_hf_common.py),
``generation.test_utils.GenerationTesterMixin`` (the base class test_hf_common.py's generation tests derive from;
``test_generation_tester_mixin_inheritance`` checks for it) and ``utils.test_configuration_utils.config_common_kwargs``
(a non-default value for every common ``PreTrainedConfig`` attribute, checked against the installed version).
"""

from __future__ import annotations

import importlib
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "transformers-tests"
SDIST = CACHE / f"transformers-{transformers.__version__}.tar.gz"
PACKAGE = "kb_transformers_common_tests"
FILES = ("test_modeling_common.py", "test_configuration_common.py")
HOW_TO_GET = (f"transformers' common tests come from its source distribution, {SDIST.name}, which is not in {CACHE}: "
              "run bash scripts/setup.sh --dev (with network) or pip download --no-deps --no-binary :all: "
              f"transformers=={transformers.__version__} -d {CACHE}")

CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
"""What transformers' ``tests/utils/test_configuration_utils.py`` gives every model's configuration: a value other than
the default for each attribute every ``PreTrainedConfig`` has (test_hf_common.py checks that none is missing)."""


class ExportTesterMixin:
    """Stands in for ``tests/exporters/test_export.py`` (not in the sdist): no export tests."""


class GenerationTesterMixin:
    """Stands in for ``tests/generation/test_utils.py`` (not in the sdist): the generation tests derive from it."""


def _extract(target: Path) -> None:
    """Write the common files from the sdist into ``target`` (the package folder)."""
    with tarfile.open(SDIST) as tar:
        root = tar.getnames()[0].split("/")[0]
        for name in FILES:
            member = tar.extractfile(f"{root}/tests/{name}")
            if member is None:
                raise FileNotFoundError(f"{SDIST} has no tests/{name}")
            (target / name).write_bytes(member.read())
    (target / "__init__.py").write_text("")  # direct_transformers_import(tests/) executes it


def _module(name: str, **attributes: object) -> None:
    module = types.ModuleType(f"{PACKAGE}.{name}")
    module.__dict__.update(attributes)
    module.__path__ = []  # a package, so that its submodules can be imported from sys.modules
    sys.modules[module.__name__] = module


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """``(test_modeling_common, test_configuration_common)`` of the installed transformers."""
    if f"{PACKAGE}.test_modeling_common" not in sys.modules:
        folder = Path(tempfile.mkdtemp(prefix="kb-transformers-tests-")) / PACKAGE
        folder.mkdir()
        _extract(folder)
        sys.path.insert(0, str(folder.parent))
        for name in ("exporters", "generation", "utils"):
            _module(name)
        _module("exporters.test_export", ExportTesterMixin=ExportTesterMixin)
        _module("generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
        _module("utils.test_configuration_utils", config_common_kwargs=CONFIG_COMMON_KWARGS)
    return (importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_configuration_common"))
