"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A problem with the user's input or environment; the CLI prints it in one line and exits 2."""
