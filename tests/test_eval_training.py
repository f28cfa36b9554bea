"""train.eval_problems: a tiny twin trained on two problems' solutions, answering them as it trains (pass@1 from 0 at
the base to 1), keep_best: pass@1 publishing the first checkpoint to reach the best (and never a worse last one),
early stopping, a resume after a signal in the middle of an eval, the same eval split over two processes, the
refusal to run code without the opt-in, and the report's curve."""

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from conftest import recipe_for, snapshot
from qlora import evaluate
from qlora.cli import app
from qlora.errors import RunInterrupted, UserError
from qlora.evaluate import read_problems
from qlora.train import train

SAMPLE_PROBLEMS = Path(__file__).resolve().parents[1] / "src" / "qlora" / "sample_data" / "eval_problems.jsonl"
LINES = SAMPLE_PROBLEMS.read_text().splitlines(keepends=True)
TRAINED = [0, 2]  # a HumanEval and an MBPP problem with short solutions (32 and 18 tokens with the twin's tokenizer)
EVERY = 4  # steps between evals, and between checkpoints


def solution_rows(path: Path) -> list[dict]:
    """Training rows answering each problem of `path` with its solution, as `qlora eval` asks it (instruct style)."""
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    return [{"instruction": p.instruction(), "input": "",
             "output": r["prompt"] + r["canonical_solution"] if p.humaneval else r["code"]}
            for p, r in zip(read_problems(path), raw)]


def problems_file(directory: Path, indices) -> Path:
    path = directory / "problems.jsonl"
    path.write_text("".join(LINES[i] for i in indices))
    return path


def recipe(directory: Path, model_dir: Path, **train_section):
    """Two problems memorised at lr 1e-2, answered every EVERY steps, the best kept."""
    directory.mkdir(parents=True, exist_ok=True)
    problems = problems_file(directory, TRAINED)
    return recipe_for(directory, model_dir, solution_rows(problems), train={
        "max_steps": 16, "batch_size": 2, "lr_scheduler": "constant", "logging_steps": 1, "save_steps": EVERY,
        "save_total_limit": 1, "eval_problems": str(problems), "allow_code_execution": True, "keep_best": "pass@1",
        "eval_max_new_tokens": 40, **train_section})


def records(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r}


class ForgetAtLastStep(TrainerCallback):
    """Zeroes the adapter's B matrices right after the last optimizer step (the adapter becomes the base again), so
    the last checkpoint scores worse than the earlier ones."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == state.max_steps:  # counted up after this hook
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.data.zero_()


@pytest.fixture(scope="module")
def memorising(tmp_path_factory, tiny_model):
    """16 steps, an eval every 4 (and at step 0), the last step's adapter wiped; and its stdout/stderr."""
    directory = tmp_path_factory.mktemp("memorising")
    return train(recipe(directory, tiny_model("gemma")), callbacks=[ForgetAtLastStep()])


def test_pass_at_1_rises_from_the_base_and_the_first_best_checkpoint_is_published(memorising):
    run = memorising
    scores = records(run, "pass@1")
    assert sorted(scores) == [0, 4, 8, 12, 16]
    first = min(step for step, score in scores.items() if score == 1.0)
    assert scores[0] == 0.0 and 0 < first < 16 and scores[16] == 0.0  # the base fails, training solves, wiped fails
    assert json.loads((run / "best.json").read_text()) == {"metric": "pass@1", "step": first, "score": 1.0,
                                                          "last_step": 16}
    # save_total_limit 1 kept the best beside the last; adapter/ is the best, not the (worse) last
    assert {p.name for p in (run / "checkpoints").iterdir()} == {f"checkpoint-{first}", "checkpoint-16"}
    published = load_file(run / "adapter/adapter_model.safetensors")
    best = load_file(run / f"checkpoints/checkpoint-{first}/adapter_model.safetensors")
    assert all(torch.equal(published[k], best[k]) for k in best)
    # metrics.jsonl: the loss of every step, and each eval's passed answers and time
    assert sorted(records(run, "loss")) == list(range(1, 17))
    assert records(run, "passed") == {step: round(2 * score) for step, score in scores.items()}


