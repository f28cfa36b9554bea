"""The run directory's life: a finished run is left alone, a crash in the final save is finished from the last
checkpoint, a run in use is locked, --overwrite replaces only what qlora wrote, and `check` refuses exactly what
`train` refuses, before anything is written."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROW, ROW_WITH_INPUT, snapshot
from typer.testing import CliRunner

from qlora.check import check
from qlora.cli import app
from qlora.errors import RunFailed, UserError
from qlora.files import lock_holder
from qlora.train import train


def with_train(recipe, **values):
    return recipe.model_copy(update={"train": recipe.train.model_copy(update=values)})


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_finished_run_run_again_is_a_no_op(make_recipe, capsys):
    recipe = make_recipe(train={"max_steps": 2})
    run = train(recipe)
    before = snapshot(run)
    assert train(recipe) == run
    assert f"{run} is complete at step 2: nothing to do" in capsys.readouterr().err
    assert snapshot(run) == before
    assert check(recipe).errors == []  # check agrees that train would start (and do nothing)


def test_a_crash_in_the_final_save_is_finished_from_the_last_checkpoint(make_recipe, monkeypatch, capsys):
    recipe = make_recipe(rows=[ROW, ROW_WITH_INPUT], train={"max_steps": 3})
    run = Path(recipe.train.output_dir)

    def crash(*args):
        raise OSError(5, "I/O error")

    monkeypatch.setattr("qlora.train.write_adapter", crash)
    with pytest.raises(RunFailed, match="I/O error"):
        train(recipe)
    monkeypatch.undo()
    assert not (run / "adapter").exists()
    checkpoints = snapshot(run / "checkpoints")
    train(recipe)
    assert "checkpoint-3 is the end of the run but adapter/ was not written" in capsys.readouterr().err
    assert snapshot(run / "checkpoints") == checkpoints and steps(run) == [2]  # nothing trained past the end
    final = load_file(run / "checkpoints/checkpoint-3/adapter_model.safetensors")
    saved = load_file(run / "adapter/adapter_model.safetensors")
    assert final.keys() == saved.keys() and all((final[k] == saved[k]).all() for k in final)
    assert {"tokenizer.json", "template.json", "adapter_config.json"} <= {p.name for p in (run / "adapter").iterdir()}
    train(recipe)
    assert "is complete at step 3" in capsys.readouterr().err


LOCKER = """
import sys, time
from pathlib import Path
from qlora.rundir import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_run_in_use_is_locked_until_its_process_dies_even_by_kill_9(make_recipe):
    recipe = make_recipe()
    run = Path(recipe.train.output_dir)
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        for command in (train, check):
            with pytest.raises(UserError, match=rf"in use by a running `qlora train` \(PID {holder.pid}\)"):
                command(recipe)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_holder(run / ".lock") is None
    assert (train(recipe) / "adapter").is_dir()


def test_resuming_on_changed_data_is_refused_and_touches_nothing(make_recipe):
    recipe = make_recipe(train={"max_steps": 2})
    run = train(recipe)
    before = snapshot(run)
    Path(recipe.data.path).write_text(json.dumps([ROW_WITH_INPUT]))
    for command in (train, check):
        with pytest.raises(UserError, match="data.path: the rows differ from those .* was trained on"):
            command(with_train(recipe, max_steps=4))
    assert snapshot(run) == before


def test_the_recorded_recipe_resumes_the_run_from_any_directory(make_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = make_recipe(train={"max_steps": 2})
    relative = recipe.model_dump(mode="json")
    relative["data"]["path"], relative["train"]["output_dir"] = "data.json", "run"
    (tmp_path / "recipe.yaml").write_text(json.dumps(relative))
    assert CliRunner().invoke(app, ["train", "recipe.yaml"]).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "run/recipe.yaml"), "--set", "train.max_steps=4"])
    assert result.exit_code == 0, result.output
    assert f"resuming from {tmp_path / 'run/checkpoints/checkpoint-2'}" in result.output
    assert steps(tmp_path / "run") == [2, 4] and list(elsewhere.iterdir()) == []


def test_overwrite_never_deletes_what_the_run_reads_or_the_working_directory(make_recipe, tmp_path, monkeypatch):
    recipe = make_recipe()
    train(recipe)
    holding_data = with_train(recipe, output_dir=str(tmp_path))  # tmp_path holds data.json and the first run
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"train.output_dir: .* holds .*data.json, which this command reads"):
        train(holding_data, overwrite=True)
    run = Path(recipe.train.output_dir)
    (run / "data.json").write_text(json.dumps([ROW]))  # the data inside the run it trains
    inside = recipe.model_copy(update={"data": recipe.data.model_copy(update={"path": str(run / "data.json")})})
    with pytest.raises(UserError, match="which this command reads"):
        train(inside, overwrite=True)
    monkeypatch.chdir(run)
    with pytest.raises(UserError, match="holds the working directory"):
        train(recipe, overwrite=True)
    (run / "data.json").unlink()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("section, values, message", [
    ("lora", {"target_modules": ["q_proj", "qproj"]}, "lora.target_modules: qproj matches no layer of"),
    ("lora", {"modules_to_save": ["head"]}, "lora.modules_to_save: head matches no layer of"),
    ("train", {"report_to": ["wandb"]}, "train.report_to: wandb is not installed"),
    ("model", {"attn_implementation": "flash_attention_2"}, "model.attn_implementation: flash_attention_2 needs"),
    ("quantization", {"compute_dtype": "float16"}, "quantization.compute_dtype: float16 mixed precision needs"),
    ("data", {"eval_path": "missing.jsonl"}, "missing.jsonl"),
    ("data", {"too_long": "error", "max_length": 20}, "over data.max_length=20"),
    ("data", {"eval_fraction": 0.4}, "leaves no rows to train on"),
])
def test_check_refuses_exactly_what_train_refuses_before_anything_is_written(make_recipe, section, values, message):
    recipe = make_recipe(**{section: values})
    run = Path(recipe.train.output_dir)
    with pytest.raises(UserError, match=message) as refused:
        train(recipe)
    assert not run.exists()
    try:
        errors = check(recipe).errors
    except UserError as exc:
        errors = [str(exc)]
    assert errors == [str(refused.value)]
    assert not run.exists()


