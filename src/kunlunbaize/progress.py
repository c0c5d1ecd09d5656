"""Progress of a long job (prepare, train, eval, post-training) on stderr, terminal or not.

On a terminal it is tqdm's bar. Off one (a file, a pipe, a cluster job's log, ``nohup``) tqdm would either stay
silent or fill the log with carriage returns, so :class:`Progress` prints a plain line instead, every
:data:`INTERVAL` seconds and once at the end::

    train: step 40/130 (31%) | tokens 131,584 | loss 6.758 | tok/s 812 | 2m41s elapsed, ETA 5m27s

The interval can be set with the environment variable ``KUNLUN_PROGRESS_SECONDS``. Imports nothing heavy, so
every layer may use it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

INTERVAL = 30.0
"""Seconds between two plain progress lines off a terminal (unless ``KUNLUN_PROGRESS_SECONDS`` says otherwise)."""
INTERVAL_ENV = "KUNLUN_PROGRESS_SECONDS"

T = TypeVar("T")


def interval_from_env() -> float:
    """The plain-line interval: ``KUNLUN_PROGRESS_SECONDS`` when set (a number > 0), else :data:`INTERVAL`."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:  # also nan
        raise ValueError(f"{INTERVAL_ENV}={raw!r} is not a number of seconds > 0; unset it or give e.g. 30")
    return value


def duration(seconds: float) -> str:
    """``1h02m``, ``3m07s`` or ``12s``."""
    s = round(max(0.0, seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _amount(n: float, unit: str) -> str:
    """``n`` with a decimal prefix: 512B, 12.3MB."""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.0f}{unit}" if prefix == "" else f"{n:.1f}{prefix}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


class Progress:
    """How far a job of ``total`` units has come, shown on ``stream`` (default stderr).

    ``enabled=False`` shows nothing. On a terminal (and with tqdm installed) a tqdm bar; otherwise a plain line
    (:meth:`line`) whenever ``interval`` seconds have passed since the last one, and one at :meth:`close`.
    ``clock`` (seconds, monotonic) and ``tty`` are for tests. ``unit_scale`` writes amounts as 1.2MB (for bytes).
    """

    def __init__(self, total: int | None, *, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 stream: IO[str] | None = None, interval: float | None = None, unit_scale: bool = False,
                 clock: Callable[[], float] = time.monotonic, tty: bool | None = None) -> None:
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = self.initial = initial
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval if interval is not None else interval_from_env()
        self.clock = clock
        self.postfix: dict[str, str] = {}
        self.start = self.last_line = clock()
        self.shown = initial  # units already reported by a plain line
        self.closed = False
        self.bar = self._tqdm(tty) if enabled else None

    def _tqdm(self, tty: bool | None) -> Any:
        if not (tty if tty is not None else _isatty(self.stream)):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm comes with the train extra; without it, plain lines on a terminal too
            return None
        return tqdm(total=self.total, initial=self.initial, desc=self.desc, unit=self.unit,
                    unit_scale=self.unit_scale, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, postfix: dict[str, str] | None = None) -> None:
        """Count ``n`` more units done (and replace the figures shown after the count, when given)."""
        self.set(self.n + n, postfix)

    def set(self, n: int, postfix: dict[str, str] | None = None) -> None:
        """``n`` units are done (and the figures shown after the count are ``postfix``, when given)."""
        if postfix is not None:
            self.postfix = dict(postfix)
        if self.bar is not None:
            if postfix is not None:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n - self.bar.n)  # redraws at most every tqdm's mininterval
        self.n = n
        if self.bar is None and self.enabled and self.clock() - self.last_line >= self.interval:
            self._print_line()

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, counting one unit for each."""
        for item in items:
            yield item
            self.update(1)

    def write(self, text: str) -> None:
        """A message of its own (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def line(self) -> str:
        """The plain progress line as of now: count (and percentage), the postfix figures, elapsed time, ETA."""
        elapsed = self.clock() - self.start
        count = self._count()
        figures = "".join(f" | {k} {v}" for k, v in self.postfix.items())
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        timing = f"{duration(elapsed)} elapsed"
        if self.total and self.n < self.total and rate > 0:
            timing += f", ETA {duration((self.total - self.n) / rate)}"
        return f"{self.desc}: {count}{figures} | {timing}"

    def _count(self) -> str:
        """``step 40/130 (31%)``, ``500/1,742 files (29%)``, ``12.3MB/31.5MB (39%)``."""
        if self.unit_scale:
            text = _amount(self.n, self.unit) + (f"/{_amount(self.total, self.unit)}" if self.total else "")
        else:
            text = f"{self.n:,}" + (f"/{self.total:,}" if self.total else "")
            text = f"{self.unit} {text}" if self.unit == "step" else f"{text} {_plural(self.unit)}"
        return text + (f" ({self.n / self.total:.0%})" if self.total else "")

    def _print_line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_line = self.clock()
        self.shown = self.n

    def close(self) -> None:
        """End the display: close the bar, or print the last plain line (when there is news since the last)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n != self.shown:
            self._print_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plural(unit: str) -> str:
    return unit[:-1] + "ies" if unit.endswith("y") else unit + "s"


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False