def test_the_evals_do_not_change_training(memorising, tmp_path, tiny_model):
    """The same recipe without eval_problems trains exactly the same losses: the eval restores the RNG and the train
    mode it found, and the 4-bit layers keep the layout their backward needs (bitsandbytes repacks them for a CPU
    inference kernel without a backward in eval mode). So does the trainer's own eval loss, on the same rows."""
    steps = range(1, EVERY + 1)
    plain = recipe(tmp_path / "plain", tiny_model("gemma"), max_steps=EVERY, eval_problems=None,
                   keep_best="none", allow_code_execution=False)
    expected = records(train(plain), "loss")
    assert sorted(expected) == list(steps)
    assert {step: records(memorising, "loss")[step] for step in steps} == expected
    (tmp_path / "eval-loss").mkdir()
    (tmp_path / "eval.json").write_text(json.dumps(solution_rows(SAMPLE_PROBLEMS)[1:2]))
    evaluated = recipe_for(tmp_path / "eval-loss", tiny_model("gemma"), solution_rows(SAMPLE_PROBLEMS)[::2],
                           data={"eval_path": str(tmp_path / "eval.json")},
                           train={**plain.train.model_dump(exclude={"output_dir"}), "eval_steps": 2})
    run = train(evaluated)
    assert sorted(records(run, "eval_loss")) == [2, 4] and records(run, "loss") == expected


def test_early_stopping_after_a_signal_in_an_eval_resumes_to_the_same_best(memorising, tmp_path, tiny_model,
                                                                         monkeypatch, capsys):
    """SIGTERM while the first perfect eval runs: that eval ends, its checkpoint is written, the run stops (143);
    the same command resumes and stops early one eval later (patience 1), publishing that first perfect checkpoint,
    with the losses and scores of the uninterrupted run."""
    scores = records(memorising, "pass@1")
    first = min(step for step, score in scores.items() if score == 1.0)
    patient = recipe(tmp_path, tiny_model("gemma"), max_steps=40, early_stopping_patience=1)
    calls, run_program = [], evaluate.run_program
    before = 2 * len(range(0, first, EVERY))  # sandbox runs before the eval at step `first`

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == before + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return run_program(*args, **kwargs)

    monkeypatch.setattr(evaluate, "run_program", signalled)
    with pytest.raises(RunInterrupted, match=f"SIGTERM after step {first}"):
        train(patient)
    run = Path(patient.train.output_dir)
    assert records(run, "pass@1")[first] == 1.0  # the eval in progress finished and was recorded
    monkeypatch.setattr(evaluate, "run_program", run_program)
    capsys.readouterr()
    train(patient)
    err = capsys.readouterr().err
    assert f"resuming from {run / 'checkpoints' / f'checkpoint-{first}'}" in err
    assert (f"early stopping at step {first + EVERY}: pass@1 has not beaten 1.0000 (step {first}) in the 1 eval(s) "
            "since (train.early_stopping_patience: 1)") in err
    assert records(run, "pass@1") == {s: v for s, v in scores.items() if s <= first + EVERY}
    losses = records(memorising, "loss")
    assert records(run, "loss") == {s: v for s, v in losses.items() if s <= first + EVERY}
    assert json.loads((run / "best.json").read_text()) == {"metric": "pass@1", "step": first, "score": 1.0,
                                                          "last_step": first + EVERY}
    train(patient)
    assert "nothing to do" in capsys.readouterr().err  # the early-stopped run is complete
    Path(patient.train.eval_problems).write_text(LINES[0])  # its best score is of other problems
    with pytest.raises(UserError, match="or train.eval_problems: the problems differ from those"):
        train(patient)


