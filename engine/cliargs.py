"""What every ``trifuse`` subcommand shares: argparse value types, the one-line error.

It lives here, below everything that defines a subcommand (``engine``, ``export``, ``bench``,
``trifuse.serve``) and the top-level ``trifuse.cli`` that wires them, so no subcommand imports
the command that holds it.
"""

from __future__ import annotations

import argparse
import math

#: Errors that mean "bad input" (a path, an option, a checkpoint, a missing extra): one line, exit 2.
#: Anything else is a bug and keeps its traceback; TRIFUSE_TRACEBACK=1 shows it for these too.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``trifuse verify: error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(e: BaseException) -> str:
    """An exception's message on one line (parsers and loaders like to wrap theirs)."""
    return " ".join(str(e).split()) or type(e).__name__


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts (batch, seq, ...): an int >= 1, never clamped."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def port(text: str) -> int:
    """An argparse ``type`` for a TCP port, 1..65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse ``type`` for a finite number >= 0 (a wait, a share of a GPU)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value
