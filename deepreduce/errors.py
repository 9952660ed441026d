"""User-facing errors: one clear line, no traceback (the CLI prints them as `error: ...`)."""

import sys


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""


def exit_status(command, *args) -> int:
    """Run a command; a UserError becomes one `error: ...` line on stderr and exit status 2."""
    try:
        command(*args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
