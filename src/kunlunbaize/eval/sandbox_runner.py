"""The harness that runs inside the sandbox (standard library only). The sandbox starts it as
``python -I -B -c <this file's text>`` with its job as JSON on stdin, which it reads and closes first.

Roles:

* ``plain``: run a program as ``__main__``; its exit status is the result.
* ``judge`` (trusted): run a test against an untrusted program. The program runs in a second process (role
  ``program``) started from a clean interpreter, so it shares no memory with the test; this process marks itself
  non-dumpable, so the program (same uid) cannot read its memory or descriptors either. The test's code runs here,
  with the trusted ``setup`` (HumanEval's prompt: helpers the test uses), and reaches the program's functions
  through proxies that pass plain data (``None``, bool, int, float, str, bytes, complex and lists, tuples, dicts,
  sets, frozensets of them) both ways. Only when the test's code returns does this process write the run's nonce
  (which never leaves it) to the report descriptor; exiting early, raising in a thread, ``atexit``, printing
  markers, redefining ``check``, builtins or modules, or returning objects with a custom ``__eq__`` cannot
  produce it.
* ``program`` (untrusted): exec the program, report its callables, then answer calls until its input ends.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import traceback
from typing import Any

_PLAIN_SCALARS = (type(None), bool, int, float, str)


class ProgramGone(BaseException):
    """The program ended, or answered something that is not the protocol (a BaseException, so a test's
    ``except Exception`` cannot swallow it)."""


def encode(value: Any) -> Any:
    """``value`` as JSON-able plain data, tuples/dicts/sets/bytes/complex tagged; anything else is refused.
    Subclasses of the plain types are reduced to the plain type (a custom ``__eq__`` never crosses)."""
    if value is None or type(value) in _PLAIN_SCALARS:
        return value
    for base, convert in ((bool, bool), (int, int), (float, float), (str, str)):
        if isinstance(value, base):
            return convert(value)
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {"t": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"d": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, frozenset):
        return {"fs": [encode(v) for v in value]}
    if isinstance(value, set):
        return {"s": [encode(v) for v in value]}
    if isinstance(value, (bytes, bytearray)):
        return {"b": bytes(value).hex()}
    if isinstance(value, complex):
        return {"c": [float(value.real), float(value.imag)]}
    raise TypeError(f"a {type(value).__name__} cannot pass between the program and its test: only None, bool, "
                    "int, float, str, bytes, complex and lists, tuples, dicts, sets of them can")


def decode(value: Any) -> Any:
    """The plain data that :func:`encode` produced; anything else raises :class:`ProgramGone`."""
    if type(value) in _PLAIN_SCALARS:
        return value
    if type(value) is list:
        return [decode(v) for v in value]
    if type(value) is dict and len(value) == 1:
        ((tag, body),) = value.items()
        if tag == "b" and type(body) is str:
            return bytes.fromhex(body)
        if type(body) is list:
            items = [decode(v) for v in body]
            if tag == "t":
                return tuple(items)
            if tag == "s":
                return set(items)
            if tag == "fs":
                return frozenset(items)
            if tag == "d" and all(type(p) is list and len(p) == 2 for p in items):
                return {k: v for k, v in items}
            if tag == "c" and len(items) == 2 and all(type(x) in (int, float) for x in items):
                return complex(items[0], items[1])
    raise ProgramGone(f"the program answered something that is not plain data: {str(value)[:200]}")


# --------------------------------------------------------------------------------------------- untrusted side


def serve_program(requests_fd: int, replies_fd: int) -> None:
    """Exec the program (sent as the first request), report its callables, then answer calls."""
    requests, replies = os.fdopen(requests_fd, "rb"), os.fdopen(replies_fd, "wb")

    def send(message: dict) -> None:
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(json.loads(requests.readline())["code"], "program.py", "exec"), namespace)
    except BaseException as e:  # the program's own error is the result
        traceback.print_exc()
        send({"error": type(e).__name__, "message": str(e)[:500], "at": "load"})
        return
    send({"ready": [n for n, v in namespace.items() if callable(v) and not n.startswith("__")]})
    for line in requests:
        call = json.loads(line)
        try:
            result = namespace[call["call"]](*decode(call["args"]), **decode(call["kwargs"]))
            send({"ok": encode(result)})
        except BaseException as e:  # reported to the test, which decides
            send({"error": type(e).__name__, "message": str(e)[:500]})


# ----------------------------------------------------------------------------------------------- trusted side


class Program:
    """The untrusted program in its own process, and proxies that call its functions."""

    def __init__(self, code: str, runner: str) -> None:
        import subprocess  # here: the program's process does not need it

        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        # /proc/self/exe: this very interpreter, even where its path is not searchable by the sandbox's uid
        python = "/proc/self/exe" if os.path.exists("/proc/self/exe") else sys.executable
        self.proc = subprocess.Popen([python, "-I", "-B", "-c", runner, "program", str(req_r), str(rep_w)],
                                     stdin=subprocess.DEVNULL, pass_fds=(req_r, rep_w), close_fds=True)
        os.close(req_r)
        os.close(rep_w)
        self._requests, self._replies = os.fdopen(self._req_w, "wb"), os.fdopen(self._rep_r, "rb")
        self._send({"code": code})
        reply = self._receive()
        if "ready" not in reply:
            raise _exception(reply)
        self.callables = {n for n in reply["ready"] if type(n) is str}

    def _send(self, message: dict) -> None:
        try:
            self._requests.write(json.dumps(message).encode() + b"\n")
            self._requests.flush()
        except OSError as e:
            raise ProgramGone(f"the program ended: {e}") from None

    def _receive(self) -> dict:
        line = self._replies.readline()
        if not line:
            raise ProgramGone("the program ended before it answered")
        try:
            reply = json.loads(line)
        except ValueError:
            raise ProgramGone(f"the program answered something that is not the protocol: {line[:200]!r}") from None
        if type(reply) is not dict:
            raise ProgramGone("the program answered something that is not the protocol")
        return reply

    def proxy(self, name: str):
        """A function that calls the program's ``name`` with plain-data copies of its arguments."""

        def call(*args: Any, **kwargs: Any) -> Any:
            self._send({"call": name, "args": encode(list(args)), "kwargs": encode(kwargs)})
            reply = self._receive()
            if "ok" in reply:
                return decode(reply["ok"])
            raise _exception(reply)

        call.__name__ = call.__qualname__ = name
        return call


