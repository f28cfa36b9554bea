"""qlora eval: the pass@k estimator, problem formats, and a tiny twin that memorised our problems' solutions scoring
pass@1 = 1.0 against its base's lower score, with held-out loss, in the real command."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import recipe_for, snapshot
from qlora.cli import app
from qlora.errors import UserError
from qlora.evaluate import extract_code, pass_at_k, read_done, read_problems
from qlora.train import train

PROBLEMS = Path(__file__).resolve().parents[1] / "src" / "qlora" / "sample_data" / "eval_problems.jsonl"


def brute_force(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (10, 8, 5), (10, 0, 3), (10, 10, 3), (200, 13, 100),
                                     (5, 4, 2), (1, 1, 1), (1, 0, 1)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(10, 8, 5) == 1.0  # n - c < k: every draw of k holds a pass
    assert pass_at_k(10, 0, 10) == 0.0
    with pytest.raises(ValueError, match="pass@11 needs at least 11 samples"):
        pass_at_k(10, 3, 11)  # k > n: undefined
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_both_problem_formats_build_programs_that_pass_with_their_solutions():
    problems = read_problems(PROBLEMS)
    raw = [json.loads(line) for line in PROBLEMS.read_text().splitlines()]
    assert [p.humaneval for p in problems] == [True, True, False, False]
    from qlora.sandbox import run_program

    for problem, row in zip(problems, raw):
        whole = row["prompt"] + row["canonical_solution"] if problem.humaneval else row["code"]
        assert run_program(problem.program(f"Here it is:\n```python\n{whole}\n```\nDone.", "instruct")).result == \
            "passed"
        if problem.humaneval:
            assert run_program(problem.program(row["canonical_solution"], "completion")).result == "passed"
            assert problem.instruction().endswith(problem.prompt)
        else:
            assert row["test_list"][0] in problem.instruction()


def test_code_is_taken_from_the_first_fence():
    assert extract_code("text\n```python\na = 1\n```\n```\nb = 2\n```") == "a = 1\n"
    assert extract_code("```\nleft open") == "left open"
    assert extract_code("a = 1") == "a = 1"


@pytest.mark.parametrize("content, message", [
    ('{"task_id": "x", "prompt": "p"}\n', "row 0 (line 1) is neither a HumanEval problem"),
    ('{"text": "t", "test_list": []}\n', "row 0 (line 1) is neither"),
    ("{oops\n", "line 1 is not valid JSON"),
    ("\n", "holds no problems"),
    ('{"task_id": 1, "text": "t", "test_list": ["assert 1"]}\n' * 2, "row 1 (line 2): task_id 1 appears twice"),
])
def test_bad_problem_files_are_named(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=re.escape(message)):
        read_problems(path)


def test_nothing_runs_without_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.delenv("QLORA_ALLOW_CODE_EVAL", raising=False)
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "qlora/0", "completion": "    return a + b\n"}) + "\n")
    result = CliRunner().invoke(app, ["eval", "--problems", str(PROBLEMS), "--samples", str(samples),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--allow-code-execution" in result.stderr
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("QLORA_ALLOW_CODE_EVAL", "1")
    result = CliRunner().invoke(app, ["eval", "--problems", str(PROBLEMS), "--samples", str(samples),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["pass@1"] == 0.25  # 1 of the 4 problems


def test_problems_without_samples_are_scored_as_failed_and_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_ALLOW_CODE_EVAL", "1")
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "qlora/0", "completion": "    return a + b\n"}) + "\n")
    result = CliRunner().invoke(app, ["eval", "--problems", str(PROBLEMS), "--samples", str(samples),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["pass@1"], summary["problems"], summary["without_samples"]) == (0.25, 4, 3)  # 1 of 4, not 1.0
    assert "3 of 4 problems have no samples, scored as failed" in result.stderr
    assert re.search(r"pass@1\s+.\s+0\.250", result.stdout) and re.search(r"problems\s+.\s+4", result.stdout)


@pytest.mark.parametrize("tail, kept", [(b'{"model": "ru', True), (b'{"accuracy": 0.93}', False)])
def test_a_samples_line_cut_short_is_dropped_only_when_it_is_a_sample(tmp_path, tail, kept):
    path = tmp_path / "samples.jsonl"
    whole = json.dumps({"model": "run", "task_id": "qlora/0", "sample": 0, "completion": "", "result": "failed",
                        "error": "x"}) + "\n"
    path.write_bytes(whole.encode() + tail)
    if kept:
        assert read_done(path) == [json.loads(whole)] and path.read_text() == whole
    else:
        with pytest.raises(UserError, match="line 2 has no newline and is not the start of a line this command writes"):
            read_done(path)
        assert path.read_bytes() == whole.encode() + tail


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tiny_model):
    """A tiny Gemma trained until it answers each of our problems with its solution (instruct style)."""
    problems = read_problems(PROBLEMS)
    raw = [json.loads(line) for line in PROBLEMS.read_text().splitlines()]
    rows = [{"instruction": p.instruction(), "input": "",
             "output": r["prompt"] + r["canonical_solution"] if p.humaneval else r["code"]}
            for p, r in zip(problems, raw)]
    directory = tmp_path_factory.mktemp("memorised-problems")
    run = train(recipe_for(directory, tiny_model("gemma"), rows,
                           train={"max_steps": 150, "batch_size": 4, "lr_scheduler": "constant",
                                  "logging_steps": 50, "save_steps": 1000}))
    return run, directory / "data.json"


def qlora_eval(*args):
    return subprocess.run([sys.executable, "-m", "qlora", "eval", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_the_run_passes_its_problems_and_beats_its_base_and_resumes(memorised, tmp_path):
    run, _ = memorised
    out = tmp_path / "eval"
    args = [run, "--problems", PROBLEMS, "--out", out, "--compare-base", "--allow-code-execution",
            "--temperature", "0", "--max-new-tokens", "100"]
    result = qlora_eval(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@1"] == 1.0 and summary["base"]["pass@1"] < 1.0
    assert summary["problems"] == summary["base"]["problems"] == 4
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted((s["model"], s["task_id"]) for s in samples) == sorted(
        (m, f"qlora/{i}") for m in ("run", "base") for i in range(4))
    assert all(s["result"] == "passed" for s in samples if s["model"] == "run")
    assert "pass@1" in result.stdout and "base" in result.stdout
    assert "evaluating: 8/8 (100%)" in result.stderr and "Loading weights" not in result.stderr  # not a terminal

    # a rerun keeps every scored sample: nothing is generated again
    lines = (out / "samples.jsonl").read_text()
    again = qlora_eval(*args)
    assert again.returncode == 0 and (out / "samples.jsonl").read_text() == lines

    # an eval of another model, problems file or sampling into the same --out is refused before a model loads, and
    # the eval there is left as it is (it was reported as the other run's scores, or a KeyError)
    other = tmp_path / "other-run"
    shutil.copytree(run, other)
    with open(other / "adapter/adapter_model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(PROBLEMS.read_text().splitlines(keepends=True)[:3]))
    samples_file = tmp_path / "given.jsonl"
    samples_file.write_text(json.dumps({"task_id": "qlora/0", "completion": "pass"}) + "\n")
    before = snapshot(out)
    for changed, named in (([other, *args[1:]], "weights sha256"), ([*args[:2], fewer, *args[3:]], "problems sha256"),
                           ([*args[:-4], "--temperature", "0.7", "--max-new-tokens", "100"], "temperature 0.0 there, "
                                                                                            "0.7 now"),
                           (["--samples", samples_file, *args[1:5], "--allow-code-execution"], "samples sha256")):
        refused = qlora_eval(*changed)
        lines = refused.stderr.splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and f"--out: {out} holds the eval of {run}" in lines[0] \
            and named in lines[0], refused.stderr
    assert snapshot(out) == before


def test_held_out_loss_is_lower_with_the_adapter(memorised, tmp_path):
    run, rows = memorised
    result = qlora_eval(run, "--loss", rows, "--out", tmp_path / "loss")
    assert result.returncode == 0, result.stderr[-3000:]
    loss = json.loads((tmp_path / "loss" / "loss.json").read_text())
    assert loss["run"]["loss"] < loss["base"]["loss"] / 10
    assert loss["run"]["perplexity"] == pytest.approx(math.exp(loss["run"]["loss"]))
    assert "held-out loss on 4 examples" in result.stdout
    assert "held-out loss (run, then base): 8/8 (100%)" in result.stderr
