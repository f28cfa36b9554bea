"""The fault table. A second writer of any output, while the first is at work, exits 2 at once with one line naming
the first one's PID, and every file stays byte-identical (the first writer: a process holding the output's lock, as
the command holds it; and two real `generate`). SIGINT or SIGTERM stops each writing command started as a
background job (SIGINT inherited as ignored) with exit 130 / 143 and one line saying what is kept, leaving no
temporary or lock, and the same command then finishes the work. A full disk in the middle of each command's write is
exit 1 and one line saying what was kept, again with no temporary or lock left; so is memory running out (a GPU's
torch.OutOfMemoryError, the CPU allocator's refusal) wherever it happens, naming what to lower."""

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import snapshot
from qlora.cli import app
from qlora.files import lock_holder
from qlora.generate import row_line as real_row_line

PROBLEMS = Path(__file__).resolve().parents[1] / "src" / "qlora" / "sample_data" / "eval_problems.jsonl"
PROMPTS = "".join(json.dumps({"instruction": f"Write function number {i}."}) + "\n" for i in range(12))

HOLDER = """
import sys, time
from pathlib import Path
from qlora.files import output_lock
with output_lock(Path(sys.argv[1]), sys.argv[2], sys.argv[3]):
    print("locked", flush=True)
    time.sleep(120)
"""


# (name, the output a first writer holds, argv of the second writer, the command named)
WRITERS = [
    ("generate", "out.jsonl", lambda run, out: ["generate", str(run), "--input-file", "in.jsonl", "--output-file",
                                                str(out)]),
    ("eval", "eval", lambda run, out: ["eval", str(run), "--problems", str(PROBLEMS), "--out", str(out),
                                       "--allow-code-execution"]),
    ("merge", "merged", lambda run, out: ["merge", str(run), "--output", str(out)]),
    ("export", "gguf", lambda run, out: ["export", str(run), "--output", str(out)]),
    ("tiny", "model", lambda run, out: ["tiny", "llama", str(out)]),
]


