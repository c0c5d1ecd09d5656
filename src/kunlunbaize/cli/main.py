"""The ``kunlun`` entry point: the parser of every command, and the exit statuses (2 usage, 1 failure, 130 Ctrl-C).

Building the parser imports no torch: each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import NoReturn

from .. import __version__
from . import ablate, curate, demo, export, generate, info, plan, posttrain, prepare, reward, serve, train
from . import eval as eval_
from .args import UsageError
from .output import OutputGuard

MODULES: dict[str, ModuleType] = {"info": info, "plan": plan, "demo": demo, "prepare": prepare, "curate": curate,
                                  "train": train, "generate": generate, "eval": eval_, "ablate": ablate,
                                  "export": export, "posttrain": posttrain, "reward": reward, "serve": serve}
COMMANDS = tuple(MODULES)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``kunlun <cmd>: what is wrong — see `kunlun <cmd> --help```, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} — see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``kunlun`` parser: every command's options (``add_parser`` of each module of :data:`MODULES`)."""
    p = _Parser(prog="kunlun", description="KunlunBaize language model tools")
    p.add_argument("--version", action="version", version=f"kunlun (kunlunbaize) {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in MODULES.values():
        module.add_parser(sub)
    p.commands = sub.choices  # name -> parser, for errors found after parsing
    return p


def _command_of(argv: list[str]) -> str:
    """``kunlun <command>`` for messages, from the raw arguments (they may not be parsed yet)."""
    cmd = next((a for a in argv if not a.startswith("-")), "")
    return f"kunlun {cmd}" if cmd in COMMANDS else "kunlun"


def main(argv: list[str] | None = None) -> None:
    """The ``kunlun`` command. Errors end it with a one-line message and a non-zero status, never a traceback:
    usage errors 2, failures 1, Ctrl-C 130; a closed stdout or stderr stops nothing (see :class:`OutputGuard`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = OutputGuard(sys.stdout), OutputGuard(sys.stderr)
    try:
        _run(argv)
    except KeyboardInterrupt:
        print(f"{_command_of(argv)}: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for guard in (sys.stdout, sys.stderr):
            guard.flush()
        sys.stdout, sys.stderr = saved


def _run(argv: list[str]) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's own parser: `kunlun info: unrecognized arguments: …`
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:  # bare `kunlun`: the help, as a usage error
        parser.print_help()
        raise SystemExit(2)
    try:
        MODULES[args.command].run(args)
    except UsageError as e:  # an argument value found wrong after parsing
        args.command_parser.error(str(e))
