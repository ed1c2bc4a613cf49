"""Errors a user can cause, and how the command-line entry points report them.

Every mistake a person can make (a config typo, a missing file, a malformed annotation, a
damaged or mismatched checkpoint) raises a `UserError` subclass whose message names the file,
key or field. `run_cli` prints it as `error: ...` and exits with status 2; a traceback is shown
only with `RSVL_DEBUG=1`. Programming errors keep their tracebacks.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

USAGE_STATUS = 2


class UserError(Exception):
    """Something the user can fix; the message says what and where."""


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Runs an entry point's `main`, turning user errors into one `error:` line and status 2."""
    try:
        return main(argv)
    except (UserError, FileNotFoundError, NotADirectoryError) as e:
        if os.environ.get("RSVL_DEBUG"):
            raise
        message = str(e).strip() or type(e).__name__
        first, _, details = message.partition("\n")
        print(f"error: {first}", file=sys.stderr)
        if details:  # e.g. the per-key list of a checkpoint mismatch
            print(details, file=sys.stderr)
        return USAGE_STATUS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
