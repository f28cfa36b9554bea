"""The run directory: its layout, its marker and lock, and what `train` will do with it (start, resume, finish,
or nothing), decided before anything is written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from qlora.config import Recipe, dump_recipe, load_recipe, validate_recipe
from qlora.data import TEMPLATE_FILE, Template
from qlora.errors import UserError
from qlora.files import (MARKER, busy_message, check_replaceable, held_lock, lock_holder, read_marker, sha256_file,
                         write_atomic, write_json, write_marker)
from qlora.runfiles import checkpoint_problem, metrics_lines, read_environment
from qlora import runfiles

RECIPE_FILE = "recipe.yaml"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"  # event files with train.report_to: [tensorboard]
EVAL_SUMMARY = Path("eval") / "summary.json"  # where `qlora eval RUN --out RUN/eval` puts pass@k
ENVIRONMENT_FILE = "environment.json"
BEST_FILE = "best.json"  # train.keep_best: the checkpoint published as adapter/, its step and score
LOCK_FILE = ".lock"  # flock()ed by the `train` using the run; holds its PID
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md")  # what peft saves
RUN_LENGTH = ("train.max_steps", "train.epochs")  # the only recipe keys a resumed run may change
# keys whose `auto` recipe.yaml records as this machine resolved it (see plan.resolve_recipe)
RESOLVED_KEYS = ("quantization.compute_dtype", "train.optimizer", "model.attn_implementation")
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
RNG_TENSORS, RNG_JSON = "rng_state.safetensors", "rng_state.json"
SCHEDULER_JSON, SCALER_JSON, TRAINER_STATE_JSON = "scheduler.json", "scaler.json", "trainer_state.json"
# present in every complete checkpoint (scaler.json only with fp16)
CHECKPOINT_FILES = (*ADAPTER_FILES[:2], OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_JSON, RNG_TENSORS, RNG_JSON,
                    TRAINER_STATE_JSON)
# train.distributed: fsdp checkpoints are the trainer's own, written in place; it writes trainer_state.json last
FSDP_CHECKPOINT_FILES = (*ADAPTER_FILES[:2], "scheduler.pt", TRAINER_STATE_JSON)
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")  # transformers' PREFIX_CHECKPOINT_DIR and the step
# everything `train` writes at the top of a run; a start over removes these and nothing else
TRAIN_FILES = (RECIPE_FILE, ADAPTER_DIR, CHECKPOINT_DIR, METRICS_FILE, TENSORBOARD_DIR, ENVIRONMENT_FILE, BEST_FILE,
               MARKER)
# what an interrupted write of `train` leaves: files.tmp_sibling's and files.publish_dir's temporaries
LEFTOVER = re.compile(r"\.(.+)\.(tmp|old)")

console = Console(stderr=True, soft_wrap=True)  # no hard wraps: a path in a message stays one greppable line


def read_eval_summary(run: Path) -> dict | None:
    """The summary.json of a `qlora eval RUN --out RUN/eval`, or None when the run was not evaluated there."""
    path = run / EVAL_SUMMARY
    return runfiles.read_eval_summary(path) if path.is_file() else None


def read_best(run: Path) -> dict | None:
    """The run's best.json (train.keep_best), or None when it has none."""
    path = run / BEST_FILE
    return runfiles.read_best(path) if path.is_file() else None


def adapter_origin(run: Path) -> str:
    """Which checkpoint a finished run's adapter/ is: the best one by train.keep_best (best.json), or the last."""
    best, last = read_best(run), (read_marker(run).get("complete") or {}).get("step")
    ended = f"; the run ended at step {last}" if last is not None else ""
    if best is None or best["score"] is None:
        return f"{run / ADAPTER_DIR} is the run's last checkpoint{f' (step {last})' if last is not None else ''}"
    return (f"{run / ADAPTER_DIR} is checkpoint-{best['step']}, the best {best['metric']} of the run's evals "
            f"({best['score']:.4f}){ended}")


