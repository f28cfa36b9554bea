"""The one exception type for mistakes the user can fix (exit code 2)."""


class UserError(Exception):
    """A bad recipe, flag or data file: the message names the key, file or row and the fix."""
