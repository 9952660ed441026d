"""The project's error base and its user-facing errors: one clear line, no traceback (the CLIs print
them as `error: ...`). Torch-free: the control plane imports it before anything heavy."""

import sys


class ProjectError(Exception):
    """The base of every error this project raises on purpose (deepreduce, secure, server, client)."""


class UserError(ProjectError):
    """A mistake the user can fix, or a condition they must act on; the message names the problem and
    the fix, and is printed as one `error: ...` line with exit status 2."""


def exit_status(command, *args) -> int:
    """Run a command; a UserError becomes one `error: ...` line on stderr and exit status 2."""
    try:
        command(*args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
