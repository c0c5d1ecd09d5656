"""``kunlun serve``: the continuous-batching engine (each request gets what it would alone), and the OpenAI API
through the real ``openai`` client, lm-eval's ``local-completions`` and a concurrent load test."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kunlunbaize.infer.generate import generate
from kunlunbaize.infer.static import CompileOptions
from kunlunbaize.model.cache import InferenceCache
from kunlunbaize.serve.engine import Engine, EngineClosed, Finished, Params, QueueFull

from .helpers import build, config_id, switch_configs, tiny


class CharTokenizer:
    """One character per token id (a–z, then A–Z …): text and tokens line up, so stop strings can split anywhere."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def _run(engine: Engine, jobs: list[tuple[list[int], Params]], stagger: float = 0.0,
         first_steps: int = 0) -> list[Finished]:
    """Submit every job (``stagger`` seconds apart) and wait for them all; their Finished events, in order. With
    ``first_steps`` the other jobs are submitted once the engine has taken that many decode steps (the first job
    alone in the batch, whatever the machine's speed)."""
    results: dict[int, Finished] = {}
    done = threading.Event()
    lock = threading.Lock()

    def sink_for(i: int):
        def sink(event):
            if isinstance(event, Finished):
                with lock:
                    results[i] = event
                    if len(results) == len(jobs):
                        done.set()
        return sink

    for i, (prompt, params) in enumerate(jobs):
        engine.submit(prompt, params, sink_for(i))
        deadline = time.monotonic() + 60
        while i == 0 and first_steps and engine.steps < first_steps and time.monotonic() < deadline:
            time.sleep(0.001)
        if stagger:
            time.sleep(stagger)
    assert done.wait(120), f"only {len(results)} of {len(jobs)} finished"
    return [results[i] for i in range(len(jobs))]


def _jobs(cfg, count: int, seed: int) -> list[tuple[list[int], Params]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(1, 30, (1,), generator=g))
        m = int(torch.randint(1, cfg.max_seq_len - n, (1,), generator=g))
        out.append((torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(), Params(max_tokens=m)))
    return out


@pytest.fixture
def shifts(monkeypatch):
    """Counts of the batch cache's right shifts (a longer prompt joined) and left shifts (the slots ran out)."""
    seen = {"right": 0, "left": 0}
    original = InferenceCache.shift

    def counted(self, offset, rows=None):
        if offset:
            seen["right" if offset > 0 else "left"] += 1
        return original(self, offset, rows)

    monkeypatch.setattr(InferenceCache, "shift", counted)
    return seen


# ---------------------------------------------------------------------------------------------------- engine
@pytest.mark.slow
@pytest.mark.parametrize("cfg", switch_configs(), ids=config_id)
def test_every_request_in_a_changing_batch_gets_its_greedy_answer_alone(cfg, shifts):
    model = build(cfg)
    g = torch.Generator().manual_seed(1)
    # a short prompt that generates long, then a longer prompt joins it (the batch shifts right), and the short
    # one's row outgrows the slots (they are recycled: a left shift); then requests of random lengths
    jobs = [(torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(), Params(max_tokens=m))
            for n, m in ((2, 60), (25, 20))] + _jobs(cfg, 5, seed=0)
    alone = [generate(model, [p], params.max_tokens).tokens[0] for p, params in jobs]
    engine = Engine(model, CharTokenizer(), max_batch=4)
    try:
        got = _run(engine, jobs, stagger=0.002, first_steps=2)  # the short prompt decodes alone, then the rest join
    finally:
        engine.shutdown(10)
    assert [r.tokens for r in got] == alone
    assert all(r.reason == "length" and len(r.tokens) == p.max_tokens for r, (_, p) in zip(got, jobs, strict=True))
    assert engine.steps < sum(p.max_tokens for _, p in jobs)  # requests really shared steps
    assert shifts["right"] > 0 and shifts["left"] > 0  # rows joined longer than the batch; the slots were recycled


@pytest.mark.parametrize("cfg", [tiny(dense_residual=False, transformerx=False, mtp_depth=0),
                                 pytest.param(tiny(), marks=pytest.mark.slow),
                                 pytest.param(tiny(dense_residual=False, mtp_depth=1), marks=pytest.mark.slow)],
                         ids=config_id)
