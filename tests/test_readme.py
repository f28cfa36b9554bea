"""Every `qlora` command the README and docs/ show works as written: each one parses with qlora's own command
line, and each one on the demo run runs, on the demo's run as the real-model tests train it (the shipped recipe on
the fetched SmolLM2-135M, only shorter)."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from qlora.cli import app, name_value_types

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO_RUN = "runs/smollm2-code"


def shown_commands(page: Path) -> list[list[str]]:
    """The argv of every `qlora ...` in a page's bash blocks: continuation lines joined, comments dropped, and a
    `&& other-tool ...` after it cut off."""
    commands, in_bash, pending = [], False, ""
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_bash = line == "```bash" and not in_bash
            continue
        if not in_bash:
            continue
        pending += line.rstrip("\\")
        if line.endswith("\\"):
            continue
        words, pending = shlex.split(pending, comments=True), ""
        if words[:1] == ["qlora"]:
            commands.append(words[1:words.index("&&")] if "&&" in words else words[1:])
    return commands


COMMANDS = shown_commands(README)
DOCS_COMMANDS = [argv for page in sorted((ROOT / "docs").glob("*.md")) for argv in shown_commands(page)]


def test_the_readme_shows_every_command():
    assert {argv[0] for argv in COMMANDS if argv[:1] != ["--version"]} >= {
        "train", "check", "generate", "merge", "export", "eval", "report"}
    assert any(DEMO_RUN in argv for argv in COMMANDS) and len(DOCS_COMMANDS) >= 17


@pytest.mark.parametrize("argv", COMMANDS + DOCS_COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS + DOCS_COMMANDS])
def test_each_shown_command_parses(argv):
    """Flags, values and their types as qlora's command line reads them (no command body runs)."""
    group = typer.main.get_command(app)
    name_value_types(group)
    if argv == ["--version"]:
        return
    command = group.get_command(group.make_context("qlora", list(argv), resilient_parsing=True), argv[0])
    assert command is not None, f"qlora has no command {argv[0]!r}"
    command.make_context(argv[0], list(argv[1:]))


@pytest.fixture(scope="module")
def demo(tuned, tmp_path_factory):
    """A directory where `runs/smollm2-code` is the demo's run: configs/smollm2-code.yaml trained on the real model
    (conftest's `tuned`, shared with tests/test_real_model.py)."""
    here = tmp_path_factory.mktemp("demo")
    (here / DEMO_RUN).parent.mkdir(parents=True)
    (here / DEMO_RUN).symlink_to(tuned)
    return here


def qlora(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


DEMO_COMMANDS = [argv for argv in COMMANDS if any(word.startswith(DEMO_RUN) for word in argv)]


@pytest.mark.parametrize("argv", DEMO_COMMANDS, ids=[" ".join(a)[:60] for a in DEMO_COMMANDS])
def test_each_readme_command_on_the_demo_run_runs(demo, argv):
    result = qlora(argv, demo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