def shard_worker(rank: int, port: int, run: str, problems: str, out: str) -> None:
    """One of two gloo processes (torchrun's variables set by hand), answering its share of the problems."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from qlora import distributed

    distributed.start(cpu=True)
    rows = answer_all(run, problems)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    distributed.finish()


def answer_all(run: str, problems: str) -> list[dict]:
    from qlora.generate import load_run
    from qlora.sandbox import Limits

    torch.set_num_threads(1)  # as each rank has: bf16 matmuls round by how the threads split them
    loaded = load_run(run)
    style, sampling, _ = evaluate.training_eval_settings(loaded.recipe)
    return evaluate.evaluate_shard(loaded, read_problems(Path(problems)), 1, sampling, style, Limits(), 2)


def test_two_processes_split_the_problems_and_gather_what_one_process_finds(memorising, tmp_path):
    """All four sample problems (two the run learnt, two it never saw): each of two processes answers every other
    one, and both end with every answer, in problem order, equal to one process's."""
    problems = problems_file(tmp_path, range(4))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(shard_worker, args=(port, str(memorising), str(problems),
                                                              str(tmp_path / "two.json")),
                                          nprocs=2, start_method="spawn")
    threads = torch.get_num_threads()
    try:
        alone = answer_all(str(memorising), str(problems))
    finally:
        torch.set_num_threads(threads)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two == alone
    assert [r["task_id"] for r in alone] == [f"qlora/{i}" for i in range(4)]
    assert [r["result"] == "passed" for r in alone] == [True, False, True, False]


def test_check_refuses_eval_problems_without_the_opt_in_and_estimates_the_eval(tmp_path, tiny_model, monkeypatch):
    monkeypatch.delenv("QLORA_ALLOW_CODE_EVAL", raising=False)
    path = tmp_path / "recipe.yaml"
    from qlora.config import dump_recipe

    path.write_text(dump_recipe(recipe(tmp_path, tiny_model("gemma"), allow_code_execution=False)))
    before = snapshot(tmp_path)
    for command in ("check", "train"):
        result = CliRunner().invoke(app, [command, str(path)])
        lines = result.stderr.splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: train.eval_problems: the run executes the code it writes for them: set "
                                   "train.allow_code_execution: true (or set QLORA_ALLOW_CODE_EVAL=1)")
    assert snapshot(tmp_path) == before
    monkeypatch.setenv("QLORA_ALLOW_CODE_EVAL", "1")
    result = CliRunner().invoke(app, ["check", str(path)])
    assert result.exit_code == 0, result.stderr
    assert "eval_problems 2 problems x 1 answers (instruct) every 4 steps: at most" in result.stdout
    assert "of the time by FLOPs" in result.stdout and "a lower bound" in result.stdout
    report = json.loads(CliRunner().invoke(app, ["check", str(path), "--json"]).stdout)["eval_problems"]
    assert report["every"] == EVERY and 0 < report["share"] < 1 and report["eval_tokens"] > 2 * 40


def test_report_draws_the_curve_and_eval_names_the_published_checkpoint(memorising, tmp_path):
    import shutil

    from qlora.report import report
    from qlora.rundir import adapter_origin

    run = tmp_path / "run"
    shutil.copytree(memorising, run)
    first = json.loads((run / "best.json").read_text())["step"]
    path, (facts,) = report([run], None)
    assert path.read_bytes().startswith(b"\x89PNG")
    assert facts["base pass@1"] == "0.000" and facts["best pass@1"] == f"1.000 at step {first}"
    assert facts["last pass@1"] == "0.000" and facts["adapter/"] == f"checkpoint-{first} (best pass@1)"
    assert adapter_origin(run) == (f"{run / 'adapter'} is checkpoint-{first}, the best pass@1 of the run's evals "
                                   "(1.0000); the run ended at step 16")


def test_one_sample_is_greedy_and_more_are_sampled_as_the_generation_section_says(tmp_path, tiny_model):
    one = recipe(tmp_path, tiny_model("gemma"))
    style, sampling, ks = evaluate.training_eval_settings(one)
    assert (style, sampling.temperature, sampling.max_new_tokens, sampling.seed, ks) == ("instruct", 0.0, 40, 42, [1])
    several = recipe_for(tmp_path, tiny_model("gemma"), train={**one.train.model_dump(), "eval_samples": 5, "seed": 7},
                         generation={"temperature": 0.2, "top_p": 0.95})
    _, sampling, ks = evaluate.training_eval_settings(several)
    assert (sampling.temperature, sampling.top_p, sampling.seed, ks) == (0.2, 0.95, 7, [1, 5])
