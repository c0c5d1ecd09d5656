"""The engine in a process of its own: the model decodes without sharing the GIL with the HTTP server.

:class:`EngineProcess` starts (spawn) a child that runs an :class:`~kunlunbaize.serve.engine.Engine` on the
model, whose weights it receives in shared memory (no second load, no copy). It offers the engine's interface
(:meth:`submit`, :meth:`cancel`, :meth:`stop_accepting`, :meth:`shutdown`, ``queue_depth``, ``running``) to the HTTP
side, so the server does not know which it talks to.

Two pipes connect them. Commands (submit, cancel, stop accepting, shut down) go down one; up the other come the
events of each engine step as one message: every sequence's :class:`Delta` s and :class:`Finished` of that step,
with the engine's queue depth and running count. A thread of the parent reads them and hands each event to its
sequence's sink.

The child ignores SIGINT and SIGTERM (the parent drains, then tells it to stop) and exits when its command pipe
closes, so it never outlives the server. When the child dies, every request in flight finishes with an error that
says so, new requests are refused (:class:`EngineDied`), and ``on_death`` is called (``kunlun serve`` exits).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing as mp

from ..infer.static import CompileOptions
from ..model import DEFAULT_PREFILL_CHUNK, KunlunBaize
from .engine import Delta, Engine, EngineClosed, Finished, Params, QueueFull, Sink, check_fits

log = logging.getLogger("kunlunbaize.serve")

_START_TIMEOUT = 1800.0  # compiling the static step's buckets takes minutes on a small CPU (a dead child ends it)


class EngineDied(EngineClosed):
    """The engine process exited: the server cannot generate any more."""


@dataclass(eq=False)
class Handle:
    """A sequence submitted to the engine process (what :meth:`EngineProcess.cancel` takes)."""

    id: int
    sink: Sink
    tokens: list[int] = field(default_factory=list)
    done: bool = False


@dataclass(frozen=True)
class EngineOptions:
    """How the child builds its :class:`Engine` and its torch threads."""

    max_batch: int = 16
    max_queue: int = 256
    speculative: bool = False
    draft_len: int | None = None
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK
    threads: int | None = None  # torch threads of the engine process (None: torch's default there)
    static: CompileOptions | None = None  # the compiled static batch step (None: the eager step)


class EngineProcess:
    """An :class:`Engine` in a spawned child process; :meth:`submit` from any thread of the parent."""

    def __init__(self, model: KunlunBaize, tokenizer: Any, options: EngineOptions = EngineOptions(),
                 on_death: Callable[[str], None] | None = None) -> None:
        check_options(model, options)
        self.context = model.config.max_seq_len
        self.max_queue = options.max_queue
        self.on_death = on_death
        ctx = mp.get_context("spawn")
        commands_out, commands_in = ctx.Pipe(duplex=False)  # (reader, writer)
        events_out, events_in = ctx.Pipe(duplex=False)
        model.share_memory()
        self._process = ctx.Process(target=_child_main, name="kunlun-engine",
                                    args=(model, tokenizer, options, commands_out, events_in), daemon=True)
        self._process.start()
        commands_out.close()
        events_in.close()
        self._commands, self._events = commands_in, events_out
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._handles: dict[int, Handle] = {}
        self._ids = itertools.count()
        self._accepting = True
        self._waiting = 0
        self._running = 0
        self.died: str | None = None
        self._wait_ready()
        self._reader = threading.Thread(target=self._read, name="kunlun-engine-events", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    # ----------------------------------------------------------------------------------------------- interface
    def submit(self, prompt: list[int], params: Params, sink: Sink) -> Handle:
        """Queue a sequence in the engine process; ``sink`` gets its events on the parent's reader thread. Raises
        QueueFull, EngineClosed (EngineDied) or ValueError, as :meth:`Engine.submit` does."""
        check_fits(prompt, params, self.context)
        with self._lock:
            if self.died is not None:
                raise EngineDied(self.died)
            if not self._accepting:
                raise EngineClosed("the server is shutting down")
            if len(self._handles) - self._running >= self.max_queue:  # at least the waiting ones
                raise QueueFull(f"{self.max_queue} requests are waiting already")
            handle = Handle(id=next(self._ids), sink=sink)
            self._handles[handle.id] = handle
        self._send(("submit", handle.id, list(prompt), params))
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop the sequence at the engine's next step; its sink gets ``Finished("cancelled")``."""
        if not handle.done:
            self._send(("cancel", handle.id))

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; those queued or running go on."""
        with self._lock:
            self._accepting = False
        self._send(("stop_accepting",))

    def shutdown(self, timeout: float | None = None) -> bool:
        """Let the queued and running sequences finish (up to ``timeout`` s, then cancel them) and end the child.
        True when everything finished in time."""
        with self._lock:
            self._accepting = False
        self._send(("shutdown", timeout))
        # only the reader thread reaps the child: two threads waiting on one process race (the loser reads no exit
        # code); the reader ends once it has
        self._reader.join(None if timeout is None else timeout + 15)
        clean = not self._reader.is_alive() and self._process.exitcode == 0 and not self._handles
        if self._reader.is_alive():
            self._process.kill()
            self._reader.join(15)
        self._commands.close()
        return clean

    # -------------------------------------------------------------------------------------------------- inside
    def _send(self, message: tuple) -> None:
        with contextlib.suppress(OSError, ValueError), self._send_lock:  # the child is gone: the reader reports it
            self._commands.send(message)

    def _wait_ready(self) -> None:
        if not self._events.poll(_START_TIMEOUT) or self._process.exitcode is not None:
            self._process.kill()
            raise RuntimeError(f"the engine process did not start (exit code {self._process.exitcode}); see the "
                               "messages above")
        kind, detail = self._events.recv()
        if kind != "ready":
            self._process.join(10)
            raise RuntimeError(f"the engine process failed to start: {detail}")

    def _read(self) -> None:
        """Hand each event from the child to its sink; when the child goes away, fail what is left."""
        try:
            while True:
                events, self._waiting, self._running = self._events.recv()
                for ident, event in events:
                    self._deliver(ident, event)
        except (EOFError, OSError):
            pass
        self._process.join()  # the pipe closes as the child ends (shutdown kills one that does not)
        code = self._process.exitcode
        if code == 0 and not self._handles:
            return  # a clean shutdown
        self._die(f"the engine process exited (exit code {code})")

    def _deliver(self, ident: int, event: Delta | Finished) -> None:
        handle = self._handles.get(ident)
        if handle is None:
            return
        if isinstance(event, Finished):
            handle.done = True
            handle.tokens = event.tokens
            with self._lock:
                del self._handles[ident]
        else:
            handle.tokens.extend(event.tokens)
        try:
            handle.sink(event)
        except Exception:
            log.exception("delivering an event failed; cancelling the request")
            self.cancel(handle)

    def _die(self, reason: str) -> None:
        with self._lock:
            self.died = reason
            left = list(self._handles.values())
            self._handles.clear()
        self._waiting = self._running = 0
        log.error("%s; %d request(s) in flight fail", reason, len(left))
        for handle in left:
            handle.done = True
            try:
                handle.sink(Finished(reason="error", text="", tokens=handle.tokens, prompt_tokens=0, logprobs=None,
                                     prompt_logprobs=None, error=reason))
            except Exception:
                log.exception("delivering an event failed")
        if self.on_death is not None:
            self.on_death(reason)


def check_options(model: KunlunBaize, options: EngineOptions) -> None:
    """Refuse options the engine would refuse, before a process is started."""
    if options.max_batch < 1 or options.max_queue < 1:
        raise ValueError(f"max_batch and max_queue must be >= 1, got {options.max_batch} and {options.max_queue}")
    if options.speculative and model.config.mtp_depth == 0:
        raise ValueError("speculative decoding needs MTP depths; this model has none")


# ------------------------------------------------------------------------------------------------- the child
def _child_main(model: KunlunBaize, tokenizer: Any, options: EngineOptions,
                commands: multiprocessing.connection.Connection,
                events: multiprocessing.connection.Connection) -> None:
    """The engine process: build the engine, then obey commands until told to shut down or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent drains
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        outbox = _Outbox(events)
        engine = Engine(model, tokenizer, max_batch=options.max_batch, max_queue=options.max_queue,
                        speculative=options.speculative, draft_len=options.draft_len,
                        prefill_chunk=options.prefill_chunk, after_step=outbox.flush, static=options.static)
        outbox.engine = engine
    except Exception as e:
        events.send(("error", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None
    events.send(("ready", os.getpid()))
    _obey(engine, outbox, commands)


def _obey(engine: Engine, outbox: _Outbox, commands: multiprocessing.connection.Connection) -> None:
    sequences: dict[int, Any] = {}
    timeout: float | None = 5.0  # the parent is gone: cancel soon
    while True:
        try:
            message = commands.recv()
        except (EOFError, OSError):
            break
        kind = message[0]
        if kind == "submit":
            _, ident, prompt, params = message
            sink = outbox.sink(ident, sequences)
            try:
                seq = engine.submit(prompt, params, sink)
                sequences[ident] = seq
                if seq.done:  # finished before it was recorded
                    sequences.pop(ident, None)
            except (QueueFull, EngineClosed, ValueError) as e:
                outbox.post(ident, Finished(reason="error", text="", tokens=[], prompt_tokens=len(prompt),
                                            logprobs=None, prompt_logprobs=None, error=str(e)))
                outbox.flush()
        elif kind == "cancel":
            seq = sequences.get(message[1])
            if seq is not None:
                engine.cancel(seq)
        elif kind == "stop_accepting":
            engine.stop_accepting()
        elif kind == "shutdown":
            timeout = message[1]
            break
    engine.shutdown(timeout)
    outbox.flush()
    outbox.close()


class _Outbox:
    """Collects the events of one engine step and sends them up as one message."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn = conn
        self.engine: Engine | None = None
        self.events: list[tuple[int, Delta | Finished]] = []
        self.lock = threading.Lock()

    def sink(self, ident: int, sequences: dict[int, Any]) -> Sink:
        def put(event: Delta | Finished) -> None:
            if isinstance(event, Finished):
                sequences.pop(ident, None)
            self.post(ident, event)
        return put

    def post(self, ident: int, event: Delta | Finished) -> None:
        with self.lock:
            self.events.append((ident, event))

    def flush(self) -> None:
        with self.lock:  # also keeps two threads from writing to the pipe at once
            events, self.events = self.events, []
            if not events:
                return
            engine = self.engine
            waiting, running = (engine.queue_depth, engine.running) if engine is not None else (0, 0)
            with contextlib.suppress(OSError, ValueError):  # the parent is gone
                self.conn.send((events, waiting, running))

    def close(self) -> None:
        self.conn.close()
