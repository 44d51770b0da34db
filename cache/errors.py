"""The one exception type for mistakes a user can fix, and how command lines report it."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input or environment; the CLI prints it in one line and exits 2."""


def report_errors(command: Callable[[], object]) -> int:
    """Run a command-line entry point: a UserError becomes one ``error:`` line and exit code 2,
    Ctrl-C exit code 130; otherwise the exit code the command returns (0 unless an int)."""
    try:
        code = command()
        return code if isinstance(code, int) else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
