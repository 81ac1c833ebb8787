"""The errors a user sees, and how they are printed: one line each.

Shared by the command line (:mod:`safa.cli`), the demo and the distributed layer (which
sends a failing rank's error to the others as one line), so none of them imports another
for it. Nothing here imports torch.
"""
from __future__ import annotations

__all__ = ["CLIError", "Terminated", "one_line", "MAX_MESSAGE_CHARS"]

# An error line longer than this is cut: a 25 000-character prompt quoted in an error would
# bury the reason (the start of the message says what is wrong).
MAX_MESSAGE_CHARS = 500


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, ``timeout``, torchrun stopping a rank): unwinds like Ctrl-C, so
    that half-written temporary files are removed, and exits 143."""


def one_line(exc: BaseException, limit: int = MAX_MESSAGE_CHARS) -> str:
    """An exception's message on one line, whatever its formatting, cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters in all)"
