"""A pre-imported Python that runs ``kunlun …`` and ``python -m kunlunbaize… / -c …`` commands in forked children.

Each such command of the docs would otherwise be a fresh interpreter that spends ~7 CPU-s importing torch (and
torch._dynamo) before doing anything. The server imports torch, kunlunbaize and the libraries the commands use
once, starts no thread, and for each command forks a child that *is* that command: its stdin/stdout/stderr are
the caller's file descriptors, its working folder, environment, ``sys.argv`` and ``sys.path[0]`` are those a
fresh ``python -m MODULE …`` / ``python -c CODE`` started there would have, it runs the module as ``__main__``
and ends the way the interpreter ends (exceptions print their traceback and exit 1, ``SystemExit`` gives its
status, atexit handlers run). The caller, a small client in the sandbox's ``.venv/bin``, exits with the child's
status. A command whose environment differs from the server's in anything but the shell's and pytest's own
variables (a variable read at import time might matter), or whose arguments are not of these forms, runs as a
fresh process instead, as does every command when ``KUNLUN_DOCS_FORKSERVER`` is not set.

    python tests/forkserver.py serve SOCKET              # the server: preloads, listens, forks
    python -I -S tests/forkserver.py client PYTHON ARGS… # the client: ARGS as `python ARGS…` would get them
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

SOCKET_VAR = "KUNLUN_DOCS_FORKSERVER"
# what a shell or pytest (the test's phase) sets differently without changing what an import does
IGNORED_VARS = {"PATH", "PWD", "OLDPWD", "SHLVL", "_", "PYTEST_CURRENT_TEST"}
PRELOAD = ("torch", "torch._dynamo", "numpy", "tokenizers", "transformers", "safetensors.torch",
           "kunlunbaize.cli", "kunlunbaize.model", "kunlunbaize.checkpoint", "kunlunbaize.data", "kunlunbaize.infer",
           "kunlunbaize.infer.generator", "kunlunbaize.eval", "kunlunbaize.hf", "kunlunbaize.posttrain")
HEADER = struct.Struct("!Q")


# ------------------------------------------------------------------------------------------------- client


def client(python: str, args: list[str]) -> None:
    """Runs ``python ARGS`` through the server when it can, else as a fresh process; exits with its status."""
    path = os.environ.get(SOCKET_VAR)
    if not path or not _served(args):
        os.execv(python, [python, *args])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        payload = json.dumps({"args": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(s, [HEADER.pack(len(payload)) + payload], [0, 1, 2])
        answer = b""
        while chunk := s.recv(64):
            answer += chunk
    if answer == b"fresh":
        os.execv(python, [python, *args])
    if not answer:
        sys.exit("forkserver: the server closed the connection without a status (see its log)")
    sys.exit(int(answer))


def _served(args: list[str]) -> bool:
    return len(args) >= 2 and (args[0] == "-c" or (args[0] == "-m" and args[1].startswith("kunlunbaize")))


# ------------------------------------------------------------------------------------------------- server


def serve(path: str) -> dict:
    """Preloads, listens on ``path`` and forks a child per request; returns only in a child, with its request."""
    base_env = dict(os.environ)
    for name in PRELOAD:
        __import__(name)
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        sys.exit(f"forkserver: preloading started {threads - 1} thread(s); a fork would copy them half-run")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(16)
    os.rename(path + ".tmp", path)  # the caller waits for the path: it appears once the server is listening
    while True:
        conn, _ = listener.accept()
        _reap()
        if os.fork() == 0:  # the handler: reads the request, forks the command, reports its status
            listener.close()
            request = _handle(conn, base_env)
            if request is not None:
                return request
            os._exit(0)
        conn.close()


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _handle(conn: socket.socket, base_env: dict) -> dict | None:
    """In the handler: the request for the command's child (in that child), or None once its status is sent."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
        more = conn.recv(1 << 16)
        if not more:
            return None
        data += more
    request = json.loads(data[HEADER.size:])
    differs = {k for k in base_env.keys() | request["env"].keys() if base_env.get(k) != request["env"].get(k)}
    if differs - IGNORED_VARS:
        conn.sendall(b"fresh")
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        return request
    for fd in fds:
        os.close(fd)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    conn.sendall(str(status if status >= 0 else 128 - status).encode())
    return None


def run(request: dict) -> None:
    """In the command's child: becomes ``python -m MODULE …`` or ``python -c CODE …`` started in the request's
    folder with its environment."""
    os.chdir(request["cwd"])
    os.environ.clear()  # exactly the caller's: what the preloaded imports set (torch._inductor: its cache folder,
    os.environ.update(request["env"])  # set again on first use) is not what a fresh `kunlun …` has at its start
    if "numpy" in sys.modules:  # a fresh process draws its own seed; `random` reseeds itself after a fork
        sys.modules["numpy"].random.seed()
    option, target, *rest = request["args"]
    if option == "-c":
        import types

        sys.argv, sys.path[0] = ["-c", *rest], ""
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(target, "<string>", "exec"), main.__dict__)
    else:
        import runpy

        sys.argv, sys.path[0] = [target, *rest], request["cwd"]
        runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if sys.argv[1] == "client":
        client(sys.argv[2], sys.argv[3:])
    else:
        run(serve(sys.argv[2]))
