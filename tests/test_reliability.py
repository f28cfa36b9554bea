"""Runs that survive: exact resume, atomic checkpoints, signals, the NaN guard, failed writes, no pickle.

Faults are real: exceptions and a full disk injected in the middle of a checkpoint save, SIGINT and
SIGTERM sent to a `qlora train` process, a NaN in the loss, an inf in the gradients.
"""

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from conftest import ROW, ROW_WITH_INPUT, recipe_for
from qlora.checkpoint import QLoRATrainer, complete_checkpoints
from qlora.config import dump_recipe, load_recipe
from qlora.errors import RunFailed, RunInterrupted, UserError
from qlora.model import load_quantized_base
from qlora.train import train

QLORA = [sys.executable, "-m", "qlora.cli"]
ROWS = [dict(ROW, instruction=f"{ROW['instruction']} ({i})") for i in range(5)] + [ROW_WITH_INPUT]


def names(directory):
    """Entry names in natural order: checkpoint-5 before checkpoint-10."""
    return sorted((p.name for p in directory.iterdir()),
                  key=lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(directory):
    return load_file(directory / "adapter_model.safetensors")


def assert_checkpoint_loads(checkpoint, step):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == step
    weights = adapter(checkpoint)
    assert weights and all(w.dtype == torch.float32 and w.isfinite().all() for w in weights.values())
    assert load_file(checkpoint / "optimizer.safetensors") and load_file(checkpoint / "rng_state.safetensors")


class SignalAt(TrainerCallback):
    """Sends `signum` to this very process as optimizer step `step` begins, as a user or a scheduler would."""

    def __init__(self, step, signum=signal.SIGINT):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


def test_interrupted_and_resumed_training_equals_uninterrupted_training(tmp_path, tiny_model):
    def recipe(name):
        (tmp_path / name).mkdir(exist_ok=True)
        # dropout on, so the RNG state must be restored too; 6 rows, batch 2, grad_accum 2: an epoch is
        # 2 optimizer steps (2 batches, then 1), so step 5 is mid-epoch and resuming skips seen batches
        return recipe_for(tmp_path / name, tiny_model("gemma"), ROWS, lora={"dropout": 0.1},
                          train={"max_steps": 12, "grad_accum": 2, "logging_steps": 1, "save_steps": 4,
                                 "lr_scheduler": "cosine", "warmup_ratio": 0.1})

    full = train(recipe("full"))
    with pytest.raises(RunInterrupted, match="SIGINT after step 5") as stopped:
        train(recipe("resumed"), callbacks=[SignalAt(5)])
    assert stopped.value.exit_code == 130
    assert names(tmp_path / "resumed/run/checkpoints") == ["checkpoint-4", "checkpoint-5"]
    resumed = train(recipe("resumed"))

    a, b = adapter(full / "adapter"), adapter(resumed / "adapter")
    assert a.keys() == b.keys() and all(w.dtype == torch.float32 for w in a.values())
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max abs difference between the adapters: {difference:.3g}")
    assert difference < 1e-6
    assert [m["step"] for m in metrics(resumed)] == list(range(1, 13))  # one continuous log
    assert [m["loss"] for m in metrics(resumed)] == pytest.approx([m["loss"] for m in metrics(full)], abs=1e-6)


def test_checkpoints_hold_only_safetensors_and_json_and_resume_without_pickle(make_recipe, monkeypatch):
    run = train(make_recipe(train={"max_steps": 2}))

    def refuse(*args, **kwargs):
        raise AssertionError("resuming used pickle")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    train(make_recipe(train={"max_steps": 4}))  # resumes from checkpoint-2

    files = [p for p in run.rglob("*") if p.is_file() and p.name != ".lock"]  # .lock: the PID of a train using it
    # README.md is peft's model card (text), tokenizer.model a SentencePiece protobuf; nothing is a pickle or a torch zip
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".jsonl", ".yaml", ".md", ".model"}
    assert not [p for p in files if p.read_bytes()[:1] == b"\x80" or p.read_bytes()[:2] == b"PK"]
    checkpoint = run / "checkpoints/checkpoint-4"
    assert sorted(p.name for p in checkpoint.iterdir() if p.suffix != ".md") == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.json", "optimizer.safetensors",
        "rng_state.json", "rng_state.safetensors", "scheduler.json", "trainer_state.json"]
    optimizer = load_file(checkpoint / "optimizer.safetensors")
    assert {t.item() for name, t in optimizer.items() if name.endswith(".step")} == {4.0}  # Adam's step count
    assert json.loads((checkpoint / "scheduler.json").read_text())["last_epoch"] == 4