def test_the_static_batch_step_gives_every_request_its_greedy_answer_alone(cfg, shifts):
    """The running batch stepped through the static step (run eagerly here; compiled it traces the same code),
    padded to buckets of 1, 2 and 4 rows: rows join longer than the batch, outgrow the slots and leave, and each
    request still gets its tokens alone."""
    model = build(cfg)
    g = torch.Generator().manual_seed(1)
    jobs = [(torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(), Params(max_tokens=m))
            for n, m in ((2, 60), (25, 20))] + _jobs(cfg, 5, seed=0)
    alone = [generate(model, [p], params.max_tokens).tokens[0] for p, params in jobs]
    engine = Engine(model, CharTokenizer(), max_batch=4, static=CompileOptions(compile=False),
                    speculative=cfg.mtp_depth > 0)
    assert engine.decoder is not None and engine.decoder.buckets == (1, 2, 4)
    try:
        got = _run(engine, jobs, stagger=0.002, first_steps=2)  # the short prompt decodes alone, then the rest join
    finally:
        engine.shutdown(10)
    assert [r.tokens for r in got] == alone
    assert engine.steps < sum(p.max_tokens for _, p in jobs)
    assert shifts["right"] > 0 and shifts["left"] > 0


@pytest.mark.parametrize("slot_buckets", [3, 1])
def test_the_engine_drops_the_shared_padding_to_step_in_a_smaller_slot_bucket(slot_buckets, shifts):
    """A request that joined a longer one is left-padded to the batch's slots; once the long one leaves, the engine
    shifts the request's row left (its padding dropped) rather than step it over 64 slots where 32 hold its
    tokens. With one slot bucket (every step reads all 64) it shifts only when the slots run out: never here. The
    tokens are the request's alone either way."""
    cfg = tiny(dense_residual=False, transformerx=False, mtp_depth=0)
    model = build(cfg)
    g = torch.Generator().manual_seed(3)
    jobs = [(torch.randint(0, cfg.vocab_size, (2,), generator=g).tolist(), Params(max_tokens=m)) for m in (40, 28)]
    engine = Engine(model, CharTokenizer(), max_batch=2, static=CompileOptions(compile=False,
                                                                               slot_buckets=slot_buckets))
    assert engine.decoder.slot_buckets[1] == ((16, 32, 64) if slot_buckets == 3 else (64,))
    try:
        got = _run(engine, jobs, first_steps=20)  # the second joins at slot 22 or later, 20 or more pads before it
    finally:
        engine.shutdown(10)
    assert [r.tokens for r in got] == [generate(model, [p], params.max_tokens).tokens[0] for p, params in jobs]
    assert shifts["right"] == 0 and shifts["left"] == (1 if slot_buckets == 3 else 0)


@pytest.mark.parametrize("fill_buckets", [0, 2])
def test_the_engine_compiles_each_bucket_once_before_it_takes_requests(fill_buckets):
    """Warm-up traces every bucket's step (per slot bucket too) and every prefill bucket's while the engine is made;
    serving a changing batch (lone prompts among them, read through the prefill buckets) then traces none."""
    from torch._dynamo.testing import CompileCounter

    cfg = tiny(dense_residual=False, transformerx=False, mtp_depth=0)
    model = build(cfg)
    counter = CompileCounter()
    engine = Engine(model, CharTokenizer(), max_batch=5, static=CompileOptions(backend=counter,
                                                                               fill_buckets=fill_buckets))
    try:  # buckets of 4 and 5 rows (at least half the batch): a step per key length (16, 32 and 64 slots)
        assert engine.decoder.buckets == (1, 2, 4, 5)
        assert counter.frame_count == 1 + 1 + 3 + 3 + fill_buckets  # prompts of 8 and 16 tokens
        jobs = _jobs(cfg, 7, seed=4)
        got = _run(engine, jobs, stagger=0.002)
        assert [r.tokens for r in got] == [generate(model, [p], params.max_tokens).tokens[0] for p, params in jobs]
        assert counter.frame_count == 8 + fill_buckets
    finally:
        engine.shutdown(10)


