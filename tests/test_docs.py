"""Every command and Python snippet shown in the README and the user guides runs as written.

Snippets are read from the Markdown itself: the lines of ```bash blocks, whole ```python blocks,
``$ command`` transcripts (whose shown output must appear) and inline `kunlun …` spans in the prose.
Each guide runs top to bottom in a sandbox folder laid out as the guide assumes (``runs/small`` is a
trained tiny run, ``data/stdlib`` a prepared dataset, the user's own files of the examples exist), with
``.venv/bin/kunlun`` being this interpreter's ``kunlun``. A ``kunlun`` or ``python -m kunlunbaize…`` command, and
each guide's Python session, runs in a child forked from an interpreter that has already imported torch and
kunlunbaize (:mod:`tests.forkserver`), with the command's own arguments, folder, environment and standard streams;
its exit status and output are checked as a fresh process's would be. Commands whose cost is a full training budget
or that need hardware this machine lacks are only parsed by the real argument parser; they are named
in :data:`PARSE_ONLY` with the reason, so nothing is skipped silently.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .forkserver import SOCKET_VAR

ROOT = Path(__file__).resolve().parents[1]
FORKSERVER = ROOT / "tests" / "forkserver.py"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("guide-*.md"))]

# Commands not run here (regex on the snippet → why). They are still parsed by `kunlun`'s parser.
PARSE_ONLY = {
    r"scripts/setup\.sh": "the README main job itself: setup + a 10-minute training run (run from a fresh clone)",
    r"scripts/test\.sh": "the README test command: this suite itself",
    r"(^|\s|/)kunlun train\b": "a full training budget (minutes to days); the loop runs on tiny budgets in "
                              "test_train.py and test_train_safety.py",
    r"-m kunlunbaize\.cli train\b": "multi-process training at a full budget; torchrun is exercised in test_train.py",
    r"kunlun generate .*--compile|StaticDecoder\(": "compiles the decoding step with inductor (tens of seconds a "
                                                   "shape); the same code runs with torch.compile's eager backend "
                                                   "in test_generate_cli.py and test_static_decode.py",
    r"(^|\s|/)kunlun demo\b": "300+ training steps; the demo's code path is test_demo",
    r"(^|\s|/)kunlun prepare\s*(#|$)": "the whole standard library (~30 MB, 12–30 s); prepare runs on real "
                                      "files in the examples below and in test_data_prepare.py",
    r"prepare\(sources=\[\]": "the whole standard library (~30 MB, 12–30 s)",
    r"posttrain demo\b": "four post-training stages on the main job's model (minutes); its code path is "
                         "test_posttrain.py::test_demo_runs_every_stage_and_reports_each",
    r"posttrain rs\b": "the docs' tiny model answers no prompt right, so a round has nothing to keep (it stops with "
                       "that error); rejection sampling runs in test_posttrain.py",
    r"-m kunlunbaize\.cli posttrain\b": "two processes; torchrun post-training is exercised in test_posttrain.py",
    r"(^|\s|/)kunlun serve\b": "starts a server that runs until it is stopped; test_serve.py starts `kunlun serve` "
                               "and stops it with SIGTERM",
    r"127\.0\.0\.1:8000": "talks to a running `kunlun serve`; test_serve.py sends these requests (the openai "
                          "client, raw HTTP, lm-eval's local-completions) to a server on a free port",
    r"--lm-eval ruler_": "lm-eval's RULER tasks need `wonderwords`, which no extra installs (guide-eval.md says what "
                         "else they need); test_eval_harness.py checks the error that names it",
    r"--task ruler\b": "the long-context suite on a context-extended model (minutes a length); "
                        "test_eval_ruler.py runs `kunlun eval --task ruler=…` end to end on a tiny checkpoint",
    r"--task position-loss\b": "loss by position on a context-extended model's long windows; "
                                "test_eval_position_loss.py runs `kunlun eval --task position-loss` end to end on a "
                                "tiny checkpoint",
    r"benchmarks/long_context\.py": "the long-context demonstration: ten training stages and their evaluations "
                                     "(about an hour on 2 shared CPU cores); its parts are tested on their own",
    r"setup-vllm\.sh|\.venv-vllm|\bvllm\b": "vLLM in its own environment (scripts/setup-vllm.sh: ~3.5 GB, "
                                            "minutes); tests/test_vllm.py runs vLLM offline and its OpenAI server "
                                            "on tiny exports",
}
NEEDS_GPU = re.compile(r"--device cuda|device=\"cuda\"|\.cuda\(\)")
PLACEHOLDER = re.compile(r"…|\[|\b(OUT|DIR|PATH|N|TASKS|RUN)\b")


@dataclass
class Snippet:
    doc: str
    line: int
    kind: str  # "shell", "python", "transcript", "file" (a file the guide shows: written before the commands
    # run; expect holds its path) or "mention" (a command named in prose: parsed, not run)
    text: str
    expect: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text.strip()[:200]}"


def extract(path: Path) -> list[Snippet]:
    """The runnable snippets of one Markdown file, in document order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            out.extend(_inline(path.name, i + 1, lines[i]))
            i += 1
            continue
        lang, start = fence.group(1), i + 1
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if lang in ("bash", "sh"):
            out.extend(_shell_lines(path.name, start + 1, body))
        elif lang == "python":
            out.append(Snippet(path.name, start + 1, "python", "\n".join(body)))
        elif lang == "yaml" and (named := _file_named_before(lines, start - 1, ".yaml")):
            out.append(Snippet(path.name, start + 1, "file", "\n".join(body) + "\n", (named,)))
        elif lang == "" and body and body[0].startswith("$ "):
            expect = tuple(x.strip() for x in body[1:] if x.strip() and "..." not in x and "…" not in x)
            out.append(Snippet(path.name, start + 1, "transcript", body[0][2:], expect))
    return out


