"""The exceptions the CLI turns into exit codes: 2 for user mistakes, 1 for failed runs, 128 + N after signal N."""


class UserError(Exception):
    """A bad recipe, flag or data file: the message names the key, file or row and the fix."""


class RunFailed(Exception):
    """A run that cannot go on (non-finite loss, disk full): one line saying why and what is kept (exit 1)."""


class RunInterrupted(Exception):
    """SIGINT or SIGTERM stopped a run after its checkpoint was written (exit 130 or 143)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def one_line(exc: Exception) -> str:
    """An error as one line (library messages we quote can span several)."""
    return " ".join(str(exc).split())