@pytest.mark.parametrize(("flags", "mode"), [
    ([], "default"), (["--compile-mode", "max-autotune"], "max-autotune"),
    (["--compile-mode", "reduce-overhead"], "reduce-overhead"), (["--no-compile"], None)])
def test_kunlun_serve_compiles_the_batch_step_in_the_mode_asked_for(flags, mode):
    """Without --compile-mode: torch.compile's default mode everywhere (max-autotune starts minutes later on a CPU);
    the mode asked for otherwise; --no-compile: the eager step."""
    from kunlunbaize.cli import build_parser
    from kunlunbaize.cli.serve import compile_options

    options = compile_options(build_parser().parse_args(["serve", *flags]))
    assert (options and options.mode) == mode


def test_kunlun_serve_refuses_a_compile_mode_without_the_compiled_step():
    """--no-compile with --compile-mode contradict each other: a clear error, not a silently ignored flag."""
    from kunlunbaize.cli import build_parser
    from kunlunbaize.cli.serve import compile_options

    with pytest.raises(SystemExit, match="leave out --no-compile"):
        compile_options(build_parser().parse_args(["serve", "--no-compile", "--compile-mode", "default"]))


@pytest.mark.parametrize(("flags", "buckets"), [([], 0), (["--prefill-buckets", "3"], 3),
                                               (["--prefill-buckets", "2", "--no-compile"], None),
                                               (["--prefill-buckets", "2", "--speculative"], None)])
def test_kunlun_serve_compiles_prefill_buckets_when_asked_and_only_with_the_compiled_plain_step(flags, buckets):
    from kunlunbaize.cli import build_parser
    from kunlunbaize.cli.serve import compile_options

    args = build_parser().parse_args(["serve", *flags])
    if buckets is None:
        with pytest.raises(SystemExit, match="--prefill-buckets needs the compiled step"):
            compile_options(args)
    else:
        assert compile_options(args).fill_buckets == buckets


def test_requests_waiting_together_are_prefilled_together_and_get_their_answers_alone(monkeypatch):
    """Prompts admitted at one step are prefilled in left-padded groups (one forward each), and every request still
    gets its tokens alone; a group whose prefill fails is prefilled again one by one."""
    import kunlunbaize.serve.engine as engine_module

    cfg = tiny(dense_residual=False, mtp_depth=0)
    model = build(cfg)
    g = torch.Generator().manual_seed(5)
    jobs = [(torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(), Params(max_tokens=8))
            for n in (30, 7, 6, 5, 2)]
    alone = [generate(model, [p], params.max_tokens).tokens[0] for p, params in jobs]
    batches: list[int] = []
    real = engine_module.prefill

    def spy(model, ids, *args, **kw):
        batches.append(ids.shape[0])
        if fail and ids.shape[0] > 1:
            raise RuntimeError("out of memory")
        return real(model, ids, *args, **kw)

    monkeypatch.setattr(engine_module, "prefill", spy)
    for fail in (False, True):
        batches.clear()
        engine = Engine(model, CharTokenizer(), max_batch=8)
        started, gate = threading.Event(), threading.Event()
        try:  # a first request holds the engine at its first token while the others queue
            engine.submit([1, 2, 3], Params(max_tokens=2), lambda e, s=started, g=gate: (s.set(), g.wait(30)))
            assert started.wait(30)
            threading.Timer(0.5, gate.set).start()
            got = _run(engine, jobs)
        finally:
            engine.shutdown(10)
        assert [r.tokens for r in got] == alone
        assert batches == ([1, 2, 1, 1, 3, 1, 1, 1] if fail else [1, 2, 3])  # groups (30, 7) and (6, 5, 2)


