"""The model weights of a training checkpoint read straight from its DCP files, in one process, tensor by tensor.

A checkpoint saved without ``model.safetensors`` (``kunlun train --full-weights never``, and ``auto`` above
:data:`~.state.FULL_WEIGHTS_AUTO_MAX` parameters) holds its weights only in the Distributed Checkpoint files
(``.metadata`` and ``__<rank>_<n>.distcp``), sharded as the run was (FSDP2, tensor or pipeline parallel) but named
as one process names them (``model.<parameter>``). :class:`DcpWeights` reads them under any layout without a process
group: DCP's ``FileSystemReader`` with a state dict of only the requested keys, so a read holds the tensors asked for
and nothing else (the optimiser state is never read). The ``.metadata`` file is read once per checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from .errors import CheckpointDamaged, CheckpointError

METADATA_FILE = ".metadata"
MODEL_KEY = "model."
"""The prefix of the model's tensors among a checkpoint's DCP keys (the optimiser's are ``optim.``)."""


class _OnceReader(FileSystemReader):
    """A ``FileSystemReader`` that reads ``.metadata`` once, however many loads it serves."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


@contextlib.contextmanager
def _dcp_quiet() -> Iterator[None]:
    # DCP logs its own tracebacks on the root logger and warns about running without a process group; the
    # CheckpointError says what broke, and one process is intended here.
    root = logging.getLogger()
    was = root.disabled
    root.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*process group.*")
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            yield
    finally:
        root.disabled = was


def _load_one_process(state: dict[str, torch.Tensor], reader: FileSystemReader) -> None:
    """``dcp.load`` without collectives, also inside a distributed run (torch >= 2.6: ``no_dist``; older torch
    decides by itself, and then every rank reads the same keys)."""
    if "no_dist" in inspect.signature(dcp.load).parameters:
        dcp.load(state, storage_reader=reader, no_dist=True)
    else:
        dcp.load(state, storage_reader=reader)


class DcpWeights:
    """The model tensors of the training checkpoint ``ckpt``, read from its DCP files on request."""

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt
        if not (ckpt / METADATA_FILE).is_file():
            raise CheckpointError(f"{ckpt} has neither model.safetensors nor DCP files ({METADATA_FILE}, *.distcp): "
                                  "it holds no weights — give a checkpoint written by `kunlun train` or an export")
        self._reader = _OnceReader(ckpt)
        try:
            metadata = self._reader.read_metadata()
        except Exception as e:  # UnpicklingError, EOFError, …: a damaged file
            raise CheckpointDamaged(f"cannot read {ckpt / METADATA_FILE} ({type(e).__name__}: {e}); the checkpoint is "
                                    "damaged — use another checkpoint of the run") from None
        self._storage = metadata.storage_data
        self._tensors = {key[len(MODEL_KEY):]: md for key, md in metadata.state_dict_metadata.items()
                         if key.startswith(MODEL_KEY) and isinstance(md, TensorStorageMetadata)}

    def names(self) -> list[str]:
        """The model's tensor names (as one process's ``model.state_dict()`` names them), in saved order."""
        return list(self._tensors)

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor of ``name``'s shape and saved dtype (no data read)."""
        md = self._tensors[name]
        return torch.empty(md.size, dtype=md.properties.dtype, device="meta")

    def files(self, names: Iterable[str]) -> list[str]:
        """The ``.distcp`` files holding ``names``' shards."""
        keys = {MODEL_KEY + n for n in names}
        return sorted({info.relative_path for index, info in self._storage.items() if index.fqn in keys})

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (whole, on CPU, in their saved dtype); only they are read from disk."""
        names = list(names)
        unknown = [n for n in names if n not in self._tensors]
        if unknown:
            raise CheckpointError(f"{self.ckpt} has no model tensor {unknown[0]!r} in its DCP files — the checkpoint "
                                  "is of another model")
        files = self.files(names)
        missing = [f for f in files if not (self.ckpt / f).is_file()]
        if missing:
            raise CheckpointDamaged(f"{self.ckpt / missing[0]} is missing: the checkpoint's DCP shards are incomplete "
                                    "— copy it back, or use another checkpoint of the run")
        state = {MODEL_KEY + n: torch.empty(self._tensors[n].size, dtype=self._tensors[n].properties.dtype)
                 for n in names}
        try:
            with _dcp_quiet():
                _load_one_process(state, self._reader)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointDamaged(f"cannot read {', '.join(names[:2])}{' …' if len(names) > 2 else ''} from "
                                    f"{self.ckpt} ({_reason(e)}): {' or '.join(files)} is damaged or truncated — "
                                    "use another checkpoint of the run") from None
        return {n: state[MODEL_KEY + n] for n in names}

    def items(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` one tensor at a time (one read each): at most one tensor is held by this reader."""
        for name in self.names() if names is None else names:
            yield name, self.read([name])[name]

    def read_all(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every model tensor (a whole-model load: for the readers that build the model anyway)."""
        return {name: t.to(device) for name, t in self.items()}


def _reason(e: BaseException) -> str:
    """What broke, in one short line: the first failure DCP collected (its ``CheckpointException`` wraps each
    rank's), its type and the first line of its message."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))
        e = e[0] if isinstance(e, tuple) else e  # some versions keep (exception, traceback)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    first = lines[0][:160] if lines else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
