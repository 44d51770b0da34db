"""The one exception type for mistakes a user can fix, and how command lines report it."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input or environment; the CLI prints it in one line and exits 2."""


def _say(line: str) -> None:
    """Print ``line`` to stderr; a closed or broken stderr is ignored (the exit code remains)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _describe(e: BaseException) -> str:
    """``str(e)``, or its type's name when even that fails."""
    try:
        return str(e)
    except Exception:
        return type(e).__name__


def report_errors(command: Callable[[], object]) -> int:
    """Run a command-line entry point: a UserError, or an OSError from the environment (a
    permission, a read-only or full disk), becomes one ``error:`` line and exit code 2, Ctrl-C
    exit code 130; otherwise the exit code the command returns (0 unless an int). Reporting
    never raises; other exceptions are bugs and keep their traceback."""
    try:
        code = command()
        return code if isinstance(code, int) else 0
    except UserError as e:
        _say(f"error: {_describe(e)}")
        return 2
    except OSError as e:
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        _say(f"error: {e.strerror or _describe(e)}{where}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted; rerun the same command to resume")
        return 130
