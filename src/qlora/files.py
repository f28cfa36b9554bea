"""Files in and out: what users hand us is read as text or refused in one line; what we write is published
atomically; what `--overwrite` may replace is fenced by a marker the writing command leaves.

Line numbers in messages are 1-based (as editors show them); row numbers are 0-based positions in the file's
list of rows (as `datasets` and pandas index them).
"""

from __future__ import annotations

import codecs
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from qlora.errors import UserError

MARKER = ".qlora.json"  # in every directory a command wrote: {"written_by": command, ...}
BINARY_PROBE = 8192  # bytes looked at for a NUL, which no text file holds


def read_text(path: Path, what: str) -> str:
    """A user's file as text: UTF-8, a leading BOM dropped. `what` names it in errors (e.g. "data.path").

    A binary file or one in another encoding is refused with one line naming the file and the fix.
    """
    path = Path(path)
    return decode_text(read_bytes(path, what), path, what)


def read_bytes(path: Path, what: str) -> bytes:
    """A user's file's bytes; a directory, a missing or unreadable file is one line naming it."""
    if path.is_dir():
        raise UserError(f"{what}: {path} is a directory, not a file")
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path} (relative to {Path.cwd()})")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"{what}: cannot read {path}: {exc.strerror}") from None


def decode_text(data: bytes, path: Path, what: str) -> str:
    """The bytes of `path` as UTF-8 text (read_text's rules)."""
    if b"\0" in data[:BINARY_PROBE]:
        raise UserError(f"{what}: {path} is a binary file, not text; give the {path.suffix or 'text'} file itself")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{what}: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                        "save it as UTF-8") from None


def jsonl_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of every non-blank line, split on "\\n" only: JSON strings may hold U+2028 and
    other characters str.splitlines treats as line ends."""
    return [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]


def parse_json(text: str, what: str, path: Path, line: int | None = None, hint: str = "") -> object:
    """JSON `text`: line `line` of `path`, or (None) the whole file. Text that is not JSON (`hint` added), or that
    Python's parser cannot hold (arrays nested thousands deep, an integer of more digits than int() reads), is one
    line naming the file and line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line, problem = (line or 1) + exc.lineno - 1, f"is not valid JSON ({exc.msg}){hint}"
    except RecursionError:
        problem = "nests arrays or objects deeper than Python's JSON parser can follow"
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
        problem = f"holds an integer of more than {sys.get_int_max_str_digits()} digits"
    raise UserError(f"{what}: {path}" + (f" line {line}" if line else "") + f" {problem}")


def read_jsonl(path: Path, what: str) -> list[tuple[int, object]]:
    """(1-based line number, parsed value) of every non-blank line of a .jsonl file; one line naming the file and
    line for text that is not JSON."""
    return [(number, parse_json(line, what, path, number)) for number, line in jsonl_lines(read_text(path, what))]


