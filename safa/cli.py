"""The ``safa`` command line: ``safa <subcommand> ...`` (``python -m safa`` works too).

Subcommands live in :mod:`safa.commands` (one module each, exposing ``add_parser``);
``safa generate`` is :mod:`safa.commands.generate`. User errors (bad arguments, a missing
model directory, an unsupported pipeline, an impossible length, an unwritable output) are
reported as one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys
import threading
from typing import List, Optional

__all__ = ["CLIError", "Terminated", "build_parser", "main", "one_line"]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, ``timeout``, torchrun stopping a rank): unwinds like Ctrl-C, so
    that half-written temporary files are removed, and exits 143."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand module of :mod:`safa.commands` registered."""
    from . import __version__, commands
    parser = argparse.ArgumentParser(prog="safa", description="Training-free long-form generation with "
                                     "diffusion models by Latent Swap Joint Diffusion (SaFa).")
    parser.add_argument("--version", action="version", version=f"safa {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
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


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, whatever its formatting (the CLI's error lines)."""
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