def check_run_adapter(run: Path) -> None:
    """A finished run's adapter/ readable before any model loads: the weights, adapter_config.json and template.json
    it needs; the fix names the checkpoint `train` writes it again from."""
    last = complete_checkpoints(run / CHECKPOINT_DIR)
    fix = (f"delete {run / ADAPTER_DIR} and run `qlora train {run / RECIPE_FILE}` to write it again from "
           f"{last[-1].name}" if last else "restore it from a backup, or train the run again")
    adapter = run / ADAPTER_DIR
    weights, config_file = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    for path in (weights, config_file, adapter / TEMPLATE_FILE):
        if not path.is_file():
            raise runfiles.damaged(path, "is missing", fix)
    problem = runfiles.safetensors_problem(weights)
    if problem:
        raise runfiles.damaged(weights, problem, fix)
    problem = runfiles.lora_config_problem(runfiles.read_json(config_file, fix), weights)
    if problem:
        raise runfiles.damaged(config_file, problem, fix)
    Template.load(adapter, fix)


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(path.name).group(1))


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoint-N directories in `directory`, oldest step first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and any(
        all((p / name).is_file() for name in files) for files in (CHECKPOINT_FILES, FSDP_CHECKPOINT_FILES))]
    return sorted(found, key=checkpoint_step)


def best_checkpoint(final: Path) -> dict[str, Any]:
    """The best checkpoint as the trainer's state at `final` records it (train.keep_best): its directory, step and
    score; `final` itself, with score None, when no eval ran."""
    state = json.loads((final / TRAINER_STATE_JSON).read_text(encoding="utf-8"))
    step = state.get("best_global_step")
    if not step:
        return {"checkpoint": final, "step": checkpoint_step(final), "score": None}
    return {"checkpoint": final.parent / f"checkpoint-{step}", "step": step, "score": state["best_metric"]}


def data_fingerprint(rows: list[Any], eval_rows: list[Any] | None, problems: list[Any] | None = None
                     ) -> str:
    """sha256 of the training (and eval) rows as loaded, and of train.eval_problems' problems when set (the best
    score so far is theirs): a resume on changed data is refused."""
    digest = hashlib.sha256()
    for part in (rows, eval_rows or [], *([problems] if problems else [])):
        digest.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode())
    return digest.hexdigest()


def recipe_changes(old: Recipe, new: Recipe) -> list[str]:
    """`key (old -> new)` for every recipe key whose value differs, the run length aside."""
    before, after = ({f"{section}.{key}": value for section, values in r.model_dump(mode="json").items()
                      for key, value in values.items()} for r in (old, new))
    return [f"{key} ({json.dumps(before.get(key))} -> {json.dumps(after.get(key))})"
            for key in dict.fromkeys([*before, *after])
            if key not in (*RUN_LENGTH, "train.output_dir") and before.get(key) != after.get(key)]  # a run may move


def trained_recipe(run: Path, marker: dict) -> Recipe:
    """The recipe the run trained with: recorded in its marker by record_recipe (runs from before that: its
    recipe.yaml). A recipe.yaml edited since (its sha256 differs) is refused where a value beyond the run length
    changed: the checkpoints hold what the recorded recipe trained."""
    on_disk = load_recipe(run / RECIPE_FILE)
    recorded = marker.get("recipe")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("values"), dict):
        return on_disk
    trained = validate_recipe(recorded["values"], f"{run / MARKER} recipe")
    edits = recipe_changes(trained, on_disk) if sha256_file(run / RECIPE_FILE) != recorded.get("sha256") else []
    if edits:
        raise UserError(f"train.output_dir: {run / RECIPE_FILE} was edited after the run trained with it: "
                        f"{', '.join(edits)}. A run keeps its recipe (only {' and '.join(RUN_LENGTH)} may change): "
                        "undo the edit to resume, or pass --overwrite to start over with it, or set another "
                        "train.output_dir")
    return trained


