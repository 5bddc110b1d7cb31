"""The error boundary shared by `hcsc-shards`, `hcsc-train` and `hcsc-eval`.

A command ends in one of three ways a user can act on:
  - success: its exit code (0);
  - a mistake of the user's (a bad path, flag, config key or input): one line on stderr naming the
    input and what to do, exit 2;
  - an unexpected failure: one line with the first line of the error and the log file that holds
    the full traceback, exit 1;
  - Ctrl-C (SIGINT): one line saying what was left behind, exit 130.
The traceback always goes to a log file, never to the console, unless ``HCSC_DEBUG=1`` or the
command's ``--debug`` flag asks for it there too.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from core.errors import first_line

DEBUG_ENV = "HCSC_DEBUG"
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A mistake the user can fix; the message is one line naming the input and what to do."""


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def default_log_file(prog: str) -> Path:
    """Where a command without its own output folder keeps tracebacks (one file per process)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / "hcsc-logs" / f"{prog}-{stamp}-{os.getpid()}.log"


def _write_traceback(log_file: Path, prog: str) -> Path | None:
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("a") as f:
            f.write(f"{datetime.datetime.now().isoformat()} {prog} failed:\n{traceback.format_exc()}\n")
        return log_file
    except OSError:
        return None


def run_cli(prog: str, body: Callable[[], int], *, user_errors: tuple[type[BaseException], ...] = (),
            log_file: Callable[[], Path | None] | None = None, debug: bool = False,
            interrupted: str = "nothing was left half-written") -> int:
    """Run `body` inside the error boundary; returns the process exit code.

    Args:
        prog: the command as the user typed it (e.g. "hcsc-eval knn"), first word of every line.
        body: the command; returns its exit code.
        user_errors: exception types whose message is a complete one-line explanation.
        log_file: where the traceback goes (called after the failure, so a command can name the
            log of the run folder it created); None or a None result: a file under the system's
            temporary folder.
        debug: also print the traceback on the console (``--debug``; ``HCSC_DEBUG=1`` does too).
        interrupted: what Ctrl-C leaves behind, for the one line printed then.
    """
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, *user_errors) as err:  # type: ignore[misc]  # a tuple of classes is fine here
        if debug_requested(debug):
            traceback.print_exc()
        print(f"{prog}: error: {first_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as err:
        target = (log_file() if log_file is not None else None) or default_log_file(prog.split()[0])
        written = _write_traceback(target, prog)
        if debug_requested(debug):
            traceback.print_exc()
        where = f"traceback in {written}" if written else "run with HCSC_DEBUG=1 for the traceback"
        print(f"{prog}: failed: {type(err).__name__}: {first_line(err)} ({where})", file=sys.stderr)
        return EXIT_FAILURE
