"""The ``safa`` command line: ``safa <subcommand> ...`` (``python -m safa`` works too).

Subcommands live in :mod:`safa.commands` (one module each, exposing ``add_parser``);
``safa generate`` is :mod:`safa.commands.generate`. User errors (bad arguments, a missing
model directory, an unsupported pipeline, an impossible length, an unwritable output) are
reported as one line on stderr with exit code 2, argparse's own included (a bad value, a
mistyped flag: the line names the subcommand whose ``--help`` lists its flags). Building the
parser imports no torch, so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import pkgutil
import signal
import sys
import threading
from typing import Dict, List, NoReturn, Optional

from .errors import CLIError, Terminated, one_line

__all__ = ["CLIError", "Terminated", "UsageError", "OneLineParser", "build_parser", "main", "one_line"]


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


class UsageError(Exception):
    """argparse's error (a bad value, an unknown flag), as the one line :func:`main` prints (exit code 2)."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line naming where the help is, not the usage."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.commands: Dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)")


def build_parser() -> OneLineParser:
    """The top-level parser with every subcommand module of :mod:`safa.commands` registered."""
    from . import __version__, commands
    parser = OneLineParser(prog="safa", description="Training-free long-form generation with "
                           "diffusion models by Latent Swap Joint Diffusion (SaFa).")
    parser.add_argument("--version", action="version", version=f"safa {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "add_parser"):
            sub = module.add_parser(subparsers)
            parser.commands[sub.prog.split()[-1]] = sub
    return parser


def _parse(parser: OneLineParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """Parse ``argv``; a flag the subcommand does not know is reported by the subcommand (with a guess)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser.commands.get(getattr(args, "command", None) or "", parser)
        known = [s for action in command._actions for s in action.option_strings]
        guess = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
        command.error(f"unrecognized arguments: {' '.join(unknown)}"
                      + (f" (did you mean {guess[0]}?)" if guess else ""))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    # Under torchrun every rank runs this; rank 0 reports the errors every rank shares (the
    # same flags) and, as PeerFailure, those of the other ranks (safa.distributed).
    speaks = os.environ.get("RANK", "0") == "0"
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError) as exc:
        if speaks:
            print(f"safa {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        if speaks:
            print(f"safa {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except RuntimeError as exc:
        from .distributed import CommunicationError, PeerFailure  # loaded already if raised
        if not isinstance(exc, (PeerFailure, CommunicationError)):
            raise
        if speaks:
            print(f"safa {args.command}: error: {one_line(exc)}", file=sys.stderr)
        user_error = isinstance(exc, PeerFailure) and all(kind in ("CLIError", "ValueError")
                                                          for _, kind, _ in exc.failures)
        return 2 if user_error else 1
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
