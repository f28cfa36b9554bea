"""Damaged runs degrade, never crash (issue 28, items 3 and 4). Each file a command reads back from a run (metrics,
environment, adapter weights, config and template, eval summary, trainer state, recipe.yaml) is damaged in a copy of
a finished run, and every command that reads it exits 2 with one line naming the file and what is wrong, no traceback,
and nothing on disk changed. A damaged checkpoint is passed over for the complete one before it, which `train`
resumes and finishes; a moved run trains where it now is."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import ROW, recipe_for, snapshot
from qlora.cli import app
from qlora.errors import RunInterrupted
from qlora.train import train
from test_reliability import SignalAt, metrics

PROBLEMS = Path(__file__).resolve().parents[1] / "src" / "qlora" / "sample_data" / "eval_problems.jsonl"
RUN = "run"  # the copy of the finished run each case damages, in the case's working directory
# the copy's recipe.yaml names the run it was copied from: train.output_dir set, else it trains there as a moved run
HERE = ["run/recipe.yaml", "--set", "train.output_dir=run"]
RESUME = [*HERE, "--set", "train.max_steps=101"]  # train one more step


def write(path: str, content) -> None:
    Path(RUN, path).write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())


def cut(path: str) -> None:
    """Cut a file to half its length, as a full disk or a killed copy leaves it."""
    data = Path(RUN, path).read_bytes()
    Path(RUN, path).write_bytes(data[: len(data) // 2])


def edit_recipe(old: str, new: str) -> None:
    path = Path(RUN, "recipe.yaml")
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def append_metrics(line: str) -> None:
    with Path(RUN, "metrics.jsonl").open("a") as f:
        f.write(line + "\n")


def evaluated(summary) -> None:
    Path(RUN, "eval").mkdir()
    write("eval/summary.json", summary)


CHECKPOINT = "checkpoints/checkpoint-100"
# (id, command, damage done to the run copy, argv after the command, what the one stderr line must name)
CASES = [
    ("trainer-state-not-json", "train", lambda: write(f"{CHECKPOINT}/trainer_state.json", b'{"global_step": 10'),
     RESUME, "checkpoint-100: trainer_state.json line 1 is not valid JSON"),
    ("trainer-state-not-json", "check", lambda: write(f"{CHECKPOINT}/trainer_state.json", b'{"global_step": 10'),
     RESUME, "checkpoint-100: trainer_state.json line 1 is not valid JSON"),
    ("trainer-state-unknown-field", "check", lambda: write(f"{CHECKPOINT}/trainer_state.json", {"steps": 1}),
     RESUME, "trainer_state.json does not hold a trainer state"),
    ("trainer-state-null", "train", lambda: write(f"{CHECKPOINT}/trainer_state.json", None),
     RESUME, "trainer_state.json holds null"),
    ("checkpoint-adapter-cut", "train", lambda: cut(f"{CHECKPOINT}/adapter_model.safetensors"),
     RESUME, "adapter_model.safetensors is cut short"),
    ("checkpoint-optimizer-cut", "check", lambda: cut(f"{CHECKPOINT}/optimizer.safetensors"),
     RESUME, "optimizer.safetensors is cut short"),
    ("checkpoint-scheduler-not-json", "train", lambda: write(f"{CHECKPOINT}/scheduler.json", b"{"),
     RESUME, "checkpoint-100: scheduler.json line 1 is not valid JSON"),
    ("metrics-null-line", "train", lambda: append_metrics("null"), RESUME, "metrics.jsonl line 5 is null"),
    ("metrics-list-line", "train", lambda: append_metrics("[1, 2]"), RESUME, "metrics.jsonl line 5 is a list"),
    ("metrics-bad-json", "check", lambda: append_metrics("{oops"), RESUME, "metrics.jsonl line 5 is not valid JSON"),
    ("metrics-null-line", "report", lambda: append_metrics("null"), [RUN], "metrics.jsonl line 5 is null"),
    ("metrics-number-line", "report", lambda: append_metrics("7"), [RUN], "metrics.jsonl line 5 is a number 7"),
    ("metrics-no-step", "report", lambda: append_metrics('{"loss": 0.5}'), [RUN], "an object without a step"),
    ("metrics-string-step", "report", lambda: append_metrics('{"step": "9"}'), [RUN], 'a step of a string "9"'),
    ("metrics-string-loss", "report", lambda: append_metrics('{"step": 101, "loss": "low"}'), [RUN],
     'line 5: loss is a string "low"'),
    ("environment-not-json", "train", lambda: write("environment.json", b"[{"), RESUME,
     "environment.json line 1 is not valid JSON"),
    ("environment-object", "train", lambda: write("environment.json", {"device": "cpu"}), RESUME,
     "environment.json holds an object, not a JSON list"),
    ("environment-entry-without-device", "check", lambda: write("environment.json", [{"step": 0}]), RESUME,
     "environment.json entry 0 is not an object with a step and a device"),
    ("template-missing", "generate", lambda: Path(RUN, "adapter/template.json").unlink(), [RUN, "--prompt", "x"],
     "template.json is missing; delete"),
    ("template-missing", "merge", lambda: Path(RUN, "adapter/template.json").unlink(), [RUN, "--output", "m"],
     "template.json is missing"),
    ("template-not-json", "generate", lambda: write("adapter/template.json", b"{'name': 'alpaca'}"),
     [RUN, "--prompt", "x"], "template.json line 1 is not valid JSON"),
    ("template-unknown-field", "export", lambda: write("adapter/template.json", {"name": "x", "turns": 2}),
     [RUN, "--output", "x"], "template.json does not hold a prompt template"),
    ("template-number", "generate", lambda: write("adapter/template.json", {"name": "x", "reply_end": 5}),
     [RUN, "--prompt", "x"], "template.json holds reply_end: a number 5, not text"),
    ("adapter-cut", "generate", lambda: cut("adapter/adapter_model.safetensors"), [RUN, "--prompt", "x"],
     "adapter_model.safetensors is cut short"),
    ("adapter-cut", "merge", lambda: cut("adapter/adapter_model.safetensors"), [RUN, "--output", "m"],
     "adapter_model.safetensors is cut short"),
    ("adapter-cut", "export", lambda: cut("adapter/adapter_model.safetensors"), [RUN, "--output", "x"],
     "adapter_model.safetensors is cut short"),
    ("adapter-cut", "eval", lambda: cut("adapter/adapter_model.safetensors"),
     [RUN, "--problems", str(PROBLEMS), "--out", "o", "--allow-code-execution"], "adapter_model.safetensors is cut"),
    ("adapter-empty", "generate", lambda: write("adapter/adapter_model.safetensors", b""), [RUN, "--prompt", "x"],
     "adapter_model.safetensors is cut short"),
    ("adapter-config-not-json", "generate", lambda: cut("adapter/adapter_config.json"), [RUN, "--prompt", "x"],
     "adapter/adapter_config.json line"),
    ("adapter-config-not-json", "merge", lambda: cut("adapter/adapter_config.json"), [RUN, "--output", "m"],
     "adapter/adapter_config.json line"),
    ("adapter-config-list", "eval", lambda: write("adapter/adapter_config.json", []),
     [RUN, "--problems", str(PROBLEMS), "--out", "o", "--allow-code-execution"], "adapter_config.json holds a list"),
    ("adapter-config-rank-edited", "generate",
     lambda: write("adapter/adapter_config.json", {**json.loads(Path(RUN, "adapter/adapter_config.json").read_text()),
                                                   "r": 8}),
     [RUN, "--prompt", "x"], "adapter_config.json holds r 8, but adapter_model.safetensors holds rank 16 weights"),
    ("adapter-config-string-rank", "merge",
     lambda: write("adapter/adapter_config.json", {**json.loads(Path(RUN, "adapter/adapter_config.json").read_text()),
                                                   "r": "16"}),
     [RUN, "--output", "m"], 'adapter_config.json holds r a string "16"'),
    ("eval-summary-not-json", "report", lambda: evaluated(b'{"pass@1": '), [RUN], "summary.json line 1 is not valid JSON"),
    ("eval-summary-not-json", "merge", lambda: evaluated(b'{"pass@1": '), [RUN, "--output", "m"],
     "summary.json line 1 is not valid JSON"),
    ("eval-summary-list", "report", lambda: evaluated([0.5]), [RUN], "summary.json holds a list"),
    ("eval-summary-string-score", "report", lambda: evaluated({"pass@1": "high"}), [RUN],
     'pass@1 is a string "high", not a score'),
    ("eval-summary-bad-base", "merge", lambda: evaluated({"pass@1": 0.5, "base": {"pass@1": 7}}),
     [RUN, "--output", "m"], "base pass@1 is a number 7"),
    ("recipe-rank-edited", "train", lambda: edit_recipe("  r: 16\n", "  r: 8\n"), HERE,
     "recipe.yaml was edited after the run trained with it: lora.r (16 -> 8)"),
    ("recipe-rank-edited", "check", lambda: edit_recipe("  r: 16\n", "  r: 8\n"), HERE,
     "recipe.yaml was edited after the run trained with it: lora.r (16 -> 8)"),
    ("recipe-learning-rate-edited", "train", lambda: edit_recipe("learning_rate: 0.01", "learning_rate: 0.02"),
     RESUME, "train.learning_rate (0.01 -> 0.02)"),
]


@pytest.fixture
def run_copy(memorised_run, tmp_path, monkeypatch):
    """A copy of the finished run in the working directory (tmp_path), to damage."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(memorised_run, tmp_path / RUN)
    return memorised_run


