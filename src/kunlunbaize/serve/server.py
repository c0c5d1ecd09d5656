"""The HTTP side of ``kunlun serve``: OpenAI's ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``,
plus ``/health`` and Prometheus ``/metrics``, on FastAPI.

Each request becomes one engine sequence per prompt and choice (``n``); their events come back from the engine's
thread through an asyncio queue. Streams are server-sent events as OpenAI sends them: ``data: {json}`` chunks with
one ``id``, the role in the first chat delta, a last chunk per choice with ``finish_reason``, an optional usage chunk,
then ``data: [DONE]``. A client that goes away cancels its sequences.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..infer.sampling import SamplingParams
from .engine import Delta, Engine, EngineClosed, Finished, Params, QueueFull, Sequence, TokenLogprob
from .model import END_OF_TURN, ServedModel
from .process import EngineDied, EngineProcess, Handle
from .protocol import APIError, ChatRequest, CompletionRequest, validation_error


@dataclass
class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    engine: Engine | EngineProcess
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("kunlun_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("kunlun_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("kunlun_generation_tokens", "Tokens generated", registry=r)
        self.latency = Histogram("kunlun_request_latency_seconds", "Time from request to its last byte",
                                 ["endpoint"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("kunlun_time_to_first_token_seconds", "Time from request to its first token",
                              registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        queue = Gauge("kunlun_queue_depth", "Sequences waiting to be admitted", registry=r)
        queue.set_function(lambda: self.engine.queue_depth)
        running = Gauge("kunlun_running_sequences", "Sequences in the running batch", registry=r)
        running.set_function(lambda: self.engine.running)


class Draining:
    """Whether the server refuses new requests (SIGTERM received)."""

    def __init__(self) -> None:
        self.on = False


def create_app(served: ServedModel, engine: Engine | EngineProcess, request_timeout: float | None = None,
               draining: Draining | None = None) -> FastAPI:
    """The FastAPI app serving ``served`` through ``engine`` (in this process or its own); the caller owns both
    (and shuts the engine down)."""
    app = FastAPI(title="kunlun serve", docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    draining = draining or Draining()
    app.state.served, app.state.engine, app.state.metrics, app.state.draining = served, engine, metrics, draining
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(list(e.errors())))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        return await api_error(request, APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    def open_for_requests() -> None:  # a dependency of every /v1 route (a middleware would wrap every stream)
        if draining.on:
            raise APIError(503, "the server is shutting down", "service_unavailable", code="shutting_down")

    v1 = {"dependencies": [Depends(open_for_requests)]}

    @app.get("/health")
    async def health() -> JSONResponse:
        died = getattr(engine, "died", None)
        if died is not None:
            return JSONResponse({"status": "engine died", "error": died}, status_code=503)
        if draining.on:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", **v1)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(served, created)]}

    @app.get("/v1/models/{name:path}", **v1)
    async def model(name: str) -> dict[str, Any]:
        _check_model(served, name)
        return _model_card(served, created)

    @app.post("/v1/completions", **v1)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_model(served, body.model)
        prompts = [_prompt_ids(served, p, i, len(body.prompts())) for i, p in enumerate(body.prompts())]
        budget = body.max_tokens
        return await _serve(request, "/v1/completions", engine, served, metrics, body, prompts, budget,
                            stop_ids=frozenset(x for x in (served.eos_id,) if x is not None),
                            logprobs=body.logprobs, echo=body.echo, chat=False, timeout=request_timeout)

    @app.post("/v1/chat/completions", **v1)
    async def chat(body: ChatRequest, request: Request) -> Response:
        _check_model(served, body.model)
        if served.render_chat is None:
            raise APIError(400, f"model {served.name!r} has no chat template: use /v1/completions, or serve a "
                                "post-trained model (kunlun posttrain) or pass --chat-template", param="messages",
                           code="no_chat_template")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            text = served.render_chat(messages)
        except Exception as e:  # the template refused the conversation (jinja's raise_exception, a bad role, …)
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        prompt = served.encode(text)
        if served.end_id is None:  # the vocabulary has no end-of-turn token: stop at its text
            body.stop = [*(body.stop or []), END_OF_TURN]
        top = body.top_logprobs or 0
        return await _serve(request, "/v1/chat/completions", engine, served, metrics, body, [prompt], body.budget(),
                            stop_ids=frozenset(x for x in (served.eos_id, served.end_id) if x is not None),
                            logprobs=top if body.logprobs else None, echo=False, chat=True,
                            timeout=request_timeout)

    return app


# ------------------------------------------------------------------------------------------------------ requests
def _model_card(served: ServedModel, created: int) -> dict[str, Any]:
    return {"id": served.name, "object": "model", "created": created, "owned_by": "kunlunbaize",
            "max_model_len": served.context}


def _check_model(served: ServedModel, name: str) -> None:
    if name != served.name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served.name!r}", param="model",
                       code="model_not_found")


def _prompt_ids(served: ServedModel, prompt: str | list[int], index: int, count: int) -> list[int]:
    where = "prompt" if count == 1 else f"prompt[{index}]"
    if isinstance(prompt, str):
        return served.encode(prompt)
    if not prompt:
        raise APIError(400, f"{where} is an empty list of token ids", param="prompt")
    try:
        served.check_ids(prompt)
    except ValueError as e:
        raise APIError(400, f"{where}: {e}", param="prompt") from None
    return prompt


def _params(body: CompletionRequest | ChatRequest, prompt: list[int], budget: int | None, context: int,
            stop_ids: frozenset[int], logprobs: int | None, echo: bool, seed: int | None,
            timeout: float | None) -> Params:
    room = context - len(prompt)
    if room < 1 if budget != 0 else room < 0:
        raise APIError(400, f"the prompt has {len(prompt)} tokens, but the model's context is {context} tokens; "
                            "shorten it", param="prompt" if isinstance(body, CompletionRequest) else "messages",
                       code="context_length_exceeded")
    if budget is None:
        budget = room
    elif budget > room:
        raise APIError(400, f"this model's context is {context} tokens: the prompt takes {len(prompt)} and "
                            f"{budget} more were asked for; ask for at most {room}", param="max_tokens",
                       code="context_length_exceeded")
    sampling = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
    return Params(max_tokens=budget, sampling=sampling, seed=seed, stop=tuple(body.stop or ()), stop_ids=stop_ids,
                  logprobs=logprobs, prompt_logprobs=logprobs if echo else None, timeout=timeout)


@dataclass
class _Choice:
    index: int
    prompt: list[int]
    seq: Sequence | Handle | None = None
    finished: Finished | None = None
    offset: int = 0  # characters of text sent so far (for text_offset)
    opened: bool = False  # its first chunk was sent


async def _serve(request: Request, endpoint: str, engine: Engine | EngineProcess, served: ServedModel, metrics: Metrics,
                 body: CompletionRequest | ChatRequest, prompts: list[list[int]], budget: int | None,
                 stop_ids: frozenset[int], logprobs: int | None, echo: bool, chat: bool,
                 timeout: float | None) -> Response:
    """Submit every (prompt, choice) to the engine, then answer as one JSON body or as a stream."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Delta | Finished]] = asyncio.Queue()
    choices = [_Choice(i * body.n + k, p) for i, p in enumerate(prompts) for k in range(body.n)]
    params = [_params(body, c.prompt, budget, served.context, stop_ids, logprobs, echo,
                      None if body.seed is None else body.seed + c.index, timeout) for c in choices]
    try:
        for c, p in zip(choices, params, strict=True):
            c.seq = engine.submit(c.prompt, p, lambda ev, i=c.index: loop.call_soon_threadsafe(queue.put_nowait,
                                                                                               (i, ev)))
    except (QueueFull, EngineClosed, ValueError) as e:
        for c in choices:
            if c.seq is not None:
                engine.cancel(c.seq)
        if isinstance(e, QueueFull):
            raise APIError(429, f"the server is busy ({e}); retry later", "rate_limit_error",
                           code="queue_full") from None
        if isinstance(e, EngineDied):
            raise APIError(503, f"the server cannot generate: {e}", "service_unavailable",
                           code="engine_died") from None
        if isinstance(e, EngineClosed):
            raise APIError(503, "the server is shutting down", "service_unavailable", code="shutting_down") from None
        raise APIError(400, str(e), param="messages" if chat else "prompt") from None
    metrics.prompt_tokens.inc(sum(len(c.prompt) for c in choices))
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    answer = _Answer(ident, int(time.time()), served, body, choices, chat, echo, started, metrics, timeout)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(answer, queue, engine, endpoint, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        await _wait(request, queue, answer)
    finally:
        for c in choices:
            if c.finished is None and c.seq is not None:
                engine.cancel(c.seq)
    metrics.requests.labels(endpoint, "200").inc()
    metrics.latency.labels(endpoint).observe(time.monotonic() - started)
    return JSONResponse(answer.whole())


async def _wait(request: Request, queue: asyncio.Queue, answer: _Answer) -> None:
    """Wait for every choice to finish; a client that disconnects meanwhile cancels them (the caller does)."""

    async def disconnect() -> None:  # the server's next message after the body is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnect())
    try:
        left = len(answer.choices)
        while left:
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                raise APIError(499, "client disconnected", "client_closed_request")
            index, event = get.result()
            if isinstance(event, Finished):
                answer.finish(index, event)
                left -= 1
            else:
                answer.first_token()
    finally:
        watcher.cancel()


async def _stream(answer: _Answer, queue: asyncio.Queue, engine: Engine | EngineProcess, endpoint: str,
                  include_usage: bool) -> AsyncIterator[str]:
    try:
        if answer.chat:  # the role comes first, before any token
            for index in answer.choices:
                yield _sse(answer.chat_role(index), include_usage)
        left = len(answer.choices)
        while left:
            index, event = await queue.get()
            if not answer.choices[index].opened:  # with echo: the prompt, once it has been read
                first = answer.opening(index, event.prompt_logprobs)
                if first is not None:
                    yield _sse(first, include_usage)
            if isinstance(event, Delta):
                answer.first_token()
                chunk = answer.delta(index, event)
                if chunk is not None:
                    yield _sse(chunk, include_usage)
                continue
            left -= 1
            answer.finish(index, event)
            if event.reason not in ("stop", "length"):
                yield _sse(answer.failure(event).body(), False)
                continue
            yield _sse(answer.closing(index), include_usage)
        if include_usage:
            yield _sse({**answer.chunk_base(), "choices": [], "usage": answer.usage()}, False)
        yield "data: [DONE]\n\n"
        answer.metrics.requests.labels(endpoint, "200").inc()
        answer.metrics.latency.labels(endpoint).observe(time.monotonic() - answer.started)
    finally:  # the client went away (or the stream ended): nothing of it keeps running
        for c in answer.choices.values():
            if c.finished is None and c.seq is not None:
                engine.cancel(c.seq)


def _sse(payload: dict[str, Any], include_usage: bool) -> str:
    if include_usage and "usage" not in payload:
        payload = {**payload, "usage": None}
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------------------ answers
class _Answer:
    """Builds the JSON of one request's answer, whole or as stream chunks."""

    def __init__(self, ident: str, created: int, served: ServedModel, body: CompletionRequest | ChatRequest,
                 choices: list[_Choice], chat: bool, echo: bool, started: float, metrics: Metrics,
                 timeout: float | None) -> None:
        self.ident, self.created, self.served, self.body, self.timeout = ident, created, served, body, timeout
        self.choices = {c.index: c for c in choices}
        self.chat, self.echo, self.started, self.metrics = chat, echo, started, metrics
        self._first = False

    def first_token(self) -> None:
        if not self._first:
            self._first = True
            self.metrics.ttft.observe(time.monotonic() - self.started)

    def finish(self, index: int, event: Finished) -> None:
        self.choices[index].finished = event
        self.first_token()
        self.metrics.generation_tokens.inc(len(event.tokens))

    def failure(self, event: Finished) -> APIError:
        if event.reason == "timeout":
            return APIError(504, f"the request took longer than its {self.timeout:g} s time limit", "timeout",
                            code="timeout")
        if event.reason == "cancelled":
            return APIError(499, "the request was cancelled", "client_closed_request")
        return APIError(500, f"generation failed: {event.error}", "server_error")

    def usage(self) -> dict[str, int]:
        prompt = sum(len(c.prompt) for c in self.choices.values())
        completion = sum(len(c.finished.tokens) for c in self.choices.values() if c.finished is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # --------------------------------------------------------------------------------------------- whole answer
    def whole(self) -> dict[str, Any]:
        failed = next((c.finished for c in self.choices.values()
                       if c.finished is not None and c.finished.reason not in ("stop", "length")), None)
        if failed is not None:
            raise self.failure(failed)
        out = []
        for index in sorted(self.choices):
            c = self.choices[index]
            f = c.finished
            assert f is not None
            if self.chat:
                out.append({"index": index, "message": {"role": "assistant", "content": f.text},
                            "logprobs": self._chat_logprobs(f.logprobs), "finish_reason": f.reason})
                continue
            prefix = self.served.decode(c.prompt) if self.echo else ""
            entries = ([*(f.prompt_logprobs or []), *(f.logprobs or [])] if self.echo and f.logprobs is not None
                       else f.logprobs)
            out.append({"index": index, "text": prefix + f.text,
                        "logprobs": self._completion_logprobs(entries, c.prompt, 0), "finish_reason": f.reason})
        obj = "chat.completion" if self.chat else "text_completion"
        return {"id": self.ident, "object": obj, "created": self.created, "model": self.served.name,
                "choices": out, "usage": self.usage()}

    # -------------------------------------------------------------------------------------------------- chunks
    def chunk_base(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.ident, "object": obj, "created": self.created, "model": self.served.name}

    def _chunk(self, index: int, text: str | None, logprobs: Any, finish: str | None,
               role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None and not role:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {**self.chunk_base(), "choices": [choice]}

    def chat_role(self, index: int) -> dict[str, Any]:
        """A chat choice's first chunk: the role, before any token."""
        self.choices[index].opened = True
        return self._chunk(index, None, None, None, role=True)

    def opening(self, index: int, prompt_logprobs: list[TokenLogprob | None] | None) -> dict[str, Any] | None:
        """A completion choice's first chunk: the prompt itself with echo, else None."""
        c = self.choices[index]
        c.opened = True
        if not self.echo:
            return None
        text = self.served.decode(c.prompt)
        c.offset = len(text)
        return self._chunk(index, text, self._completion_logprobs(prompt_logprobs, c.prompt, 0), None)

    def delta(self, index: int, event: Delta) -> dict[str, Any] | None:
        c = self.choices[index]
        if not event.text and not event.logprobs:
            return None
        if self.chat:
            logprobs = self._chat_logprobs(event.logprobs) if event.logprobs is not None else None
        else:
            logprobs = self._completion_logprobs(event.logprobs, [], c.offset)
        c.offset += len(event.text)
        return self._chunk(index, event.text, logprobs, None)

    def closing(self, index: int) -> dict[str, Any]:
        f = self.choices[index].finished
        assert f is not None
        return self._chunk(index, "" if not self.chat else None, None, f.reason)

    # ------------------------------------------------------------------------------------------ log-probabilities
    def _token(self, token: int) -> str:
        return self.served.decode([token])

    def _completion_logprobs(self, entries: list[TokenLogprob | None] | None, prompt: list[int],
                             offset: int) -> dict[str, Any] | None:
        """OpenAI's legacy completions format: tokens, token_logprobs, top_logprobs, text_offset. ``prompt`` names
        the tokens of entries that are None (the first prompt token: nothing predicts it)."""
        if entries is None:
            return None
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for i, e in enumerate(entries):
            if e is None:  # the first prompt token: nothing predicts it
                token = self._token(prompt[i]) if i < len(prompt) else ""
                tokens.append(token)
                values.append(None)
                tops.append(None)
            else:
                token = self._token(e.token)
                tokens.append(token)
                values.append(e.logprob)
                top = {self._token(t): lp for t, lp in e.top}
                top.setdefault(token, e.logprob)
                tops.append(top)
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """The chat format: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``."""
        if entries is None:
            return None

        def item(token: int, logprob: float) -> dict[str, Any]:
            text = self._token(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}