def _file_named_before(lines: list[str], fence: int, suffix: str) -> str | None:
    """The file a block shows, when the paragraph before it names one in backticks (`my_tasks/task.yaml`, …)."""
    i = fence - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    paragraph = []
    while i >= 0 and lines[i].strip():
        paragraph.insert(0, lines[i])
        i -= 1
    names = re.findall(r"`([\w./-]+" + re.escape(suffix) + ")`", " ".join(paragraph))
    return names[0] if names else None


def _shell_lines(doc: str, first: int, body: list[str]) -> list[Snippet]:
    out, buf, at = [], "", first
    for n, raw in enumerate(body):
        if not buf:
            at = first + n
        buf += raw.rstrip("\\").rstrip() + " " if raw.rstrip().endswith("\\") else raw
        if raw.rstrip().endswith("\\"):
            continue
        if buf.strip() and not buf.lstrip().startswith("#"):
            out.append(Snippet(doc, at, "shell", buf))
        buf = ""
    return out


def _inline(doc: str, line: int, text: str) -> list[Snippet]:
    """`kunlun …` spans in prose: `.venv/bin/kunlun …` ones are commands to type; other spans with arguments
    are mentions (parsed only); bare names (`kunlun train`), fragments (`kunlun export --hf`) and templates
    (`kunlun export --hf OUT`) are neither."""
    out = []
    for span in re.findall(r"`((?:\.venv/bin/)?kunlun [^`]+)`", text):
        words = span.split()
        if PLACEHOLDER.search(span) or len(words) < 3 or words[-1].startswith("-"):
            continue
        out.append(Snippet(doc, line, "shell" if span.startswith(".venv/bin/") else "mention", span))
    return out


def kunlun_argv(command: str) -> list[list[str]]:
    """The argument lists that each `kunlun` (or `-m kunlunbaize.cli`) invocation in a shell line gets."""
    words = shlex.split(command, comments=True)
    out, cur = [], None
    for w in [*words, "|"]:
        if w in ("|", "&&", ";", "||"):
            if cur is not None:
                out.append(cur)
            cur = None
        elif cur is not None:
            cur.append(w)
        elif w.endswith("kunlun") or w == "kunlunbaize.cli":
            cur = []
    return out


