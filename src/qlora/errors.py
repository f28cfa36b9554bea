"""The exceptions the CLI turns into exit codes: 2 for user mistakes, 1 for failed runs, 128 + N after signal N."""

import errno
import signal
import threading
from contextlib import contextmanager


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


class Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the command is (see `interruptible`)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# a write the machine refused: a full disk or quota, a read-only filesystem, a file too large
WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a device (torch.OutOfMemoryError) or host (MemoryError, the CPU allocator's RuntimeError)
    running out of memory; told without importing torch."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


@contextmanager
def interruptible(kept: str, lower: str = "a machine with more memory"):
    """How a command stops early: SIGINT and SIGTERM stop it where it is (exit 130 / 143); a write the machine
    refuses (full disk, read-only), or memory running out (say what to `lower`), fails it (exit 1); each with one
    line saying what is `kept`. Every write is atomic or appends whole lines, so the same command then resumes or
    restarts.

    The handlers are installed explicitly: a job a non-interactive shell starts in the background inherits SIGINT
    as ignored."""
    def handle(signum, frame):
        raise Signalled(signum)

    main = threading.current_thread() is threading.main_thread()  # only the main thread may handle signals
    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    except Signalled as exc:
        raise RunInterrupted(f"{signal.Signals(exc.signum).name}: {kept}", exc.signum) from None
    except OSError as exc:
        if exc.errno not in WRITE_FAILURES:
            raise
        raise RunFailed(f"cannot write {exc.filename or 'the output'}: {exc.strerror}; {kept}") from None
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        raise RunFailed(f"out of memory: {lower}; {kept}") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