def test_resume_refuses_another_recipe_and_touches_nothing(make_recipe, capsys):
    run = train(make_recipe(train={"max_steps": 2}))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}

    changed = make_recipe(lora={"r": 8}, train={"max_steps": 2, "learning_rate": 0.02})
    with pytest.raises(UserError) as refused:
        train(changed)
    for part in ("lora.r (16 -> 8)", "train.learning_rate (0.01 -> 0.02)", "--overwrite"):
        assert part in str(refused.value)
    with pytest.raises(UserError, match="already at step 2"):
        train(make_recipe(train={"max_steps": 1}))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before

    train(make_recipe(train={"max_steps": 4}))  # only the run length changed: the run goes on
    assert f"resuming from {run / 'checkpoints/checkpoint-2'} (step 2)" in capsys.readouterr().err
    assert [m["step"] for m in metrics(run)] == [2, 4]

    train(changed, overwrite=True)  # the explicit way to start over
    assert load_recipe(run / "recipe.yaml").lora.r == 8
    assert [m["step"] for m in metrics(run)] == [2] and names(run / "checkpoints") == ["checkpoint-2"]


def test_a_resume_where_auto_would_choose_otherwise_is_refused_and_a_moved_device_is_noted(make_recipe, capsys):
    run = train(make_recipe(train={"max_steps": 2}))
    recorded = load_recipe(run / "recipe.yaml").quantization.compute_dtype
    other = "float32" if recorded == "bfloat16" else "bfloat16"
    # as on a machine where auto resolves to the other dtype: the recipe.yaml records what this one chose
    with pytest.raises(UserError) as refused:
        train(make_recipe(quantization={"compute_dtype": other}, train={"max_steps": 4}))
    message = str(refused.value)
    assert f'quantization.compute_dtype ("{recorded}" -> "{other}") (quantization.compute_dtype as this' in message

    starts = json.loads((run / "environment.json").read_text())
    (run / "environment.json").write_text(json.dumps([{**starts[0], "device": "cuda:0 (NVIDIA T4, capability 7.5)"}]))
    train(make_recipe(train={"max_steps": 4}))
    assert "note: the run trained on cuda:0 (NVIDIA T4, capability 7.5) and continues on cpu" in capsys.readouterr().err
    assert [start["step"] for start in json.loads((run / "environment.json").read_text())] == [0, 2]


def test_a_checkpoint_save_that_fails_midway_is_never_resumed(make_recipe, monkeypatch, capsys):
    recipe = make_recipe(train={"max_steps": 8, "save_total_limit": 1})
    save_rng_state = QLoRATrainer._save_rng_state

    def fail_at_step_6(self, output_dir):
        if self.state.global_step == 6:
            raise RuntimeError("injected failure in the middle of a checkpoint save")
        save_rng_state(self, output_dir)

    monkeypatch.setattr(QLoRATrainer, "_save_rng_state", fail_at_step_6)
    with pytest.raises(RuntimeError, match="injected"):
        train(recipe)
    monkeypatch.undo()
    checkpoints = Path(recipe.train.output_dir) / "checkpoints"
    # save_total_limit=1 kept the newest complete checkpoint; the failed one left nothing
    assert names(checkpoints) == ["checkpoint-4"]
    assert_checkpoint_loads(checkpoints / "checkpoint-4", 4)

    # what a process killed mid-save leaves: a temporary checkpoint, and one missing a file
    shutil.copytree(checkpoints / "checkpoint-4", checkpoints / ".checkpoint-6.tmp")
    shutil.copytree(checkpoints / "checkpoint-4", checkpoints / "checkpoint-6")
    (checkpoints / "checkpoint-6/trainer_state.json").unlink()
    capsys.readouterr()
    train(recipe)
    assert f"resuming from {checkpoints / 'checkpoint-4'} (step 4)" in capsys.readouterr().err
    assert names(checkpoints) == ["checkpoint-8"]
    assert [m["step"] for m in metrics(checkpoints.parent)] == [2, 4, 6, 8]