def _exception(reply: dict) -> BaseException:
    """The exception a program reported: a built-in ``Exception`` class by name (so a test can expect
    ``ValueError``), else :class:`ProgramGone`."""
    name, message = str(reply.get("error", "")), str(reply.get("message", ""))
    cls = getattr(builtins, name, None)
    if reply.get("at") != "load" and isinstance(cls, type) and issubclass(cls, Exception):
        return cls(message)
    return ProgramGone(f"{name}: {message}" if name else "the program answered something that is not the protocol")


def _names(code: Any) -> set[str]:
    """Every global/attribute name ``code`` and the functions in it refer to."""
    found = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            found |= _names(const)
    return found


def _not_dumpable() -> None:
    """PR_SET_DUMPABLE 0: a process of the same uid can no longer read this one's memory, descriptors or
    environment through /proc or ptrace."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
    except (ImportError, OSError, AttributeError):
        pass


def judge(job: dict) -> None:
    """Run ``job["test"]`` against the program ``job["code"]``; write the nonce only when the test returned."""
    nonce, report = job["nonce"].encode(), int(job["report_fd"])
    _not_dumpable()
    test = compile(job["test"], "test.py", "exec")
    try:
        setup = compile(job.get("setup") or "", "setup.py", "exec")
    except SyntaxError:  # a prompt that is not a module by itself: its names come from the program
        setup = compile("", "setup.py", "exec")
    program = Program(job["code"], job["runner"])
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    exec(setup, namespace)
    wanted = set(job.get("entry_points") or ()) | {n for n in _names(test)
                                                    if n not in namespace and not hasattr(builtins, n)}
    for name in sorted(wanted & program.callables):
        namespace[name] = program.proxy(name)
    exec(test, namespace)
    os.write(report, nonce)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    if sys.argv[1:2] == ["program"]:
        serve_program(int(sys.argv[2]), int(sys.argv[3]))
        return
    data = sys.stdin.buffer.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    job = json.loads(data)
    del data
    if job["role"] == "plain":
        exec(compile(job["code"], "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    else:
        judge(job)


if __name__ == "__main__":
    main()
