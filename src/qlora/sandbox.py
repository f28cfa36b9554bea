"""Run one untrusted Python program (a generated solution and its tests) in a process of its own, and say whether
it passed.

Two layers, set up inside the child before the program runs. The operating system's, where the kernel allows it
(Linux namespaces, as root or in a user namespace): no network (a network namespace of its own), and every
filesystem read-only except the sample's own temporary directory (a mount namespace); always: a session of its own
(the whole process group is killed at the end) and resource limits on CPU seconds, address space, file size and,
for an unprivileged user, processes. Python's, always: the functions that fork, exec, kill, open sockets or delete
files are removed, and open() refuses to write outside the temporary directory. Neither is a security boundary
against code written to escape; both stop what generated code does by accident (an infinite loop, a memory bomb, a
fork bomb, a stray write). The README states the trust model.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

OUTPUT_LIMIT = 64 * 1024  # bytes of stdout / stderr kept per sample
MOST_SECONDS = 24 * 3600  # the longest a sample may run: a day (beyond ~1e9 s Python's timeouts overflow)


@dataclass(frozen=True)
class Limits:
    seconds: float = 10.0  # wall clock
    memory_bytes: int = 2 * 1024**3  # address space
    file_bytes: int = 16 * 1024**2  # largest file the program may write
    processes: int = 16  # where the process-count limit applies (an unprivileged user)


@dataclass(frozen=True)
class Outcome:
    result: str  # "passed", "failed" or "timed out"
    error: str  # the error's last line ("" when passed)


# Runs first in the child, as its __main__: isolates itself, takes the sentinel, disarms what reaches outside, then
# runs the program. The sentinel is printed only if the program returned normally: sys.exit(0) or os._exit(0) before
# the tests fail.
GUARD = r'''
import builtins, ctypes, io, os, resource, sys
sentinel = os.environ.pop("QLORA_SANDBOX_SENTINEL")
limits = [int(x) for x in os.environ.pop("QLORA_SANDBOX_LIMITS").split(",")]
root = os.path.realpath(os.getcwd())

libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWUSER, NEWNET = 0x00020000, 0x10000000, 0x40000000
RDONLY, REMOUNT, BIND, REC, PRIVATE = 1, 32, 4096, 16384, 1 << 18
if libc.unshare(NEWNS | NEWNET | (0 if os.geteuid() == 0 else NEWUSER)) == 0:
    libc.mount(b"none", b"/", None, REC | PRIVATE, None)
    libc.mount(root.encode(), root.encode(), None, BIND, None)
    os.chdir(root)  # into the writable mount just placed over the old working directory
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        points = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
    for point in points:
        if point != root:
            libc.mount(None, point.encode(), None, REMOUNT | BIND | RDONLY, None)
cpu, memory, size, processes = limits
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU first, which reads as a time-out
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if os.geteuid() != 0:  # root is exempt from the process-count limit
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))

real_open, real_os_open = builtins.open, os.open

def inside(path):
    if isinstance(path, int):
        return True
    full = os.path.realpath(os.fspath(path))
    return full == root or full.startswith(root + os.sep)

def guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not inside(file):
        raise PermissionError(f"the sandbox does not write outside its directory: {file}")
    return real_open(file, mode, *args, **kwargs)

def guarded_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC) and not inside(path):
        raise PermissionError(f"the sandbox does not write outside its directory: {path}")
    return real_os_open(path, flags, *args, **kwargs)

def refused(name):
    def call(*args, **kwargs):
        raise PermissionError(f"the sandbox does not allow {name}")
    return call

builtins.open = io.open = guarded_open
os.open = guarded_os_open
for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execle",
             "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill",
             "killpg", "setsid", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
             "truncate", "chmod", "chown"):
    if hasattr(os, name):
        setattr(os, name, refused("os." + name))
import shutil, socket, subprocess
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, refused("shutil." + name))
socket.socket = socket.create_connection = refused("sockets")
subprocess.Popen = refused("subprocesses")
sys.modules["multiprocessing"] = None
del libc, ctypes
source = real_open("program.py", encoding="utf-8").read()
sys.argv = ["program.py"]
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
sys.stdout.flush()
os.write(1, ("\n" + sentinel + "\n").encode())
'''


def last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run `program` (Python source) in a fresh temporary directory under the sandbox; passed means it ran to its
    end and exited 0."""
    workdir = Path(tempfile.mkdtemp(prefix="qlora-sample-"))
    try:
        (workdir / "program.py").write_text(program, encoding="utf-8")
        sentinel = secrets.token_hex(16)
        cpu = int(limits.seconds) + 1
        env = {"PATH": "/usr/bin:/bin", "QLORA_SANDBOX_SENTINEL": sentinel, "PYTHONDONTWRITEBYTECODE": "1",
               "QLORA_SANDBOX_LIMITS": f"{cpu},{limits.memory_bytes},{limits.file_bytes},{limits.processes}",
               "HOME": str(workdir), "TMPDIR": str(workdir), "PYTHONHASHSEED": "0"}
        process = subprocess.Popen([sys.executable, "-I", "-c", GUARD], cwd=workdir, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        try:
            out, err = process.communicate(timeout=limits.seconds + 2)  # + the interpreter's start
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            return Outcome("timed out", f"still running after {limits.seconds:g} s")
        _kill_group(process)  # whatever it left running
        out_text = out[-OUTPUT_LIMIT:].decode("utf-8", "replace")
        err_text = err[-OUTPUT_LIMIT:].decode("utf-8", "replace")
        if process.returncode == 0 and out_text.rstrip().endswith(sentinel):
            return Outcome("passed", "")
        if process.returncode == -signal.SIGXCPU:
            return Outcome("timed out", f"used more than {cpu} s of CPU")
        if process.returncode < 0:
            return Outcome("failed", f"killed by {signal.Signals(-process.returncode).name}")
        if process.returncode == 0:
            return Outcome("failed", "exited before its tests finished")
        return Outcome("failed", last_error_line(err_text) or f"exit code {process.returncode}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
