"""Standard output and error that a reader going away (``kunlun info | head -1``) does not stop."""

from __future__ import annotations

import os
import sys
from typing import Any


class OutputGuard:
    """Stands in for sys.stdout/sys.stderr so that a reader going away (``kunlun info | head -1``) stops nothing.

    On the first BrokenPipeError the stream's file descriptor is pointed at /dev/null: the command carries
    on, its later output (and the interpreter's final flush) goes nowhere, and it exits with its own status.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self.closed_by_reader = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        self.closed_by_reader = True
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError, AttributeError):  # not a real file (e.g. captured in a test)
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def output_closed() -> bool:
    """True once the reader of stdout has gone away (only inside :func:`kunlunbaize.cli.main`)."""
    return isinstance(sys.stdout, OutputGuard) and sys.stdout.closed_by_reader
