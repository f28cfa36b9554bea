"""Several processes (DDP, gloo on CPU, as the trainer's CPU mode runs it) training one run through `qlora train
--nproc-per-node` and torchrun's own launcher: the same result as one process, one writer, signals, resumes,
several machines (simulated on 127.0.0.1)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from conftest import recipe_for
from qlora.cli import app
from qlora import distributed
from qlora.config import dump_recipe
from qlora.errors import RunInterrupted
from qlora.train import train

# rows of different lengths, so which rows a step holds matters
ROWS = [{"instruction": f"Write a function that returns {i} times x.", "input": "",
         "output": f"def times_{i}(x):\n    return {i} * x" + "  # scaled" * (i % 4)} for i in range(16)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recipe(directory: Path, model_dir: Path, **train_section) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    recipe = recipe_for(directory, model_dir, ROWS, train={"batch_size": 1, "logging_steps": 1, **train_section})
    path = directory / "recipe.yaml"
    path.write_text(dump_recipe(recipe))
    return path


def qlora_train(recipe: Path, *flags: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qlora", "train", str(recipe), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def metrics_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def adapter(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_model):
    """4 steps of 2 processes x batch 1, a checkpoint every 2 steps."""
    recipe = write_recipe(tmp_path_factory.mktemp("ddp"), tiny_model("gemma"))
    code, err = finish(qlora_train(recipe, "--nproc-per-node", "2", "--master-port", str(free_port())))
    assert code == 0, err[-3000:]
    return recipe.parent / "run", err


def test_two_processes_train_exactly_as_one_accumulating_the_same_rows(two_process_run, tmp_path, tiny_model):
    run, err = two_process_run
    # one process, 2 micro-batches of 1 per step: the same rows per step, the same shapes, the same loss scale, and
    # one thread as each rank has (torchrun's OMP_NUM_THREADS=1): bf16 matmuls round by how the threads split them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = train(recipe_for(tmp_path, tiny_model("gemma"), ROWS, train={"batch_size": 1, "grad_accum": 2,
                                                                               "logging_steps": 1}))
    finally:
        torch.set_num_threads(threads)
    two, one = adapter(run), adapter(alone)
    assert max((two[k] - one[k]).abs().max().item() for k in one) <= 1e-5
    assert max(v.abs().max().item() for v in one.values()) > 1e-3  # it trained
    # rank 0 alone writes: one metrics line per step, one console, every rank's RNG in the checkpoint
    assert metrics_steps(run) == [1, 2, 3, 4]
    assert err.count("2 processes (DDP): effective batch 1 x 1 x 2 = 2 examples per optimizer step") == 1
    assert err.count("done: adapter saved") == 1
    assert {p.name for p in (run / "checkpoints" / "checkpoint-4").glob("rng_state*")} == {
        "rng_state.json", "rng_state.safetensors", "rng_state_1.json", "rng_state_1.safetensors"}


def test_two_processes_see_the_tokens_and_loss_of_one_with_the_whole_batch(two_process_run, tmp_path, tiny_model):
    run, _ = two_process_run
    alone = train(recipe_for(tmp_path, tiny_model("gemma"), ROWS, train={"batch_size": 2, "logging_steps": 1}))
    two = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (alone / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens_seen"] for r in two] == [r["tokens_seen"] for r in one]
    assert all(abs(a["loss"] - b["loss"]) <= 0.01 * b["loss"] for a, b in zip(two, one))


def test_sigterm_to_the_launcher_stops_every_rank_after_one_step_and_the_run_resumes(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("gemma"), max_steps=200, save_steps=1000)
    run, port = recipe.parent / "run", str(free_port())
    launcher = qlora_train(recipe, "--nproc-per-node", "2", "--master-port", port)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    code, err = finish(launcher)
    assert code == 143, err[-3000:]
    steps = metrics_steps(run)
    stopped = steps[-1]
    assert stopped < 200 and [p.name for p in (run / "checkpoints").iterdir()] == [f"checkpoint-{stopped}"]
    assert err.count(f"stopped: SIGTERM after step {stopped}: ") == 1
    assert not (run / "adapter").exists()

    # 200 steps only so that the signal comes first; the resume trains 2 more (the run length may change)
    code, err = finish(qlora_train(recipe, "--set", f"train.max_steps={stopped + 2}", "--nproc-per-node", "2",
                                   "--master-port", str(free_port())))
    assert code == 0, err[-3000:]
    assert err.count(f"resuming from {run / 'checkpoints' / f'checkpoint-{stopped}'} (step {stopped})") == 1
    assert metrics_steps(run) == list(range(1, stopped + 3))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


class OwnCopyAfterTheAgreement(TrainerCallback):
    """This rank's copy of the launcher's SIGTERM arrives just after the ranks agreed to stop on another's."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_training_stop and state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_ranks_own_copy_of_the_signal_after_the_agreement_stops_it_with_the_others(tmp_path, tiny_model,
                                                                                     monkeypatch):
    # another rank got SIGTERM during step 2; this one's copy comes while it was in the agreeing all-reduce: it
    # must write the checkpoint with the others, not exit at once and leave them waiting in a collective
    steps = iter(range(1, 1000))
    monkeypatch.setattr(distributed, "largest", lambda value, device: signal.SIGTERM if next(steps) == 2 else value)
    recipe = recipe_for(tmp_path, tiny_model("gemma"), ROWS, train={"max_steps": 50, "logging_steps": 1})
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted, match="SIGTERM after step 2") as stopped:
        train(recipe, callbacks=[OwnCopyAfterTheAgreement()])
    assert stopped.value.exit_code == 143
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_two_machines_with_a_c10d_rendezvous_train_one_run(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("gemma"))
    endpoint = f"127.0.0.1:{free_port()}"
    machines = [qlora_train(recipe, "--nproc-per-node", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint)
                for _ in range(2)]
    results = [finish(machine) for machine in machines]
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    assert sum(err.count("2 processes (DDP)") for _, err in results) == 1
    assert metrics_steps(recipe.parent / "run") == [1, 2, 3, 4]


def test_a_bad_recipe_under_two_processes_is_one_error_line(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("gemma"))
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "data.json"), str(tmp_path / "missing.json")))
    code, err = finish(qlora_train(recipe, "--nproc-per-node", "2", "--master-port", str(free_port())))
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: data.path: file not found: {tmp_path / 'missing.json'}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, env, message", [
    (["--nproc-per-node", "0"], {}, "--nproc-per-node 0: give 1 to "),
    (["--nproc-per-node", "2"], {"WORLD_SIZE": "2"}, "--nproc-per-node: this command already runs under torchrun"),
], ids=["zero", "under-torchrun"])
def test_launcher_flags_are_checked(tmp_path, tiny_model, monkeypatch, flags, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    recipe = write_recipe(tmp_path, tiny_model("gemma"))
    result = CliRunner().invoke(app, ["train", str(recipe), *flags])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {message}")
    assert not (tmp_path / "run").exists()
