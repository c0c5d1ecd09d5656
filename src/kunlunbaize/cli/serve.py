"""``kunlun serve``: load a checkpoint, start the engine, serve the OpenAI API with uvicorn until SIGTERM/Ctrl-C.

By default (on CPU) the engine runs in a process of its own, so the model does not share the GIL with the HTTP
side; ``--engine thread`` keeps it in a thread of the server's process. When the engine process dies, the server
says why and exits with status 1.

On SIGTERM (or the first Ctrl-C) the server stops listening, answers 503 to new requests on open connections, lets
every request in flight finish, then exits; a second signal exits at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
from typing import Any

from .args import add_prefill_chunk_arg, float_in, int_at_least, new_command, resolve_device

NEEDS = ("fastapi", "uvicorn", "prometheus_client", "transformers")
COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")


def add_parser(sub: Any) -> None:
    """Add ``serve`` to ``sub`` (from ``ArgumentParser.add_subparsers``)."""
    s = new_command(sub, "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)")
    s.add_argument("--checkpoint", default="runs/small", help="run, checkpoint or export folder (default: %(default)s)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    s.add_argument("--port", type=int_at_least(0, 65535), default=8000,
                   help="port (default: %(default)s; 0: any free port, printed at start)")
    s.add_argument("--model-name", default=None, help="the name clients ask for (default: the folder's name)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weights and cache precision (default: %(default)s)")
    s.add_argument("--max-batch", type=int_at_least(1), default=16,
                   help="sequences decoded together at most (default: %(default)s)")
    s.add_argument("--max-queue", type=int_at_least(1), default=256,
                   help="sequences waiting at most; more are refused with 429 (default: %(default)s)")
    s.add_argument("--timeout", type=float_in(0.0), default=600.0,
                   help="seconds a request may take, queueing included; 0: no limit (default: %(default)s)")
    s.add_argument("--speculative", action="store_true",
                   help="decode a lone greedy request with MTP self-speculative rounds (same tokens, faster)")
    s.add_argument("--draft-len", type=int_at_least(1), default=None,
                   help="drafts per speculative round (default: every MTP depth)")
    add_prefill_chunk_arg(s)
    s.add_argument("--no-compile", action="store_true",
                   help="decode the running batch with the eager step, not the static step compiled per batch-size "
                        "bucket (compiling takes a minute or more at start; the tokens are the same)")
    s.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode of the batch step (default: torch.compile's default): max-autotune on a "
                        "CPU picks C++ GEMM kernels per matrix shape (a 1.05-1.56x faster step measured, minutes more "
                        "to start: docs/guide-serve.md); reduce-overhead: CUDA graphs")
    s.add_argument("--slot-buckets", type=int_at_least(1), default=3,
                   help="key lengths the batch step of at least half --max-batch rows is compiled for: the context, "
                        "its half, its quarter ... (a batch of short requests then attends over fewer cache slots; "
                        "each one more is a graph per such bucket to compile at start); 1: every step reads the "
                        "whole context (default: %(default)s)")
    s.add_argument("--prefill-buckets", type=int_at_least(0), default=0,
                   help="prompt lengths (8, 16, 32 ...) a one-row prefill is compiled for: a prompt admitted alone "
                        "is read right-padded through its bucket's compiled forward instead of the eager one (the "
                        "same tokens; a graph per bucket to compile at start; not with --speculative); 0: every "
                        "prompt is prefilled eagerly (default: %(default)s)")
    s.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file (default: the checkpoint's chat_template.jinja, if any)")
    s.add_argument("--engine", choices=("auto", "process", "thread"), default="auto",
                   help="where the engine runs: its own process (the model off the HTTP side's GIL) or a thread of "
                        "the server's (default: %(default)s: a process on CPU, a thread on a GPU)")
    s.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch CPU threads for the model (default on CPU: torch's less one, at least 1, leaving a "
                        "core to the HTTP side and to clients on the same machine)")
    s.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")


def run(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain the requests in flight."""
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"kunlun serve: needs {', '.join(missing)} — pip install 'kunlunbaize[serve]'")
    import torch
    import uvicorn

    from ..checkpoint import CheckpointError
    from ..serve.model import load_served
    from ..serve.server import Draining, create_app

    device = resolve_device(args.device)
    static = compile_options(args)
    threads = args.threads
    if threads is None and device == "cpu":  # measured: 2 cores, 2 model threads ran at 0.61x generate, 1 at 0.87x
        threads = max(1, torch.get_num_threads() - 1)
    died: list[str] = []
    server: Any = None

    def on_death(reason: str) -> None:
        died.append(reason)
        print(f"kunlun serve: {reason}; stopping", file=sys.stderr, flush=True)
        if server is not None:
            server.should_exit = True

    try:
        served = load_served(args.checkpoint, args.model_name, device, getattr(torch, args.dtype),
                             args.chat_template)
        engine = _start_engine(args, served, device, threads, static, on_death)
    except (CheckpointError, ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"kunlun serve: {e}") from None
    draining = Draining()
    app = create_app(served, engine, request_timeout=args.timeout or None, draining=draining)

    class Server(uvicorn.Server):
        """uvicorn's server, which on the first signal also refuses new requests and drains the engine."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not draining.on:
                draining.on = True
                engine.stop_accepting()
                print(f"kunlun serve: {signal.Signals(sig).name}: finishing {engine.running + engine.queue_depth} "
                      "request(s) in flight, refusing new ones", file=sys.stderr, flush=True)
            super().handle_exit(sig, frame)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            for server in getattr(self, "servers", []):
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    print(f"kunlun serve: {served.name} ({served.checkpoint}, context {served.context}) on "
                          f"http://{host}:{port}/v1", flush=True)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=None, lifespan="off")
    server = Server(config)
    # uvicorn raises the signal it caught again once it has shut down; a drained SIGTERM is a clean exit (0)
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        engine.shutdown(timeout=30)
    if died:
        raise SystemExit(1)


def _start_engine(args: argparse.Namespace, served: Any, device: str, threads: int | None, static: Any,
                  on_death: Any) -> Any:
    """The engine: in a process of its own (``--engine process``, the default on CPU) or in a thread of this one."""
    import torch

    from ..serve.engine import Engine
    from ..serve.process import EngineOptions, EngineProcess

    if args.engine == "process" or (args.engine == "auto" and device == "cpu"):
        options = EngineOptions(max_batch=args.max_batch, max_queue=args.max_queue, speculative=args.speculative,
                                draft_len=args.draft_len, prefill_chunk=args.prefill_chunk, threads=threads,
                                static=static)
        torch.set_num_threads(1)  # this process only serves HTTP; the model's threads are the engine's
        return EngineProcess(served.model, served.tokenizer, options, on_death=on_death)
    if threads:
        torch.set_num_threads(threads)
    return Engine(served.model, served.tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                  speculative=args.speculative, draft_len=args.draft_len, prefill_chunk=args.prefill_chunk,
                  static=static)


def compile_options(args: argparse.Namespace) -> Any:
    """The batch step's :class:`~kunlunbaize.infer.static.CompileOptions` (None: the eager step, ``--no-compile``).

    Without ``--compile-mode``: torch.compile's default mode. ``max-autotune`` (a CPU's C++ GEMM kernels) served the
    Llama export 1.05-1.23x faster at concurrency 16 and 1.16-1.56x at 1 on the 2-core benchmark machine
    (docs/reports/BENCHMARKS.md) but took 5-13 minutes to start there, so it is asked for, not the default."""
    from ..infer.static import CompileOptions

    if args.prefill_buckets and (args.no_compile or args.speculative):
        raise SystemExit("kunlun serve: --prefill-buckets needs the compiled step and does not write the MTP keys "
                         "--speculative keeps; leave out --no-compile and --speculative, or --prefill-buckets")
    if args.no_compile:
        if args.compile_mode is not None:
            raise SystemExit("kunlun serve: --compile-mode needs the compiled step; leave out --no-compile")
        return None
    return CompileOptions(mode=args.compile_mode or "default", slot_buckets=args.slot_buckets,
                          fill_buckets=args.prefill_buckets)