@pytest.mark.parametrize("command, name, argv", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_second_writer_of_an_output_exits_2_naming_the_first_and_changes_nothing(memorised_run, tmp_path,
                                                                                   monkeypatch, command, name, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text(PROMPTS)
    out = tmp_path / name
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), command, "--output"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before, run_before = snapshot(tmp_path), snapshot(memorised_run)
        result = CliRunner().invoke(app, argv(memorised_run, out))
        assert result.exit_code == 2, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and f"is in use by a running `qlora {command}` (PID {holder.pid})" in lines[0], lines
        assert snapshot(tmp_path) == before and snapshot(memorised_run) == run_before
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(tmp_path / f".{name}.lock") is None  # killed, the holder holds nothing: the output is free


def test_two_generate_on_one_output_file_write_every_row_once(memorised_run, tmp_path):
    """The reported bug, run for real: two `qlora generate` on one --output-file both exited 0 and wrote every row
    twice. The second now exits 2 while the first works, and the first writes each row once."""
    (tmp_path / "in.jsonl").write_text(PROMPTS)
    argv = [sys.executable, "-m", "qlora", "generate", str(memorised_run), "--input-file", "in.jsonl",
            "--output-file", "out.jsonl", "--batch-size", "1", "--max-new-tokens", "24"]
    first = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".out.jsonl.lock"
    while not lock.exists() and first.poll() is None:
        time.sleep(0.01)
    second = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
    assert first.wait() == 0, first.stderr.read()
    # not on a terminal: qlora's own progress lines, and no tqdm bar of the libraries under it
    log = first.stderr.read()
    rows = len(PROMPTS.splitlines())
    assert f"generating: {rows}/{rows} (100%)" in log and "Loading weights" not in log, log
    assert second.returncode == 2, second.stderr
    assert f"in use by a running `qlora generate` (PID {first.pid})" in second.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == [json.loads(line)["instruction"] for line in PROMPTS.splitlines()]
    assert not lock.exists()


def background(argv: list[str], cwd: Path) -> subprocess.Popen:
    """`qlora ARGV` as a job a script starts in the background: it inherits SIGINT as ignored."""
    return subprocess.Popen([sys.executable, "-m", "qlora", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


def at_work(process: subprocess.Popen, lock: Path) -> None:
    """Wait until `process` holds its output's lock: it has checked its inputs and is working."""
    while not lock.exists():
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)


# (command, argv, the output, stderr's promise, whether the same command is run again to finish the work)
SIGNALLED = [
    ("generate", lambda run: ["generate", str(run), "--input-file", "in.jsonl", "--output-file", "out.jsonl",
                              "--batch-size", "1"], "out.jsonl", "in out.jsonl; run the same command to generate the rest", True),
    ("eval", lambda run: ["eval", str(run), "--problems", str(PROBLEMS), "--out", "eval", "--allow-code-execution",
                          "--compare-base", "--max-new-tokens", "64"], "eval",
     "every sample scored so far is in eval; the same command resumes", True),
    ("merge", lambda run: ["merge", str(run), "--output", "merged"], "merged",
     "--output merged was not written (its temporary directory is removed)", True),
    ("export", lambda run: ["export", str(run), "--output", "gguf"], "gguf",
     "--output gguf was not written (its temporary directory is removed)", False),
]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command, argv, output, promise, again", SIGNALLED, ids=[s[0] for s in SIGNALLED])
def test_a_signal_stops_a_writing_command_cleanly_and_the_same_command_finishes(memorised_run, tmp_path, signum,
                                                                                command, argv, output, promise, again):
    (tmp_path / "in.jsonl").write_text(PROMPTS)
    process = background(argv(memorised_run), tmp_path)
    at_work(process, tmp_path / f".{output}.lock")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped: {signal.Signals(signum).name}: ") and promise in last, stderr
    assert "Traceback" not in stderr
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers == [], leftovers  # no temporary, no lock file
    if command in ("merge", "export"):
        assert not (tmp_path / output).exists()
    if again and signum == signal.SIGINT:  # the same command, run again, finishes the work
        rerun = subprocess.run([sys.executable, "-m", "qlora", *argv(memorised_run)], cwd=tmp_path,
                               capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
        if command == "generate":
            assert len((tmp_path / "out.jsonl").read_text().splitlines()) == len(PROMPTS.splitlines())
        if command == "eval":
            summary = json.loads((tmp_path / "eval/summary.json").read_text())
            assert summary["samples"] == summary["base"]["samples"] == 4


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "the file")


def disk_full_on_a_row(row, generation):
    if generation:  # a row being written, not the fields compared to find where to resume
        disk_full()
    return real_row_line(row, generation)


# (command, argv, where the write fails, what stays absent)
FULL = [
    ("generate", lambda run: ["generate", str(run), "--input-file", "in.jsonl", "--output-file", "out.jsonl"],
     ("qlora.generate.row_line", disk_full_on_a_row), None),
    ("eval", lambda run: ["eval", str(run), "--problems", str(PROBLEMS), "--out", "eval", "--allow-code-execution"],
     ("qlora.evaluate.append", disk_full), None),
    ("merge", lambda run: ["merge", str(run), "--output", "merged"], ("qlora.merge.write_marker", disk_full),
     "merged"),
    ("export", lambda run: ["export", str(run), "--output", "gguf"], ("qlora.export.convert", disk_full), "gguf"),
    ("tiny", lambda run: ["tiny", "llama", "model"], ("qlora.tiny.write_marker", disk_full), "model"),
    ("report", lambda run: [*("report", str(run)), "--output", "report.png"], ("qlora.report.write_atomic", disk_full),
     "report.png"),
]


@pytest.mark.parametrize("command, argv, failure, absent", FULL, ids=[f[0] for f in FULL])
def test_a_full_disk_is_one_line_saying_what_was_kept(memorised_run, tmp_path, monkeypatch, command, argv, failure,
                                                      absent):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text(PROMPTS)
    monkeypatch.setattr(*failure)
    result = CliRunner().invoke(app, argv(memorised_run))
    lines = result.stderr.splitlines()
    assert result.exit_code == 1, result.output
    errors = [line for line in lines if line.startswith("error")]  # after the progress lines of loading a model
    assert errors == lines[-1:] and errors[0].startswith("error: cannot write the file: No space left on device; ")
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary, no lock
    assert absent is None or not (tmp_path / absent).exists()


def gpu_out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def cpu_out_of_memory(*args, **kwargs):
    torch.empty(1 << 62, dtype=torch.uint8)  # the CPU allocator's own refusal


# (command, argv, where memory runs out, what the line tells to lower)
OUT_OF_MEMORY = [
    ("generate-load", lambda run: ["generate", str(run), "--prompt", "x"], ("qlora.generate.load_run",
                                                                            gpu_out_of_memory), "--batch-size (8)"),
    ("generate-file", lambda run: ["generate", str(run), "--input-file", "in.jsonl", "--output-file", "out.jsonl"],
     ("qlora.generate.generate", cpu_out_of_memory), "--max-new-tokens"),
    ("eval", lambda run: ["eval", str(run), "--problems", str(PROBLEMS), "--out", "eval", "--allow-code-execution"],
     ("qlora.generate.load_run", gpu_out_of_memory), "--batch-size (8) or --max-new-tokens (512)"),
    ("merge", lambda run: ["merge", str(run), "--output", "merged"], ("qlora.merge.load_merged_model",
                                                                      cpu_out_of_memory), "--dtype float16"),
    ("merge-verify", lambda run: ["merge", str(run), "--output", "merged", "--verify"],
     ("qlora.merge.verify", gpu_out_of_memory), "the merged model in merged is complete, not verified"),
    ("export", lambda run: ["export", str(run), "--output", "gguf"], ("qlora.export.merge", cpu_out_of_memory),
     "export merges the whole base"),
]


@pytest.mark.parametrize("name, argv, failure, hint", OUT_OF_MEMORY, ids=[o[0] for o in OUT_OF_MEMORY])
def test_out_of_memory_anywhere_is_one_line_naming_what_to_lower(memorised_run, tmp_path, monkeypatch, name, argv,
                                                                failure, hint):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text(PROMPTS)
    monkeypatch.setattr(*failure)
    result = CliRunner().invoke(app, argv(memorised_run))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.exit_code == 1, result.output
    assert errors == result.stderr.splitlines()[-1:] and errors[0].startswith("error: out of memory: ")
    assert hint in errors[0] and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