def parse_only_reason(s: Snippet) -> str | None:
    for pattern, why in PARSE_ONLY.items():
        if re.search(pattern, s.text, re.M):
            return why
    return None


# ------------------------------------------------------------------------------------------------- fixtures


def _stdlib_text(names: list[str]) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(lib / n).read_text(encoding="utf-8") for n in names]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> Path:
    """The user's own inputs that the guides' examples name: folders, JSONL.gz, Parquet, a saved dataset."""
    root = tmp_path_factory.mktemp("user_files")
    docs = _stdlib_text(["textwrap.py", "shlex.py", "colorsys.py", "fnmatch.py", "bisect.py", "heapq.py",
                         "glob.py", "keyword.py"])
    for folder in ("books", "papers", "corpus", "more_text"):
        (root / folder).mkdir()
        for n, d in enumerate(docs):
            (root / folder / f"doc{n}.txt").write_text(d, encoding="utf-8")
    (root / "notes.txt").write_text(docs[0], encoding="utf-8")
    (root / "crawl" / "2024").mkdir(parents=True)
    with gzip.open(root / "crawl" / "2024" / "part0.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"content": d}) + "\n" for d in docs)
    (root / "notes.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    (root / "prompt.txt").write_text("def read_config(path):\n", encoding="utf-8")
    (root / "my_tasks").mkdir()  # guide-hf's lm-eval task data (its YAML is taken from the guide)
    (root / "my_tasks" / "my_task.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
        for q, c, a in [("import", [" os", " )"], 0), ("def", [" f(", " ]"], 0), ("class", [" )", " A:"], 1)]))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), root / "wiki.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"story": docs}).save_to_disk(str(root / "path" / "to" / "saved_dataset"))
    return root


def _sandbox(tmp: Path, user_files: Path, trained_run: Path, dataset: Path) -> Path:
    """A folder laid out as the guides assume: runs/small, data/stdlib, examples/, the user's files,
    .venv/bin/kunlun and .venv/bin/python (this interpreter, through :mod:`tests.forkserver`'s client)."""
    (tmp / ".venv" / "bin").mkdir(parents=True)
    client = f'"{sys.executable}" -I -S "{FORKSERVER}" client "{sys.executable}"'
    kunlun = tmp / ".venv" / "bin" / "kunlun"
    kunlun.write_text(f'#!/bin/sh\nexec {client} -m kunlunbaize.cli "$@"\n')
    kunlun.chmod(0o755)
    python = tmp / ".venv" / "bin" / "python"  # a script, not a link: a linked venv python loses its venv
    python.write_text(f'#!/bin/sh\nexec {client} "$@"\n')
    python.chmod(0o755)
    for item in user_files.iterdir():
        (tmp / item.name).symlink_to(item, target_is_directory=item.is_dir())
    (tmp / "data").mkdir()
    (tmp / "data" / "stdlib").symlink_to(dataset, target_is_directory=True)
    (tmp / "examples").symlink_to(ROOT / "examples", target_is_directory=True)  # the shipped lm-eval tasks
    run = tmp / "runs" / "small"
    (run / "checkpoints").mkdir(parents=True)
    for item in trained_run.iterdir():
        if item.name != "checkpoints":
            (run / item.name).symlink_to(item, target_is_directory=item.is_dir())
    ckpts = sorted(p for p in (trained_run / "checkpoints").iterdir() if p.name.startswith("step_"))
    for c in ckpts:
        (run / "checkpoints" / c.name).symlink_to(c, target_is_directory=True)
    # the guides name the main job's last checkpoint
    (run / "checkpoints" / "step_00000130").symlink_to(ckpts[-1], target_is_directory=True)
    return tmp