def test_lone_prompts_read_through_compiled_prefill_buckets_get_their_answers_alone(monkeypatch):
    """With prefill buckets (8 … 64 tokens), each prompt admitted alone while others decode is read through the
    one-row prefill of its bucket, right-padded, and joins the batch (its conv history and all) as the eager
    prefill's row would: every request gets the tokens of `generate` alone, one of them a prompt that with its
    budget fills the context exactly; then a burst of mixed lengths arrives together. A prompt longer than the
    context is still refused with a clear error."""
    from kunlunbaize.infer.static import PromptFiller

    cfg = tiny()  # dense residual, TransformerX's convolutions and cross-attention; the MTP depths are not kept
    model = build(cfg)
    g = torch.Generator().manual_seed(7)
    shapes = [(2, 50), (30, 12), (56, 8), (9, 20), (5, 6), (17, 9), (1, 10), (12, 7)]
    jobs = [(torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(), Params(max_tokens=m)) for n, m in shapes]
    alone = [generate(model, [p], params.max_tokens).tokens[0] for p, params in jobs]
    filled: list[int] = []
    real = PromptFiller.fill
    monkeypatch.setattr(PromptFiller, "fill", lambda self, prompt: (filled.append(len(prompt)), real(self, prompt))[1])
    engine = Engine(model, CharTokenizer(), max_batch=4, static=CompileOptions(compile=False, fill_buckets=4))
    assert engine.filler is not None and engine.filler.lengths == (8, 16, 32, 64) and filled == [8, 16, 32, 64]
    filled.clear()  # (the warm-up's)
    results: dict[int, Finished] = {}
    done = threading.Semaphore(0)

    def submit(i: int):
        def sink(event):
            if isinstance(event, Finished):
                results[i] = event
                done.release()
        return engine.submit(*jobs[i], sink)

    try:
        for i in range(4):  # one at a time, each admitted alone while the earlier ones decode
            seq = submit(i)
            deadline = time.monotonic() + 60
            while not (seq.tokens or seq.done) and time.monotonic() < deadline:  # admitted: its first token
                time.sleep(0.001)
        for i in range(4, len(jobs)):  # a burst, admitted as rows free up
            submit(i)
        for _ in jobs:
            assert done.acquire(timeout=120)
        for prompt, budget in (([1] * 64, 1), ([1] * 65, 0)):
            with pytest.raises(ValueError, match=f"the prompt has {len(prompt)} tokens .* context is 64 tokens"):
                engine.submit(prompt, Params(max_tokens=budget), print)
    finally:
        engine.shutdown(10)
    assert [results[i].tokens for i in range(len(jobs))] == alone
    assert filled[:4] == [2, 30, 56, 9]  # the lone ones went through the buckets (8, 32, 64, 16)
    assert sum(shapes[2]) == cfg.max_seq_len  # 56 prompt tokens and 8 new ones: the whole context


def test_prefill_groups_keep_padding_below_half_of_their_slots():
    from kunlunbaize.serve.engine import Sequence, _groups

    seqs = [Sequence(prompt=[1] * n, params=Params(max_tokens=1), sink=print) for n in (5, 30, 2, 7, 6, 1, 1)]
    assert [[len(s.prompt) for s in group] for group in _groups(seqs)] == [[30, 7], [6, 5, 2, 1, 1]]
    assert _groups([]) == []


@pytest.mark.parametrize("exported", [False, True], ids=["checkpoint", "export"])
def test_a_llama_baseline_is_served_with_the_greedy_tokens_kunlun_generate_gives(llama_run, tmp_path, exported):
    """The baseline serves as the KunlunBaize it equals (all three switches off, the matched FFN): every request
    gets the tokens `kunlun generate` (transformers' LlamaForCausalLM) gives."""
    pytest.importorskip("transformers")
    from kunlunbaize.hf.export_llama import export_llama
    from kunlunbaize.infer.generator import load_for_generation
    from kunlunbaize.serve.model import load_served

    folder = export_llama(llama_run, tmp_path / "hf", log=lambda m: None) if exported else llama_run
    served = load_served(folder)
    cfg = served.model.config
    assert (cfg.dense_residual, cfg.transformerx, cfg.mtp_depth) == (False, False, 0)
    reference = load_for_generation(folder)
    assert type(reference.model).__name__ == "LlamaForCausalLM"
    prompts = [served.encode(t) for t in ("def ", "import os\n", "class A:\n    def __init__(self")]
    want = reference.generate(reference.model, prompts, 16).tokens
    engine = Engine(served.model, served.tokenizer, max_batch=2)
    try:
        got = _run(engine, [(p, Params(max_tokens=16)) for p in prompts])
    finally:
        engine.shutdown(10)
    assert [r.tokens for r in got] == want