def test_a_start_that_failed_before_training_does_not_block_the_corrected_recipe(make_recipe, monkeypatch):
    def unloadable(recipe):
        raise UserError("model.name_or_path: cannot load it")

    monkeypatch.setattr("qlora.train.load_quantized_base", unloadable)
    with pytest.raises(UserError, match="cannot load it"):
        train(make_recipe())
    monkeypatch.undo()
    corrected = make_recipe(lora={"r": 8})
    assert (train(corrected) / "adapter").is_dir()


def test_a_trained_run_without_adapter_or_checkpoints_is_refused_and_overwrite_keeps_what_train_did_not_write(
        make_recipe, capsys):
    recipe = make_recipe(train={"max_steps": 2})
    run = train(recipe)
    (run / "NOTES.md").write_text("what I tried\n")
    (run / "eval").mkdir()
    (run / "eval/summary.json").write_text('{"pass@1": 0.5}\n')
    (run / "checkpoints/mine.txt").write_text("mine\n")
    for name in ("adapter", "checkpoints/checkpoint-2"):
        shutil.rmtree(run / name)
    before = snapshot(run)
    for command in (train, check):
        with pytest.raises(UserError, match=r"holds a run that trained \(see its metrics.jsonl\) but has no adapter/ "
                                            r"and no complete checkpoint to resume from; pass --overwrite"):
            command(recipe)
    assert snapshot(run) == before
    train(recipe, overwrite=True)
    assert "kept in " in capsys.readouterr().err
    for name in ("NOTES.md", "eval/summary.json", "checkpoints/mine.txt"):
        assert snapshot(run)[name] == before[name]
    assert steps(run) == [2] and (run / "adapter").is_dir()


def test_resume_removes_only_trains_own_leftovers(make_recipe):
    recipe = make_recipe(train={"max_steps": 2})
    run = train(recipe)
    (run / ".adapter.tmp").mkdir()  # an adapter write cut short: train's own
    (run / "checkpoints/.checkpoint-3.tmp").mkdir()
    (run / ".merged.tmp").mkdir()  # a `merge --output RUN/merged` at work beside the run: not train's
    (run / ".merged.tmp/model.safetensors").write_text("half")
    (run / "checkpoints/notes.txt").write_text("mine\n")
    kept = {k: v for k, v in snapshot(run).items() if k.startswith((".merged.tmp", "checkpoints/notes.txt"))}
    train(with_train(recipe, max_steps=3))
    assert not (run / ".adapter.tmp").exists() and not (run / "checkpoints/.checkpoint-3.tmp").exists()
    assert {k: v for k, v in snapshot(run).items() if k in kept} == kept


def test_keep_best_publishes_the_checkpoint_with_the_lowest_eval_loss_and_a_resume_keeps_it(make_recipe, tmp_path):
    """Trained on one row and evaluated on another, the tiny twin overfits: its eval loss is lowest at step 4 of 16.
    adapter/ is that checkpoint, which save_total_limit: 1 never deleted, and a run stopped at step 6 and extended to
    16 picks the same one."""
    (tmp_path / "eval.json").write_text(json.dumps([ROW_WITH_INPUT]))
    recipe = make_recipe(rows=[ROW], data={"eval_path": str(tmp_path / "eval.json")},
                         train={"max_steps": 6, "batch_size": 1, "learning_rate": 5e-3, "lr_scheduler": "constant",
                                "logging_steps": 2, "save_steps": 2, "save_total_limit": 1, "keep_best": "eval_loss"})
    run = train(recipe)
    run = train(with_train(recipe, max_steps=16))
    evals = {r["step"]: r["eval_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r}
    best_step = min(evals, key=evals.get)
    assert sorted(evals) == list(range(2, 17, 2)) and best_step not in (2, 16)  # a real choice, not the last one
    assert json.loads((run / "best.json").read_text()) == {"metric": "eval_loss", "step": best_step,
                                                          "score": pytest.approx(evals[best_step]), "last_step": 16}
    assert {p.name for p in (run / "checkpoints").iterdir()} == {f"checkpoint-{best_step}", "checkpoint-16"}
    published = load_file(run / "adapter/adapter_model.safetensors")
    best = load_file(run / f"checkpoints/checkpoint-{best_step}/adapter_model.safetensors")
    last = load_file(run / "checkpoints/checkpoint-16/adapter_model.safetensors")
    assert all((published[k] == best[k]).all() for k in best)
    assert any((published[k] != last[k]).any() for k in last)