def fsync(path: Path) -> None:
    """Flush a file or directory to disk, so a rename never publishes data still in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_sibling(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: `.NAME.tmp` next to it."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a file (text as UTF-8) through a flushed temporary sibling, so a crash never leaves it half-written."""
    tmp = tmp_sibling(path)
    with tmp.open("wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def write_json(path: Path, value) -> None:
    """`value` as indented JSON, written atomically (write_atomic)."""
    write_atomic(path, json.dumps(value, indent=1) + "\n")


def complete_lines(path: Path, what: str, wrote: Callable[[str, int], bool], cut: bool = True) -> str:
    """The text of a line-per-record file a command appends to, up to its last newline.

    A last line without one was cut short by a crash of its writer: it is cut from the file, so appending goes on
    after the last whole line (cut=False: only checked), when `wrote(line, whole records before it)` proves this
    command wrote it; otherwise the file is refused in one line and left as it is.
    """
    data = read_bytes(path, what)
    end = data.rfind(b"\n") + 1
    complete = decode_text(data[:end], path, what)
    if end < len(data):
        try:
            line = codecs.getincrementaldecoder("utf-8")().decode(data[end:])  # drops a character cut in two
        except UnicodeDecodeError:
            line = None
        if line is None or not wrote(line, len(jsonl_lines(complete))):
            raise UserError(f"{what}: {path} line {complete.count(chr(10)) + 1} has no newline and is not the start "
                            "of a line this command writes, so the file is not its earlier output and is left as it "
                            "is; name another file")
        if cut:
            with path.open("r+b") as f:
                f.truncate(end)
    return complete


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the complete directory `tmp` to `final` once every file in it is on disk; a directory already at
    `final` is replaced only after the new one is in place (moved aside, then removed)."""
    for path in sorted(tmp.rglob("*"), reverse=True):  # files before the directories holding them
        fsync(path)
    fsync(tmp)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def lock_holder(lock: Path) -> tuple[int, str] | None:
    """(PID, command) of the process holding the flock on `lock`, or None when it is free (a dead holder never
    holds it). The PID is -1 where the holder has not written it yet."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        pid, _, command = os.read(fd, 128).decode(errors="replace").strip().partition(" ")
        return (int(pid) if pid.isdigit() else -1), command or "train"
    finally:
        os.close(fd)  # releases a lock taken here


def busy_message(what: str, path: Path, holder: tuple[int, str]) -> str:
    pid, command = holder
    return (f"{what}: {path} is in use by a running `qlora {command}` "
            f"({f'PID {pid}' if pid > 0 else 'another process'}); wait for it to finish, stop it, or choose another path")


@contextmanager
def held_lock(lock: Path, command: str, what: str, path: Path, remove: bool):
    """Hold an flock on the file `lock` while `command` writes `path`: a second writer exits 2 at once, naming this
    PID. flock() locks die with their process, so a crash or kill -9 never leaves `path` locked. With `remove`, the
    lock file is deleted on the way out (a lock file found replaced after locking is retried, so two processes never
    both hold one)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_holder(lock)
            if holder is None:
                continue  # the holder exited between the two looks
            raise UserError(busy_message(what, path, holder)) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file we opened: lock the one now there
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}\n".encode())
        yield
    finally:
        if remove:
            lock.unlink(missing_ok=True)
        os.close(fd)


def output_lock(path: Path, command: str, what: str):
    """The lock of an output file or directory: `.NAME.lock` beside it, held while `command` writes it, then removed.
    Creating it is the first write, so an output that cannot be written (under a file, read-only, no space) is one
    line before any work."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(lock, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as exc:
        raise UserError(f"{what}: cannot write {path}: {exc.strerror}; choose another path") from None
    return held_lock(lock, command, what, path, remove=True)


@contextmanager
def publishing(output: Path, command: str, what: str):
    """Write the directory `output` as `command` does: under its lock, into a fresh temporary sibling (yielded) that is
    published as `output` when the block ends, or removed when it fails. A temporary sibling found there was left by
    a writer that died: the lock proves none is alive."""
    output = Path(output)
    with output_lock(output, command, what):
        tmp = tmp_sibling(output)
        shutil.rmtree(tmp, ignore_errors=True)
        try:  # a signal right after mkdir must not leave the directory behind
            tmp.mkdir()
            yield tmp
            publish_dir(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_marker(directory: Path, command: str, **extra) -> None:
    """Mark `directory` as written by `command`: the only kind of directory that command's --overwrite replaces."""
    write_json(directory / MARKER, {"written_by": command, **extra})


def read_marker(directory: Path) -> dict:
    """The marker of a directory a qlora command wrote, or {} for any other path."""
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def check_parent(path: Path, what: str) -> None:
    """The directory an output goes in must exist (we do not create a user's directories for a file)."""
    parent = Path(path).parent
    if parent.is_dir():
        return
    existing = next(p for p in parent.parents if p.exists()) if not parent.exists() else parent
    if not existing.is_dir():
        raise UserError(f"{what}: {path} lies under {existing}, which is a file; choose another path")
    raise UserError(f"{what}: the directory {parent} does not exist; create it first")


def check_creatable(path: Path, what: str) -> None:
    """Prove that the directory `path` can be made and written: create and remove a temporary directory in the
    nearest part of it that exists (a read-only mount, /proc, a full disk fail here); nothing existing is touched."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qlora-probe-", suffix=".tmp", dir=existing))
    except OSError as exc:
        raise UserError(f"{what}: cannot create {path}: {exc.strerror or exc} in {existing}; choose another "
                        "directory") from None


def refuse_working_directory(path: Path, what: str) -> None:
    """A directory we publish into by renaming may not be, or hold, the working directory."""
    if Path.cwd().resolve().is_relative_to(Path(path).resolve()):
        raise UserError(f"{what}: {path} holds the working directory; choose another directory")


def check_replaceable(path: Path, command: str, what: str, keep: list[Path] = ()) -> None:
    """Raise UserError unless `command --overwrite` may delete `path`.

    Only a directory marked as written by the same command qualifies (so never a run's own adapter/ or
    checkpoints/), and never one that is or holds a path in `keep` (the run a merge reads, the data and model a
    run trains on) or the working directory.
    """
    path = Path(path).resolve()
    if not path.exists():
        return
    for kept in keep:
        kept = Path(kept).resolve()
        if kept.is_relative_to(path):
            relation = "is" if path == kept else "holds"
            raise UserError(f"{what}: {path} {relation} {kept}, which this command reads; choose a directory "
                            "outside it")
    refuse_working_directory(path, what)
    if not path.is_dir() or read_marker(path).get("written_by") != command:
        kind = "a file" if not path.is_dir() else "not a directory `qlora " + command + "` wrote"
        raise UserError(f"{what}: {path} exists and is {kind}, so --overwrite will not delete it; "
                        "choose another path or remove it yourself")


def check_output_dir(output: Path, overwrite: bool, command: str, what: str) -> None:
    """Refuse an output directory that is a file or holds files, unless --overwrite may replace it (an earlier
    `qlora COMMAND` wrote it)."""
    if output.exists() and not output.is_dir():
        raise UserError(f"{what}: {output} is a file; name a directory")
    refuse_working_directory(output, what)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise UserError(f"{what}: {output} exists and is not empty: pass --overwrite to replace a model an earlier "
                            f"`qlora {command}` wrote, or choose another directory")
        check_replaceable(output, command, what)
