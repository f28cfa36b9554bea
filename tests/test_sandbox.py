"""The sandbox that runs generated code: each outcome a user can meet, and both layers of isolation."""

import subprocess
import sys

import pytest

from qlora.sandbox import Limits, run_program

LIMITS = Limits(seconds=3)


def namespaces_allowed() -> bool:
    """Whether this kernel lets a process take network and mount namespaces (the OS layer)."""
    probe = ("import ctypes, os, sys\nflags = 0x00020000 | 0x40000000 | (0 if os.geteuid() == 0 else 0x10000000)\n"
             "sys.exit(ctypes.CDLL(None).unshare(flags) != 0)")
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


@pytest.mark.parametrize("program, result, error", [
    ("def f(x):\n    return x + 1\nassert f(1) == 2\n", "passed", ""),
    ("assert 1 == 2, 'wrong'\n", "failed", "AssertionError: wrong"),
    ("def f(:\n", "failed", "SyntaxError: invalid syntax"),
    ("while True:\n    pass\n", "timed out", "used more than 4 s of CPU"),
    ("import time\ntime.sleep(60)\n", "timed out", "still running after 3 s"),
    ("x = bytearray(10**11)\n", "failed", "MemoryError"),
    ("import os\nwhile True:\n    os.fork()\n", "failed", "PermissionError: the sandbox does not allow os.fork"),
    ("import subprocess\nsubprocess.run(['true'])\n", "failed", "PermissionError: the sandbox does not allow subprocesses"),
    ("import sys\nsys.exit(0)\nassert False\n", "failed", "exited before its tests finished"),
    ("import os\nos._exit(0)\n", "failed", "exited before its tests finished"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 22))\n", "failed",
     "PermissionError: the sandbox does not allow sockets"),
    ("open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'\n", "passed", ""),
], ids=["pass", "failed-assert", "syntax-error", "infinite-loop", "sleeps", "memory-bomb", "fork-bomb",
        "subprocess", "sys-exit-0", "os-exit-0", "socket", "writes-its-own-directory"])
def test_each_outcome(program, result, error):
    outcome = run_program(program, LIMITS)
    assert (outcome.result, outcome.error) == (result, error)


def test_writing_outside_its_directory_is_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    for program in (f"open({str(target)!r}, 'w').write('x')\n",
                    f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))\n",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n"):
        outcome = run_program(program, LIMITS)
        assert outcome.result == "failed" and "PermissionError" in outcome.error
    assert not target.exists() and tmp_path.is_dir()


@pytest.mark.skipif(not namespaces_allowed(), reason="this kernel refuses network and mount namespaces: only the "
                                                      "Python layer runs here (docs/evaluation.md)")
def test_the_os_layer_holds_when_the_python_layer_is_bypassed(tmp_path):
    # _io.open and _socket are the C functions under the guarded Python ones
    target = tmp_path / "escaped.txt"
    wrote = run_program(f"import _io\n_io.open({str(target)!r}, 'w').write('x')\n", LIMITS)
    assert wrote.result == "failed" and "Read-only file system" in wrote.error
    assert not target.exists()
    connected = run_program("import _socket\ns = _socket.socket()\ns.connect(('1.1.1.1', 53))\n", LIMITS)
    assert connected.result == "failed" and "Network is unreachable" in connected.error
