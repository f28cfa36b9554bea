"""Long loops report progress off a terminal too: a log file or CI gets a line every 10 seconds and one at the end."""

import io

from rich.console import Console

from qlora import progress


def test_off_a_terminal_a_line_every_10_seconds_and_at_the_end(monkeypatch):
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=300)
    clock = iter([0.0, 3.0, 9.0, 11.0, 12.0, 15.0, 3725.0, 3725.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress.progress(console, "evaluating", 6, completed=1) as bar:
        for _ in range(5):
            bar.advance()
    assert out.getvalue().splitlines() == [
        "evaluating: 4/6 (67%) · 12 s elapsed · ETA 8 s",  # 3 done in 12 s, 2 to go
        "evaluating: 6/6 (100%) · 1 h 02 min elapsed",
    ]


def test_durations_read_as_people_write_them():
    assert [progress.duration(s) for s in (0.4, 59, 60, 245, 3599, 3600, 7325)] == [
        "0 s", "59 s", "1 min 00 s", "4 min 05 s", "59 min 59 s", "1 h 00 min", "2 h 02 min"]


def test_a_silent_tool_is_reported_while_it_works_and_its_output_kept(monkeypatch):
    import sys

    monkeypatch.setattr(progress, "LOG_EVERY", 0.3)
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=300)
    script = ("import sys, time\nprint('INFO: writing blk.0', file=sys.stderr, flush=True)\ntime.sleep(1.2)\n"
              "print('done')\nprint('ERROR: last words', file=sys.stderr)\nsys.exit(3)")
    result = progress.run_tool([sys.executable, "-c", script], console, "converting")
    assert result.returncode == 3 and result.stdout == "done\n" and result.stderr.endswith("ERROR: last words\n")
    lines = out.getvalue().splitlines()
    assert lines and all(line.startswith("converting: ") for line in lines), lines
    assert any(line.endswith(" elapsed · INFO: writing blk.0") for line in lines), lines  # what the tool said last


def test_a_long_library_call_off_a_terminal_says_it_still_works(monkeypatch):
    import time

    monkeypatch.setattr(progress, "LOG_EVERY", 0.2)
    out = io.StringIO()
    with progress.heartbeat(Console(file=out, force_terminal=False, width=300), "loading the base"):
        time.sleep(0.7)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("loading the base: ") and line.endswith(" s elapsed")
                                   for line in lines), lines
    quiet = io.StringIO()
    with progress.heartbeat(Console(file=quiet, force_terminal=True), "loading the base"):
        time.sleep(0.3)
    assert quiet.getvalue() == ""  # in a terminal the libraries' own bars show
