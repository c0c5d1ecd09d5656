"""SIGTERM/SIGINT handling of a training run: finish the step, save a checkpoint, exit."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it after each step, saves and exits.

    A second signal never interrupts a checkpoint being written (it says to wait); outside a save, a third one
    abandons the run without saving (:class:`TrainingInterrupted`), leaving the last complete checkpoint as it was.
    """

    def __init__(self, verbose: bool = True) -> None:
        self.requested = False
        self.signal_name = ""
        self.saving = False
        self.verbose = verbose
        self._extra = 0
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. inside some test runners)
                self._old[sig] = signal.signal(sig, self._handle)

    def _say(self, text: str) -> None:
        if self.verbose:
            print(f"\n{text}", file=sys.stderr, flush=True)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.requested:
            self.requested = True
            self.signal_name = name
            self._say(f"received {name}: finishing this step and saving a checkpoint …")
            return
        if self.saving:
            self._say(f"received {name} again: saving a checkpoint, please wait")
            return
        self._extra += 1
        if self._extra >= 2:
            raise KeyboardInterrupt
        self._say(f"received {name} again: stopping after this step with a checkpoint, please wait (once more "
                  "to quit at once without saving)")

    @contextlib.contextmanager
    def saving_checkpoint(self) -> Iterator[None]:
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()
