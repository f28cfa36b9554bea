"""Progress of a long loop: a live bar in a terminal, and elsewhere (a log file, CI, `nohup`) one line every
10 seconds, so a run of many minutes is never silent."""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console

from qlora import distributed

LOG_EVERY = 10.0  # seconds between lines when stderr is not a terminal
# train's and generate's messages. No hard wraps: a path in a message stays one greppable line; with several ranks,
# rank 0 speaks for all
console = Console(stderr=True, soft_wrap=True, quiet=not distributed.is_main())


def duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 1 h 02 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class LineProgress:
    """`what: done/total (pct) · elapsed · ETA` lines, at most one per LOG_EVERY seconds and one at the end."""

    def __init__(self, console, what: str, total: int, completed: int):
        self.console, self.what, self.total = console, what, total
        self.start_done = self.done = completed
        self.started = self.printed = time.monotonic()

    def advance(self, count: int = 1) -> None:
        self.done += count
        if time.monotonic() - self.printed >= LOG_EVERY or self.done >= self.total:
            self.line()

    def line(self) -> None:
        now = time.monotonic()
        elapsed, fresh = now - self.started, self.done - self.start_done
        parts = [f"{self.what}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%)",
                 f"{duration(elapsed)} elapsed"]
        if 0 < fresh and self.done < self.total:
            parts.append(f"ETA {duration(elapsed / fresh * (self.total - self.done))}")
        self.console.print(" · ".join(parts), highlight=False)
        self.printed = now


class BarProgress:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, count: int = 1) -> None:
        self.progress.advance(self.task, count)


@contextmanager
def progress(console, what: str, total: int, completed: int = 0) -> Iterator[LineProgress | BarProgress]:
    """Yield an object whose advance(n) counts n of `total` items done."""
    if not console.is_terminal:
        yield LineProgress(console, what, total, completed)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        yield BarProgress(bar, bar.add_task(what, total=total, completed=completed))


def run_tool(argv: list[str], console, what: str) -> subprocess.CompletedProcess:
    """Run a silent external tool (pip, llama.cpp's converter) to the end, its output captured for the error
    message, saying every LOG_EVERY seconds that it still works and what it printed last."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        started = time.monotonic()
        while True:
            try:
                process.wait(timeout=LOG_EVERY)
                break
            except subprocess.TimeoutExpired:
                err.seek(0)
                last = [line.strip() for line in err.read().replace("\r", "\n").splitlines() if line.strip()]
                console.print(f"{what}: {duration(time.monotonic() - started)} elapsed"
                              + (f" · {last[-1][:100]}" if last else ""), highlight=False)
            except BaseException:  # Ctrl-C or a signal: the tool does not outlive the command
                process.kill()
                process.wait()
                raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, process.returncode, out.read(), err.read())


@contextmanager
def heartbeat(console, what: str) -> Iterator[None]:
    """Off a terminal, `what: N s elapsed` every LOG_EVERY seconds while a library call without progress of its own
    runs (loading or saving a model: its tqdm bars show in a terminal only)."""
    if console.is_terminal:
        yield
        return
    stop, started = threading.Event(), time.monotonic()

    def beat():
        while not stop.wait(LOG_EVERY):
            console.print(f"{what}: {duration(time.monotonic() - started)} elapsed", highlight=False)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