def test_speculative_decoding_of_a_lone_request_is_greedy_exact_with_fewer_trunk_forwards():
    cfg = tiny(mtp_depth=3)
    model = build(cfg)
    engine = Engine(model, CharTokenizer(), max_batch=4, speculative=True)
    try:
        for prompt, params in _jobs(cfg, 3, seed=1):
            steps = engine.steps
            forwards = engine.spec_stats.trunk_forwards
            (got,) = _run(engine, [(prompt, params)])
            assert got.tokens == generate(model, [prompt], params.max_tokens).tokens[0]
            assert engine.spec_stats.trunk_forwards - forwards == engine.steps - steps > 0  # every step was a round
        assert sum(engine.spec_stats.accepted) > 0  # drafts were accepted: fewer forwards than tokens
    finally:
        engine.shutdown(10)


@pytest.mark.slow
def test_sampled_requests_with_a_seed_get_what_they_get_alone():
    from kunlunbaize.infer.sampling import SamplingParams

    cfg = tiny()
    model = build(cfg)
    sampling = SamplingParams(temperature=0.9, top_k=20, top_p=0.9)
    jobs = [(p, Params(max_tokens=params.max_tokens, sampling=sampling, seed=100 + i))
            for i, (p, params) in enumerate(_jobs(cfg, 5, seed=2))]
    alone = [generate(model, [p], params.max_tokens, sampling=sampling, seed=params.seed).tokens[0]
             for p, params in jobs]
    engine = Engine(model, CharTokenizer(), max_batch=5)
    try:
        assert [r.tokens for r in _run(engine, jobs)] == alone
    finally:
        engine.shutdown(10)


def test_stop_tokens_stop_strings_and_log_probabilities():
    cfg = tiny(vocab_size=26)
    model = build(cfg)
    prompt = [1, 2, 3, 4]
    free = generate(model, [prompt], 30).tokens[0]
    text = CharTokenizer().decode(free)
    engine = Engine(model, CharTokenizer())
    try:
        (by_token,) = _run(engine, [(prompt, Params(max_tokens=30, stop_ids=frozenset({free[5]})))])
        assert by_token.reason == "stop" and by_token.tokens == free[:free.index(free[5])]
        stop = text[7:10]  # three characters: three tokens
        deltas: list[str] = []
        done = threading.Event()
        engine.submit(prompt, Params(max_tokens=30, stop=(stop,), logprobs=3, prompt_logprobs=2),
                      lambda e: deltas.append(e.text) if not isinstance(e, Finished) else (deltas.append(e),
                                                                                           done.set()))
        assert done.wait(30)
        finished = deltas.pop()
        assert finished.reason == "stop" and finished.text == text[:text.index(stop)]
        assert "".join(deltas) == finished.text  # the stop string never reached the client, not even in part
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([prompt + finished.tokens])).logits[0].float(), -1)
        for i, entry in enumerate(finished.logprobs):
            row = full[len(prompt) - 1 + i]
            assert entry.logprob == pytest.approx(row[entry.token].item(), abs=1e-4)
            assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
        assert finished.prompt_logprobs[0] is None
        for i, entry in enumerate(finished.prompt_logprobs[1:], start=1):
            assert entry.logprob == pytest.approx(full[i - 1, prompt[i]].item(), abs=1e-4)
    finally:
        engine.shutdown(10)


def test_cancelled_and_timed_out_requests_leave_and_the_queue_is_bounded():
    cfg = tiny()
    model = build(cfg)
    engine = Engine(model, CharTokenizer(), max_batch=1, max_queue=2)
    events: list[Finished] = []
    running, gate = threading.Event(), threading.Event()

    def held(event):  # the engine's thread waits in here until the test has queued everything
        running.set()
        gate.wait(30)
        if isinstance(event, Finished):
            events.append(event)

    try:
        long = engine.submit([1, 2], Params(max_tokens=60), held)
        assert running.wait(30)
        late = engine.submit([3], Params(max_tokens=5, timeout=0.0), lambda e: isinstance(e, Finished)
                             and events.append(e))
        engine.submit([4], Params(max_tokens=5), lambda e: None)
        with pytest.raises(QueueFull):
            engine.submit([5], Params(max_tokens=5), lambda e: None)
        engine.cancel(long)
        gate.set()
        deadline = time.monotonic() + 30
        while len(events) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(e.reason for e in events) == ["cancelled", "timeout"]
        assert len(long.tokens) < 60 and late.tokens == []
        with pytest.raises(ValueError, match="context"):
            engine.submit(list(range(60)), Params(max_tokens=10), lambda e: None)
    finally:
        gate.set()
        assert engine.shutdown(30)
    with pytest.raises(EngineClosed):
        engine.submit([1], Params(max_tokens=1), lambda e: None)