def record_recipe(run: Path, recipe: Recipe) -> None:
    """Write recipe.yaml and record in the run's marker what it holds (values and sha256), so that a later edit of
    the file is told from the recipe the run trained with."""
    text = dump_recipe(recipe)
    write_atomic(run / RECIPE_FILE, text)
    marker = {k: v for k, v in read_marker(run).items() if k not in ("written_by", "recipe")}
    write_marker(run, "train", **marker, recipe={"sha256": hashlib.sha256(text.encode()).hexdigest(),
                                                 "values": recipe.model_dump(mode="json")})


def run_in_place(recipe_file: Path, recipe: Recipe, overrides: list[str]) -> Recipe:
    """A run's own recipe.yaml trains the run where it now is: a run moved (`mv A B`) resumes at B, not at the A its
    recipe.yaml names, with one line showing the old path. --set train.output_dir still wins."""
    here = Path(recipe_file).resolve().parent
    named = Path(recipe.train.output_dir).expanduser().resolve()
    if (Path(recipe_file).name != RECIPE_FILE or named == here or read_marker(here).get("written_by") != "train"
            or any(item.partition("=")[0].strip() == "train.output_dir" for item in overrides)):
        return recipe
    console.print(f"note: {recipe_file} is the recipe of the run in {here}, which it names at {named} (moved "
                  "there since); training it where it is now")
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"output_dir": str(here)})})


def refuse_if_locked(run: Path) -> None:
    holder = lock_holder(run / LOCK_FILE)
    if holder is not None:
        raise UserError(busy_message("train.output_dir", run, holder))


def run_lock(run: Path):
    """Hold the run's lock (RUN/.lock, kept) while training: a second `train` on the run exits 2 at once."""
    run.mkdir(parents=True, exist_ok=True)
    return held_lock(run / LOCK_FILE, "train", "train.output_dir", run, remove=False)


def evals_since_best(recipe: Recipe, log_history: list[dict], best_step: int | None) -> int:
    """The evals of the train.keep_best metric after the best one, in a trainer state's log history."""
    key = "eval_loss" if recipe.train.keep_best == "eval_loss" else "eval_pass@1"
    return sum(1 for entry in log_history if key in entry and best_step and entry["step"] > best_step)


def early_stopped(recipe: Recipe, log_history: list[dict], best_step: int | None) -> bool:
    """Whether train.early_stopping_patience evals in a row have not beaten the best (a trainer state's)."""
    patience = recipe.train.early_stopping_patience
    return bool(patience and best_step and evals_since_best(recipe, log_history, best_step) >= patience)


def run_target_reached(recipe: Recipe, checkpoint: Path) -> bool:
    """Whether `checkpoint` is the end of the run the recipe asks for (max_steps, else its epochs; or early
    stopping)."""
    state = json.loads((checkpoint / TRAINER_STATE_JSON).read_text(encoding="utf-8"))
    if early_stopped(recipe, state.get("log_history") or [], state.get("best_global_step")):
        return True
    if recipe.train.max_steps:
        return state["global_step"] >= recipe.train.max_steps
    return state.get("num_train_epochs") == recipe.train.epochs and state["global_step"] >= state["max_steps"]


@dataclass
class RunPlan:
    """What `train` does with its run directory."""

    action: Literal["start", "resume", "finish", "complete"]
    checkpoint: Path | None = None  # resume from it / write the adapter from it
    step: int = 0
    skipped: list[str] = field(default_factory=list)  # one line per damaged newer checkpoint, passed over
    damaged: list[Path] = field(default_factory=list)  # those checkpoints, which train removes (it rewrites them)