@pytest.mark.parametrize("name, command, damage, argv, culprit", CASES,
                         ids=[f"{command}-{name}" for name, command, *_ in CASES])
def test_a_damaged_run_file_is_one_line_naming_it_and_changes_nothing(run_copy, tmp_path, name, command, damage,
                                                                      argv, culprit):
    damage()
    before, original = snapshot(tmp_path), snapshot(run_copy)
    result = CliRunner().invoke(app, [command, *argv])
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, TypeError))
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], lines
    assert snapshot(tmp_path) == before and snapshot(run_copy) == original


def test_the_table_covers_every_run_file_and_command():
    assert len({(name, command) for name, command, *_ in CASES}) == len(CASES)
    assert {command for _, command, *_ in CASES} == {"train", "check", "generate", "merge", "export", "eval", "report"}


def test_a_damaged_checkpoint_is_passed_over_and_the_run_resumes_from_the_one_before_and_finishes(tmp_path,
                                                                                                 tiny_model, capsys):
    def recipe(name):
        (tmp_path / name).mkdir(exist_ok=True)
        return recipe_for(tmp_path / name, tiny_model("gemma"), [ROW], train={"max_steps": 6, "batch_size": 1})

    full = train(recipe("full"))
    with pytest.raises(RunInterrupted, match="SIGINT after step 5"):
        train(recipe("resumed"), callbacks=[SignalAt(5)])
    run = tmp_path / "resumed/run"
    checkpoints = run / "checkpoints"
    weights = checkpoints / "checkpoint-5/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy or a disk that gave out

    before = snapshot(run)
    checked = CliRunner().invoke(app, ["check", str(run / "recipe.yaml")])
    skip = (f"{checkpoints / 'checkpoint-5'} is damaged (adapter_model.safetensors is cut short or not safetensors "
            "(Error while deserializing header: invalid header length)): resuming from "
            "checkpoint-4 instead")
    assert checked.exit_code == 0 and f"run: {skip}" in checked.stdout
    assert snapshot(run) == before  # check only tells

    capsys.readouterr()
    train(recipe("resumed"))
    err = capsys.readouterr().err
    assert f"{skip}; removing it" in err and f"resuming from {checkpoints / 'checkpoint-4'} (step 4)" in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert [m["step"] for m in metrics(run)] == [2, 4, 6]
    a, b = load_file(full / "adapter/adapter_model.safetensors"), load_file(run / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert all(torch.isfinite(w).all() for w in b.values())


def test_no_intact_checkpoint_is_one_line_saying_how_to_start_over(run_copy):
    cut(f"{CHECKPOINT}/rng_state.safetensors")
    result = CliRunner().invoke(app, ["train", *RESUME])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: train.output_dir: no checkpoint of ") and "pass --overwrite to start " \
        "over" in result.stderr and len(result.stderr.splitlines()) == 1


def test_a_moved_run_trains_where_it_now_is_and_names_the_old_path(run_copy, tmp_path):
    before = snapshot(run_copy)
    shutil.move(RUN, "moved")
    result = CliRunner().invoke(app, ["train", "moved/recipe.yaml", "--set", "train.max_steps=102"])
    assert result.exit_code == 0, result.stderr
    moved = (tmp_path / "moved").resolve()
    assert (f"note: moved/recipe.yaml is the recipe of the run in {moved}, which it names at {run_copy} (moved there "
            "since); training it where it is now") in result.stderr
    assert snapshot(run_copy) == before  # the old place is not touched
    assert (moved / "checkpoints/checkpoint-102").is_dir()
    marker = json.loads((moved / ".qlora.json").read_text())
    assert marker["complete"]["step"] == 102 and marker["recipe"]["values"]["train"]["output_dir"] == str(moved)
    assert f"output_dir: {moved}\n" in (moved / "recipe.yaml").read_text()
    again = CliRunner().invoke(app, ["train", "moved/recipe.yaml", "--set", "train.max_steps=102"])
    assert again.exit_code == 0 and "is complete at step 102: nothing to do" in again.stderr
    assert "note:" not in again.stderr  # recipe.yaml now names where the run is


def test_a_deleted_adapter_is_written_again_from_the_last_checkpoint_as_the_message_says(run_copy):
    shutil.rmtree(Path(RUN, "adapter"))
    result = CliRunner().invoke(app, ["train", *HERE])
    assert result.exit_code == 0, result.stderr
    assert Path(RUN, "adapter/adapter_model.safetensors").read_bytes() == \
        Path(RUN, CHECKPOINT, "adapter_model.safetensors").read_bytes()
    assert (Path(RUN, "adapter/template.json").read_bytes() == (run_copy / "adapter/template.json").read_bytes())
