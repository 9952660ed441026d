"""User-facing errors: one clear line, no traceback (the CLI prints them as `error: ...`)."""


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""