def plan_run(recipe: Recipe, fingerprint: str, overwrite: bool, keep: list[Path]) -> RunPlan:
    """Decide, without writing anything, how `train` treats train.output_dir; UserError where it must refuse.

    Missing, empty, or a run with nothing trained yet: start. --overwrite on a run this command wrote (never
    one holding `keep`, the data and model it reads): start over, keeping files `train` did not write. A run with the same recipe (the run length
    aside) and data: complete when it finished this run length, finish when its newest checkpoint is the end
    but the adapter was not written, else resume from that checkpoint. Anything else is refused.
    """
    run = Path(recipe.train.output_dir)
    if run.exists() and not run.is_dir():
        raise UserError(f"train.output_dir: {run} is a file, not a directory")
    existing = next(p for p in (run, *run.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"train.output_dir: {run} lies under {existing}, which is a file; choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"train.output_dir: {existing} is not writable; choose another directory")
    if not run.exists() or not any(p.name != LOCK_FILE for p in run.iterdir()):
        return RunPlan("start")
    marker = read_marker(run)
    if overwrite:
        check_replaceable(run, "train", "train.output_dir", keep)
        return RunPlan("start")
    if marker.get("written_by") != "train" or not (run / RECIPE_FILE).is_file():
        raise UserError(f"train.output_dir: {run} is not empty and is not a qlora run; choose another directory")
    checkpoints = complete_checkpoints(run / CHECKPOINT_DIR)
    if not checkpoints and not (run / ADAPTER_DIR).exists():
        metrics = run / METRICS_FILE
        if not marker.get("complete") and not (metrics.is_file() and metrics.stat().st_size):
            return RunPlan("start")  # nothing trained yet (a start that failed early): nothing to lose or to match
        raise UserError(f"train.output_dir: {run} holds a run that trained (see its {METRICS_FILE}) but has no "
                        f"{ADAPTER_DIR}/ and no complete checkpoint to resume from; pass --overwrite to start over "
                        "(files qlora train did not write are kept) or set another train.output_dir")
    changes = recipe_changes(trained_recipe(run, marker), recipe)
    if changes:
        resolved = [key for key in RESOLVED_KEYS if any(c.startswith(key + " ") for c in changes)]
        hint = (f" ({', '.join(resolved)} as this machine resolves them: set the run's values in the recipe "
                "to continue it here)" if resolved else "")
        raise UserError(f"train.output_dir: {run} holds a run with another recipe: {', '.join(changes)}{hint}. "
                        f"Only {' and '.join(RUN_LENGTH)} may change when resuming; pass --overwrite to start over "
                        "or set another train.output_dir")
    if marker.get("data") != fingerprint:
        what = "data.path: the rows" + (" or train.eval_problems: the problems" if recipe.train.eval_problems else "")
        raise UserError(f"{what} differ from those {run} was trained on (sha256 {marker.get('data')}); "
                        "restore the data, or pass --overwrite to start over, or set another train.output_dir")
    t, done = recipe.train, marker.get("complete")
    if done and done["max_steps"] == t.max_steps and done["epochs"] == t.epochs and (run / ADAPTER_DIR).is_dir():
        return RunPlan("complete", None, done["step"])
    if not checkpoints:
        raise UserError(f"train.output_dir: {run} holds an adapter but no checkpoint to train on from; pass "
                        "--overwrite to start over or set another train.output_dir")
    damaged = []
    while checkpoints and (problem := checkpoint_problem(checkpoints[-1])):
        damaged.append((checkpoints.pop(), problem))
    if not checkpoints:
        raise UserError(f"train.output_dir: no checkpoint of {run} is intact ("
                        + "; ".join(f"{path.name}: {problem}" for path, problem in damaged)
                        + "); pass --overwrite to start over (files qlora train did not write are kept) or set "
                        "another train.output_dir")
    newest = checkpoints[-1]
    step = checkpoint_step(newest)
    if t.max_steps and t.max_steps < step:
        raise UserError(f"train.max_steps={t.max_steps}: {run} is already at step {step}; train longer, or pass "
                        "--overwrite to start over")
    fix = "fix or delete that line, then run the same command"
    if (run / METRICS_FILE).is_file():
        metrics_lines(run / METRICS_FILE, fix)
    if (run / ENVIRONMENT_FILE).is_file():
        read_environment(run / ENVIRONMENT_FILE)
    skipped = [f"{path} is damaged ({problem}): resuming from {newest.name} instead" for path, problem in damaged]
    action = "finish" if run_target_reached(recipe, newest) else "resume"
    return RunPlan(action, newest, step, skipped, [path for path, _ in damaged])


def remove_leftovers(run: Path) -> None:
    """Delete what an interrupted write of `train` left behind, under the run's lock (so no writer of these is alive):
    `.NAME.tmp` / `.NAME.old` siblings of the files `train` writes, and of checkpoints. Anything else, such as the
    temporary directory of a `merge --output RUN/merged` running beside it, is not train's and stays."""
    def ours(path: Path, names) -> bool:
        match = LEFTOVER.fullmatch(path.name)
        return bool(match) and names(match.group(1))

    leftovers = [*(p for p in run.iterdir() if ours(p, TRAIN_FILES.__contains__)),
                 *(p for p in (run / CHECKPOINT_DIR).glob(".*") if ours(p, CHECKPOINT_NAME.fullmatch))]
    for path in leftovers:
        console.print(f"removing {path}, left by an interrupted write")
        _remove(path)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def start_over(run: Path) -> None:
    """Remove what `train` wrote in the (locked) run: TRAIN_FILES, their leftovers and checkpoints; keep everything
    else, naming it."""
    remove_leftovers(run)
    checkpoints = run / CHECKPOINT_DIR
    for path in checkpoints.iterdir() if checkpoints.is_dir() else ():
        if CHECKPOINT_NAME.fullmatch(path.name):
            _remove(path)
    for name in TRAIN_FILES:
        path = run / name
        if path.exists() or path.is_symlink():
            if path == checkpoints and path.is_dir() and any(path.iterdir()):
                continue  # holds files train did not write
            _remove(path)
    kept = [str(p.relative_to(run)) for p in sorted([*run.iterdir(), *(
        checkpoints.iterdir() if checkpoints.is_dir() else ())]) if p.name != LOCK_FILE and p != checkpoints]
    if kept:
        console.print(f"kept in {run}, as `qlora train` did not write them: {', '.join(kept)}")


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep the metrics.jsonl lines up to `step`, so a resumed run continues the file without repeats."""
    if not path.is_file():
        return
    # a line cut short by a crash is left out; the rest was validated by plan_run
    write_atomic(path, "".join(line + "\n" for line, record in metrics_lines(path, "") if record["step"] <= step))


def apply_plan(run: Path, plan: RunPlan, fingerprint: str) -> None:
    """Make the (locked) run directory ready for `plan`: cleared and marked for a start, tidied for a resume."""
    if plan.action == "start":
        start_over(run)
        write_marker(run, "train", data=fingerprint)
        return
    remove_leftovers(run)
    for checkpoint, line in zip(plan.damaged, plan.skipped):
        console.print(f"{line}; removing it")
        _remove(checkpoint)
    drop_metrics_after(run / METRICS_FILE, plan.step)


def mark_complete(run: Path, recipe: Recipe, step: int) -> None:
    """Record that the run finished `step` steps for the recipe's run length: the same command is then a no-op."""
    t = recipe.train
    marker = read_marker(run)
    kept = {k: v for k, v in marker.items() if k not in ("written_by", "complete")}
    write_marker(run, "train", **kept, complete={"step": step, "max_steps": t.max_steps, "epochs": t.epochs})


def record_environment(path: Path, step: int, device: str) -> None:
    """Append where and with what this (re)start of the run trains to environment.json; say if the device moved."""
    from importlib.metadata import version

    starts = read_environment(path) if step and path.is_file() else []
    entry = {"step": step, "device": device,
             **{name: version(name) for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")}}
    if starts and starts[-1]["device"] != entry["device"]:
        console.print(f"note: the run trained on {starts[-1]['device']} and continues on {entry['device']}")
    write_json(path, [*starts, entry])