def _env(cwd: Path, server: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{cwd / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            SOCKET_VAR: str(server)}


@pytest.fixture(scope="session")
def kunlun_server() -> Path:
    """A :mod:`tests.forkserver` for the guides' `kunlun` and `python -m` commands (its socket's path): each runs
    in a child forked from an interpreter that has imported torch and kunlunbaize once, instead of a fresh one
    that spends ~7 CPU-s on those imports."""
    folder = Path(tempfile.mkdtemp(prefix="kfs"))  # short: a socket's path has at most 107 bytes
    sock = folder / "socket"
    with open(folder / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(FORKSERVER), "serve", str(sock)], cwd=folder,
                                env=_env(folder, sock), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    deadline = time.monotonic() + SNIPPET_TIMEOUT  # its imports take ~10 CPU-s: minutes on a busy machine
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the fork server did not start:\n{(folder / 'log').read_text()}")
        time.sleep(0.1)
    yield sock
    os.killpg(proc.pid, signal.SIGKILL)  # the server and any command still running
    proc.wait()
    shutil.rmtree(folder, ignore_errors=True)


def _run_shell(s: Snippet, cwd: Path, server: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["bash", "-c", s.text], cwd=cwd, env=_env(cwd, server), capture_output=True, text=True,
                              timeout=SNIPPET_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{s}\ntimed out\n{e.stdout}\n{e.stderr}")


SNIPPET_TIMEOUT = 600  # wall seconds: a few CPU-s each, but minutes where other jobs share the cores
# Runs the Python blocks of one guide in one namespace, as a reader pasting them into one session would.
NOTEBOOK = r"""
import contextlib, io, json, sys, traceback
ns = {"__name__": "__main__"}
for line in sys.stdin:
    out = io.StringIO()
    ok = True
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            exec(compile(json.loads(line), "<snippet>", "exec"), ns)
        except BaseException:
            ok = False
            traceback.print_exc()
    sys.__stdout__.write(json.dumps({"ok": ok, "out": out.getvalue()}) + "\n")
    sys.__stdout__.flush()
"""


class Notebook:
    """One Python process per guide; :meth:`run` executes a block in its shared namespace."""

    def __init__(self, cwd: Path, server: Path) -> None:
        self.proc = subprocess.Popen([cwd / ".venv" / "bin" / "python", "-c", NOTEBOOK], cwd=cwd,
                                     env=_env(cwd, server), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def run(self, s: Snippet) -> subprocess.CompletedProcess:
        self.proc.stdin.write(json.dumps(s.text) + "\n")
        self.proc.stdin.flush()
        answer: list[str] = []
        reader = threading.Thread(target=lambda: answer.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(SNIPPET_TIMEOUT)
        if not answer or not answer[0]:
            self.close()
            pytest.fail(f"{s}\ntimed out or the interpreter died")
        result = json.loads(answer[0])
        return subprocess.CompletedProcess(s.text, 0 if result["ok"] else 1, "", result["out"])

    def close(self) -> None:
        self.proc.stdin.close()  # the interpreter (a fork server's child) ends at the end of its input
        self.proc.kill()
        self.proc.wait()


# ------------------------------------------------------------------------------------------------- tests


def test_extraction_finds_the_guides_commands():
    """The extractor sees what a reader sees (so the test below cannot pass by finding nothing)."""
    found = {d.name: extract(d) for d in DOCS}
    assert any("kunlun generate" in s.text and "--speculative" in s.text for s in found["guide-generate.md"])
    assert any(s.kind == "python" for s in found["README.md"])
    assert any(s.kind == "transcript" and s.expect for s in found["guide-model.md"])
    multi = [s for s in found["guide-train.md"] if "--batch-size 512" in s.text]
    assert multi and "--tokens 20000000000" in multi[0].text  # a continued line is joined
    assert not any("--hf OUT" in s.text for s in found["README.md"])  # templates are not commands
    assert kunlun_argv("echo x | .venv/bin/kunlun generate - # c") == [["generate", "-"]]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_parses(doc):
    """Every `kunlun` invocation shown, run or not, is accepted by the real argument parser."""
    from kunlunbaize.cli import build_parser

    parser = build_parser()
    for s in extract(doc):
        if s.kind in ("python", "transcript"):  # a transcript may show an error: its output is checked below
            continue
        for argv in kunlun_argv(s.text):
            try:
                parser.parse_args(argv)
            except SystemExit as e:
                pytest.fail(f"{s}\nthe parser refuses {argv} (exit {e.code})")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_snippet_runs_as_written(doc, user_files, trained_run, dataset, kunlun_server, tmp_path, request):
    cwd = _sandbox(tmp_path, user_files, trained_run, dataset)
    snippets = extract(doc)
    for s in snippets:  # the files a guide shows exist before its commands run
        if s.kind == "file":
            (cwd / s.expect[0]).parent.mkdir(parents=True, exist_ok=True)
            (cwd / s.expect[0]).write_text(s.text, encoding="utf-8")
    notebook = Notebook(cwd, kunlun_server)
    request.addfinalizer(notebook.close)
    for s in snippets:
        if s.kind in ("mention", "file") or parse_only_reason(s) or (NEEDS_GPU.search(s.text) and not _has_cuda()):
            continue
        r = notebook.run(s) if s.kind == "python" else _run_shell(s, cwd, kunlun_server)
        shown = f"{s}\nexit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
        if s.kind == "transcript":
            for line in s.expect:
                assert line in r.stdout + r.stderr, f"shown output not produced: {line!r}\n{shown}"
            continue
        assert r.returncode == 0, shown
        assert "Traceback" not in r.stderr, shown


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", [*DOCS, *sorted((ROOT / "docs").glob("[A-Z]*.md")),
                                 *sorted((ROOT / "docs" / "reports").glob("*.md"))], ids=lambda p: p.name)
def test_every_link_and_path_exists(doc):
    """Relative links (with their #anchors) and repository paths named in the docs point at something."""
    text = doc.read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+\s+(.*)$", file.read_text(encoding="utf-8"), re.M)
            if anchor not in {_slug(h) for h in headings}:
                missing.append(target)
    for path in re.findall(r"(?<![\w/.])((?:docs|benchmarks|src|tests|scripts)/[\w/.-]+\.(?:md|py|sh|png|json))", text):
        if not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{doc.name} refers to what does not exist: {missing}"


FIDELITY = r"""
import os, sys, torch
print(sys.argv[:-1], repr(sys.path[0]), os.getcwd(), os.environ.get("KUNLUN_DOCS_PROBE"), sys.stdin.read().upper(),
      sorted(k for k in os.environ if k.startswith("TORCH")), torch.get_num_threads())
print("to stderr", file=sys.stderr)
if os.getpid() == int(sys.argv[-1]):  # the shell's pid: the client exec'd the interpreter
    print("fresh process")
raise SystemExit(3)
"""


@pytest.mark.subprocess
def test_a_served_command_is_what_a_fresh_one_would_be(kunlun_server, tmp_path):
    """Through the fork server, a `python -c` command gets the arguments, folder, environment, standard streams and
    exit status a fresh interpreter gives it; a changed environment makes it a fresh process."""
    cwd = tmp_path
    (cwd / ".venv" / "bin").mkdir(parents=True)
    shim = cwd / ".venv" / "bin" / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "{FORKSERVER}" client "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = _env(cwd, kunlun_server)

    def run(python, extra_env):
        cmd = f'exec {shlex.quote(str(python))} -c {shlex.quote(FIDELITY)} a "b c" $$'
        return subprocess.run(["bash", "-c", cmd], cwd=cwd, env={**env, **extra_env}, input="in", text=True,
                              capture_output=True, timeout=SNIPPET_TIMEOUT)

    served, fresh = run(shim, {}), run(sys.executable, {})
    assert fresh.stdout.endswith("fresh process\n")
    assert (served.returncode, served.stdout, served.stderr) == (fresh.returncode, fresh.stdout[:-14], fresh.stderr)
    assert served.returncode == 3 and "['-c', 'a', 'b c'] '' " in served.stdout and "IN" in served.stdout
    assert served.stderr == "to stderr\n" and "fresh process" not in served.stdout
    assert "fresh process" in run(shim, {"KUNLUN_DOCS_PROBE": "set"}).stdout  # read at import time? run it fresh
