"""``kunlun serve``'s engine in a process of its own: the same tokens as in-process generation, a clear error and an
exit when the engine process dies, and no process left behind after shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kunlunbaize.infer.generate import generate
from kunlunbaize.infer.static import CompileOptions
from kunlunbaize.serve.engine import EngineClosed, Finished, Params
from kunlunbaize.serve.process import EngineDied, EngineOptions, EngineProcess

from .helpers import build, tiny
from .test_serve import CharTokenizer, _alive, _all_gone, _free_port, _http, _jobs, _open_stream, _run


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("static", [None, CompileOptions(compile=False)], ids=["eager", "static"])
def test_the_engine_process_gives_every_request_its_greedy_tokens_and_leaves_nothing_behind(static):
    cfg = tiny()
    model = build(cfg)
    jobs = _jobs(cfg, 6, seed=3)
    alone = [generate(model, [p], params.max_tokens).tokens[0] for p, params in jobs]
    engine = EngineProcess(model, CharTokenizer(), EngineOptions(max_batch=4, threads=1, static=static))
    pid = engine.pid
    try:
        got = _run(engine, jobs)
        assert [r.tokens for r in got] == alone  # submitted together: they shared the batch in the child
        assert [r.text for r in got] == [CharTokenizer().decode(t) for t in alone]
        with pytest.raises(ValueError, match="context"):
            engine.submit(list(range(60)), Params(max_tokens=10), lambda e: None)
    finally:
        assert engine.shutdown(30)
    assert not _alive(pid)  # shutdown joined it
    with pytest.raises(EngineClosed):
        engine.submit([1], Params(max_tokens=1), lambda e: None)


def test_when_the_engine_process_dies_requests_in_flight_fail_saying_so_and_new_ones_are_refused():
    model = build(tiny())
    deaths: list[str] = []
    engine = EngineProcess(model, CharTokenizer(), EngineOptions(max_batch=2, threads=1), on_death=deaths.append)
    events: list = []
    finished = threading.Event()

    def sink(event):
        events.append(event)
        if isinstance(event, Finished):
            finished.set()

    try:
        engine.submit([1, 2, 3], Params(max_tokens=60), sink)
        deadline = time.monotonic() + 60
        while not events and time.monotonic() < deadline:  # it is generating
            time.sleep(0.01)
        os.kill(engine.pid, signal.SIGKILL)
        assert finished.wait(30)
        last = events[-1]
        assert last.reason == "error" and "engine process exited" in last.error and "-9" in last.error
        assert deaths and "engine process exited" in deaths[0]
        with pytest.raises(EngineDied, match="engine process exited"):
            engine.submit([1], Params(max_tokens=1), lambda e: None)
    finally:
        engine.shutdown(5)


@pytest.mark.slow
@pytest.mark.subprocess
def test_kunlun_serve_exits_with_a_clear_error_when_its_engine_process_dies(trained_run):
    pytest.importorskip("fastapi")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kunlunbaize.cli", "serve", "--checkpoint", str(trained_run),
                             "--port", str(port), "--log-level", "warning", "--engine", "process",
                             "--no-compile"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert f"127.0.0.1:{port}/v1" in proc.stdout.readline()
        children = _children(proc.pid)
        assert children  # the engine (and multiprocessing's resource tracker)
        url = f"http://127.0.0.1:{port}"
        assert _http("GET", f"{url}/health")[0] == 200
        engine_pid = next(c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text())
        body = {"model": trained_run.name, "prompt": "x", "max_tokens": 55, "temperature": 0, "stream": True}
        lines = []
        with _open_stream(f"{url}/v1/completions", body) as r:
            for raw in r:
                line = raw.decode().strip()
                if line and not lines:
                    os.kill(engine_pid, signal.SIGKILL)  # mid-stream
                if line:
                    lines.append(line)
        errors = [json.loads(x.removeprefix("data: ")) for x in lines if '"error"' in x]
        assert errors and "engine process exited" in errors[-1]["error"]["message"]
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "engine process exited" in proc.stdout.read()
    assert _all_gone(children)


def test_an_engine_that_cannot_start_is_a_clear_error():
    model = build(tiny(mtp_depth=0))
    with pytest.raises(ValueError, match="MTP depths"):
        EngineProcess(model, CharTokenizer(), EngineOptions(speculative=True))


def test_a_request_is_token_identical_through_the_engine_process_with_stop_ids():
    model = build(tiny())
    prompt = [5, 9, 2]
    alone = generate(model, [prompt], 20).tokens[0]
    stop = alone[7]
    cut = alone[:alone.index(stop)]
    engine = EngineProcess(model, CharTokenizer(), EngineOptions(threads=1))
    try:
        got = _run(engine, [(prompt, Params(max_tokens=20, stop_ids=frozenset({stop})))])[0]
    finally:
        engine.shutdown(30)
    assert got.reason == "stop" and got.tokens == cut