# ---------------------------------------------------------------------------------------------------- server
def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (not gone, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _all_gone(pids: list[int], within: float = 30.0) -> bool:
    """Whether every process of ``pids`` has exited within ``within`` seconds."""
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | bytes | None = None) -> tuple[int, str]:
    """A raw HTTP request with the standard library: the status and the body's text."""
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _open_stream(url: str, body: dict):
    """A streaming POST (standard library); iterate or readline the response, close it to hang up."""
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=120)


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """``kunlun serve``'s app on the tiny trained model (with the chat template), in this process, on a free port."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    import uvicorn

    from kunlunbaize.posttrain.chat import CHAT_TEMPLATE
    from kunlunbaize.serve.model import load_served
    from kunlunbaize.serve.server import create_app

    template = tmp_path_factory.mktemp("serve") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE, encoding="utf-8")
    served = load_served(trained_run, "tiny", chat_template=template)
    engine = Engine(served.model, served.tokenizer, max_batch=8, max_queue=64)
    app = create_app(served, engine, request_timeout=120)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/v1", served=served, engine=engine, app=app)
    srv.should_exit = True
    thread.join(10)
    engine.shutdown(10)


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)


def _greedy(served, prompt_ids: list[int], max_tokens: int, stop_ids=()) -> str:
    """What plain greedy generation alone gives: the reference every served answer must equal."""
    out = generate(served.model, [prompt_ids], max_tokens).tokens[0]
    cut = next((i for i, t in enumerate(out) if t in stop_ids), len(out))
    return served.decode(out[:cut])


@pytest.mark.slow
def test_completions_chat_usage_and_choices(server, client):
    served = server.served
    ids = served.encode("def ")
    r = client.completions.create(model="tiny", prompt="def ", max_tokens=12, temperature=0)
    assert r.choices[0].text == _greedy(served, ids, 12, {served.eos_id})
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]

    many = client.completions.create(model="tiny", prompt=["def ", "x = "], max_tokens=5, temperature=0.8, n=3,
                                      seed=7)
    assert sorted(c.index for c in many.choices) == list(range(6))
    assert len({c.text for c in many.choices[:3]}) > 1  # n samples differ
    again = client.completions.create(model="tiny", prompt=["def ", "x = "], max_tokens=5, temperature=0.8, n=3,
                                       seed=7)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]  # a seed reproduces them

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0)
    prompt = served.encode(served.render_chat([{"role": "user", "content": "hi"}]))
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == _greedy(served, prompt, 8, {served.eos_id})
    assert chat.usage.prompt_tokens == len(prompt)


def test_streams_are_server_sent_events_as_openai_sends_them(server, client):
    served = server.served
    whole = client.completions.create(model="tiny", prompt="import ", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="import ", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)

    # the raw bytes: nothing but data lines, one [DONE] at the end
    status, raw = _http("POST", f"{server.url}/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3,
                                                              "stream": True})
    events = [e for e in raw.split("\n\n") if e]
    assert status == 200 and all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert served.decode(served.encode("x")) == "x"


def test_stop_strings_never_leak_even_split_across_tokens(server, client):
    text = client.completions.create(model="tiny", prompt="def ", max_tokens=30, temperature=0).choices[0].text
    assert len(text) > 8
    stop = text[4:8]
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt="def ", max_tokens=30, temperature=0, stop=[stop],
                                      stream=stream)
        got = "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
        assert got == text[:text.index(stop)]
        if not stream:
            assert r.choices[0].finish_reason == "stop"


def test_echo_and_logprobs_score_the_prompt(server, client):
    served = server.served
    ids = served.encode("def main():\n    return 1")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    with torch.no_grad():
        full = torch.log_softmax(served.model(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(full[i - 1, ids[i]].item(), abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(full[i - 1].max().item(), abs=1e-4)
    assert r.choices[0].text.startswith(served.decode(ids))
    one = client.completions.create(model="tiny", prompt=[5], max_tokens=0, echo=True, logprobs=1)
    assert one.choices[0].logprobs.token_logprobs == [None] and one.choices[0].finish_reason == "length"
    assert one.usage.completion_tokens == 0
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x", "n": "2"}, 400, "n"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"prompt": "x", "frequency_penalty": 0.5}, 400, None),
    ({"prompt": "x " * 200}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": ["a", [1]]}, 400, "prompt"),
    ({"prompt": [10**9]}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, status, param):
    code, text = _http("POST", f"{server.url}/completions", {"model": "tiny", **body})
    assert code == status, text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param


def test_errors_through_the_client_and_a_model_without_a_chat_template(server, client, trained_run):
    import openai

    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=-0.5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    assert _http("POST", f"{server.url}/completions", b"{not json")[0] == 400
    assert _http("GET", f"{server.url.removesuffix('/v1')}/health") == (200, '{"status":"ok"}')
    template = server.served.render_chat
    try:
        server.served.render_chat = None
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    finally:
        server.served.render_chat = template


def test_a_full_queue_is_a_429_and_metrics_count_requests(server, client):
    import openai

    engine = server.engine
    saved = engine.max_queue
    running, gate = threading.Event(), threading.Event()

    def held(event):  # the engine's thread waits in here: what is queued meanwhile stays queued
        running.set()
        gate.wait(30)

    try:
        engine.max_queue = 1
        engine.submit([1], Params(max_tokens=2), held)
        assert running.wait(30)
        engine.submit([1], Params(max_tokens=1), lambda e: None)  # the queue is full now
        with pytest.raises(openai.RateLimitError, match="busy"):
            client.completions.create(model="tiny", prompt="x", max_tokens=1)
    finally:
        engine.max_queue = saved
        gate.set()
    client.completions.create(model="tiny", prompt="x", max_tokens=1)  # one answered: counted apart (not on others)
    text = _http("GET", f"{server.url.removesuffix('/v1')}/metrics")[1]
    assert 'kunlun_requests_total{endpoint="/v1/completions",status="429"}' in text
    assert 'kunlun_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in ("kunlun_generation_tokens_total", "kunlun_queue_depth", "kunlun_running_sequences",
                 "kunlun_request_latency_seconds_bucket", "kunlun_time_to_first_token_seconds_count"):
        assert name in text


def test_while_draining_new_requests_get_503_and_health_says_so(server, client):
    import openai

    root = server.url.removesuffix("/v1")
    server.app.state.draining.on = True
    try:
        with pytest.raises(openai.InternalServerError, match="shutting down"):
            client.completions.create(model="tiny", prompt="x", max_tokens=1)
        assert _http("GET", f"{root}/health")[0] == 503
    finally:
        server.app.state.draining.on = False
    assert _http("GET", f"{root}/health")[0] == 200


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_goes_away_cancels_its_request(server, stream):
    import urllib.request

    engine = server.engine
    cancelled = []
    original = engine._finish

    def spy(seq, reason, error=None):
        if reason == "cancelled":
            cancelled.append(seq)
        return original(seq, reason, error)

    step = engine._step

    def slow_step():  # a step takes 40 ms: the request is still running when the client hangs up
        time.sleep(0.04)
        step()

    engine._finish, engine._step = spy, slow_step
    try:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 60, "stream": stream}
        if stream:
            with _open_stream(f"{server.url}/completions", body) as r:
                r.readline()  # the stream is running; now hang up
        else:  # the client gives up waiting for the whole answer
            request = urllib.request.Request(f"{server.url}/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
            with pytest.raises(OSError):
                urllib.request.urlopen(request, timeout=0.3)
        deadline = time.monotonic() + 30
        while not cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cancelled and len(cancelled[0].tokens) < 60
    finally:
        del engine._finish, engine._step


@pytest.mark.slow
def test_32_concurrent_streaming_clients_each_get_their_sequential_greedy_answer(server, client):
    served = server.served
    prompts = [served.decode(list(range(20 + i, 20 + i + 1 + i % 7))) for i in range(32)]
    lengths = [4 + (i * 7) % 29 for i in range(32)]
    expected = [_greedy(served, served.encode(p), n, {served.eos_id}) for p, n in zip(prompts, lengths, strict=True)]

    def one(i: int) -> tuple[str, float]:
        start = time.monotonic()
        stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                           stream=True)
        text = "".join(c.choices[0].text for c in stream if c.choices)
        return text, time.monotonic() - start

    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32), timeout=300))
    wall = time.monotonic() - started
    assert [a for a, _ in answers] == expected  # none lost, none mixed up, each exactly its greedy answer
    latencies = sorted(t for _, t in answers)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies)) - 1]
    print(f"\n32 streaming clients: wall {wall:.2f}s, latency p50 {p50:.2f}s p95 {p95:.2f}s")


@pytest.mark.slow
def test_lm_eval_local_completions_scores_like_in_process_evaluation(server, trained_run, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from kunlunbaize.eval.harness import run_lm_eval

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = root / "examples" / "tasks"
    local_rows, local = run_lm_eval(trained_run, ["kunlun_arith_mc"], include_path=tasks, limit=8, batch_size=4,
                                    log_samples=True)
    from kunlunbaize.hf.export import export_hf

    folder = tmp_path / "hf"
    export_hf(server.served.checkpoint, folder, log=lambda _: None)
    args = (f"base_url={server.url}/completions,model=tiny,tokenizer={folder},tokenizer_backend=huggingface,"
            f"max_length={server.served.context},num_concurrent=4,max_retries=1,tokenized_requests=True")
    remote = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["kunlun_arith_mc"],
                                     task_manager=TaskManager(include_path=str(tasks)), limit=8, log_samples=True,
                                     random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    for metric in ("acc,none", "acc_norm,none"):
        assert remote["results"]["kunlun_arith_mc"][metric] == local["results"]["kunlun_arith_mc"][metric]

    def scores(raw):
        return [[float(r[0]) for r in s["filtered_resps"]] for s in raw["samples"]["kunlun_arith_mc"]]

    for a, b in zip(scores(remote), scores(local), strict=True):
        assert a == pytest.approx(b, abs=1e-3)
    assert local_rows


# ------------------------------------------------------------------------------------------- the real command
@pytest.mark.slow
@pytest.mark.subprocess
def test_kunlun_serve_finishes_requests_in_flight_on_sigterm_and_refuses_new_ones(trained_run, tmp_path):
    pytest.importorskip("fastapi")

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kunlunbaize.cli", "serve", "--checkpoint", str(trained_run),
                             "--port", str(port), "--log-level", "warning", "--no-compile"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        banner = proc.stdout.readline()
        assert f"127.0.0.1:{port}/v1" in banner, banner
        children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert children  # the engine's process (the default on CPU)
        url = f"http://127.0.0.1:{port}"
        model = json.loads(_http("GET", f"{url}/v1/models")[1])["data"][0]["id"]
        assert model == trained_run.name
        body = {"model": model, "prompt": "x", "max_tokens": 55, "temperature": 0, "stream": True}
        lines = []
        with _open_stream(f"{url}/v1/completions", body) as r:
            for raw in r:
                line = raw.decode().strip()
                if line and not lines:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                if line:
                    lines.append(line)
        data = [json.loads(x.removeprefix("data: ")) for x in lines if x.startswith("data: {")]
        assert lines[-1] == "data: [DONE]" and data[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(60) == 0
        with pytest.raises(OSError):  # no longer listening
            _http("GET", f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "refusing new ones" in proc.stdout.read()
    assert _all_gone(children)  # no orphan engine (nor multiprocessing's resource tracker) left behind


def test_serve_without_the_extra_or_with_a_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    from .test_cli_errors import run_main

    code, _, err = run_main(capsys, "serve", "--checkpoint", str(tmp_path / "missing"))
    assert code == 1 and "kunlun serve:" in err and "missing" in err