def test_a_full_disk_fails_with_one_message_and_keeps_earlier_checkpoints(make_recipe, monkeypatch):
    def disk_full_at_step_4(tensors, path, *args, **kwargs):
        if ".checkpoint-4.tmp" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr("qlora.checkpoint.save_file", disk_full_at_step_4)
    recipe = make_recipe(train={"max_steps": 6})
    with pytest.raises(RunFailed, match="No space left on device") as failed:
        train(recipe)
    run = Path(recipe.train.output_dir)
    assert f"{run / 'checkpoints/checkpoint-2'} and the checkpoints before it are intact" in str(failed.value)
    assert names(run / "checkpoints") == ["checkpoint-2"] and not (run / "adapter").exists()
    assert_checkpoint_loads(run / "checkpoints/checkpoint-2", 2)


def test_an_output_dir_under_a_regular_file_exits_2_with_one_line_from_check_and_train(tmp_path, tiny_model):
    (tmp_path / "file").write_text("not a directory")
    recipe = recipe_for(tmp_path, tiny_model("gemma"), train={"output_dir": str(tmp_path / "file/run")})
    (tmp_path / "recipe.yaml").write_text(dump_recipe(recipe))
    for command in ("check", "train"):
        result = subprocess.run([*QLORA, command, str(tmp_path / "recipe.yaml")], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [f"error: train.output_dir: {tmp_path / 'file/run'} lies under "
                                              f"{tmp_path / 'file'}, which is a file; choose another directory"]
    assert (tmp_path / "file").read_text() == "not a directory"


class InfGradient(torch.autograd.Function):
    """Identity on the loss whose backward sends an infinite gradient: a finite loss, non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("poison, what", [
    (lambda loss: loss * float("nan"), "the loss is nan, so the weights were not updated"),
    (InfGradient.apply, "the gradient norm is"),
], ids=["nan-loss", "inf-gradient"])
def test_a_non_finite_loss_or_gradient_stops_at_that_step(make_recipe, monkeypatch, poison, what):
    from peft import get_peft_model_state_dict

    compute_loss = QLoRATrainer.compute_loss

    def poisoned_at_step_5(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        return poison(loss) if self.state.global_step + 1 == 5 else loss

    class KeepModel(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.model = model

    monkeypatch.setattr(QLoRATrainer, "compute_loss", poisoned_at_step_5)
    recipe, kept = make_recipe(train={"max_steps": 8}), KeepModel()
    with pytest.raises(RunFailed) as failed:
        train(recipe, callbacks=[kept])
    checkpoints = Path(recipe.train.output_dir) / "checkpoints"
    assert str(failed.value).startswith(f"step 5: {what}")
    assert str(failed.value).endswith(f"last good checkpoint: {checkpoints / 'checkpoint-4'}")
    assert names(checkpoints) == ["checkpoint-2", "checkpoint-4"]
    assert_checkpoint_loads(checkpoints / "checkpoint-4", 4)
    # stopped before the optimizer step: the weights are still exactly those of step 4
    saved, current = adapter(checkpoints / "checkpoint-4"), get_peft_model_state_dict(kept.model)
    assert saved.keys() == current.keys() and all(torch.equal(saved[k], current[k]) for k in saved)


def test_non_finite_weights_are_never_checkpointed(make_recipe):
    class PoisonWeights(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    recipe = make_recipe()
    with pytest.raises(RunFailed, match="step 2: weight .*lora_B.* is not finite, so it was not saved; no check"):
        train(recipe, callbacks=[PoisonWeights()])
    assert names(Path(recipe.train.output_dir) / "checkpoints") == []


def test_a_second_signal_exits_at_once_and_leaves_no_complete_looking_checkpoint(make_recipe, monkeypatch):
    save_rng_state = QLoRATrainer._save_rng_state

    def second_signal_mid_save(self, output_dir):
        if self.state.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        save_rng_state(self, output_dir)

    monkeypatch.setattr(QLoRATrainer, "_save_rng_state", second_signal_mid_save)
    recipe = make_recipe(train={"max_steps": 50})
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background by a non-interactive shell
    with pytest.raises(SystemExit) as exited:
        train(recipe, callbacks=[SignalAt(3, signal.SIGTERM)])  # the first one asks for a checkpoint at step 3
    assert exited.value.code == 143
    checkpoints = Path(recipe.train.output_dir) / "checkpoints"
    assert names(checkpoints) == ["checkpoint-2"]
    assert_checkpoint_loads(checkpoints / "checkpoint-2", 2)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_a_signal_before_the_training_loop_exits_at_once(make_recipe, monkeypatch):
    def signal_while_loading(recipe):
        os.kill(os.getpid(), signal.SIGINT)
        return load_quantized_base(recipe)

    monkeypatch.setattr("qlora.train.load_quantized_base", signal_while_loading)
    recipe = make_recipe()
    with pytest.raises(SystemExit) as exited:
        train(recipe)
    assert exited.value.code == 130
    assert names(Path(recipe.train.output_dir)) == [".lock", ".qlora.json", "environment.json", "recipe.yaml"]


def start(recipe_file, stderr_file):
    """`qlora train` in a child that ignores SIGINT, as a background job of a non-interactive shell does."""
    with open(stderr_file, "w") as err:
        return subprocess.Popen([*QLORA, "train", str(recipe_file)], stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


def wait_for(process, condition, stderr_file, timeout=90):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"exited or timed out before the condition held: {stderr_file.read_text()}")
        time.sleep(0.05)


def logged_steps(run):
    path = run / "metrics.jsonl"
    complete_lines = path.read_text().split("\n")[:-1] if path.exists() else []  # the last may be half-written
    return [json.loads(line)["step"] for line in complete_lines]


def test_sigint_and_sigterm_stop_a_real_run_with_a_checkpoint_and_it_resumes(tmp_path, tiny_model):
    recipe = recipe_for(tmp_path, tiny_model("gemma"), ROWS,
                        train={"max_steps": 2000, "save_steps": 1000, "logging_steps": 1})
    recipe_file, run = tmp_path / "recipe.yaml", tmp_path / "run"
    recipe_file.write_text(dump_recipe(recipe))
    checkpoints = run / "checkpoints"

    err = tmp_path / "first.err"
    first = start(recipe_file, err)
    wait_for(first, lambda: len(logged_steps(run)) >= 3, err)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 130, err.read_text()
    [newest] = complete_checkpoints(checkpoints)
    k = int(newest.name.split("-")[1])
    assert_checkpoint_loads(newest, k)
    assert f"stopped: SIGINT after step {k}: {newest} is complete" in err.read_text()

    err = tmp_path / "second.err"
    second = start(recipe_file, err)  # the same command resumes
    wait_for(second, lambda: len(logged_steps(run)) >= k + 3, err)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 143, err.read_text()
    assert f"resuming from {newest} (step {k})" in err.read_text()
    m = int(complete_checkpoints(checkpoints)[-1].name.split("-")[1])
    assert m > k and names(checkpoints) == [f"checkpoint-{k}", f"checkpoint-{m}"]
    assert_checkpoint_loads(checkpoints / f"checkpoint-{m}", m)
    assert logged_steps(run) == list(range(1, m + 1))


def test_fp16_loss_scale_overflows_are_skipped_until_they_persist():
    """fp16 trains on CUDA only (accelerate makes no GradScaler on CPU), so the decision is tested on its own:
    with a scaler an overflow is a skipped step, not a failure, until MAX_OVERFLOWS come in a row."""
    from types import SimpleNamespace

    from qlora.checkpoint import MAX_OVERFLOWS

    fp16 = SimpleNamespace(accelerator=SimpleNamespace(scaler=torch.amp.GradScaler("cpu")), overflows=0)
    assert all(QLoRATrainer.loss_scale_overflow(fp16) for _ in range(MAX_OVERFLOWS - 1))
    assert not QLoRATrainer.loss_scale_overflow(fp16)
    bf16 = SimpleNamespace(accelerator=SimpleNamespace(scaler=None), overflows=0)
    assert not QLoRATrainer.loss_scale_overflow(bf16)


def test_out_of_gpu_memory_is_one_line_naming_the_knobs(make_recipe):
    class OutOfMemoryAt(TrainerCallback):  # what torch raises when a CUDA allocation fails
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    recipe = make_recipe(train={"max_steps": 4, "save_steps": 2})
    with pytest.raises(RunFailed) as failed:
        train(recipe, callbacks=[OutOfMemoryAt()])
    message = str(failed.value)
    assert message.startswith("out of GPU memory: lower train.batch_size=2 (raise train.grad_accum=1 to keep")
    assert "data.max_length=512" in message and "lora.r=16" in message and "`qlora check`" in message
    assert message.endswith(f"rerun resumes from {Path(recipe.train.output_dir) / 'checkpoints/checkpoint-2'}")
