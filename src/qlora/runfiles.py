"""A run's own files read back, each validated: a damaged file is one line naming it, what is wrong and what to do
(UserError), never a traceback. A damaged checkpoint is told apart (checkpoint_problem) so that `train` resumes from
the complete one before it."""

from __future__ import annotations

import json
from pathlib import Path

from qlora.errors import UserError
from qlora.files import jsonl_lines, parse_json, read_text

# metrics.jsonl fields the report draws or prints: a number (or null) where present
METRIC_NUMBERS = ("loss", "eval_loss", "pass@1", "learning_rate", "grad_norm", "tokens_per_second", "tokens_seen",
                  "time")


def damaged(path: Path, problem: str, fix: str) -> UserError:
    return UserError(f"{path.name}: {path} {problem}" + (f"; {fix}" if fix else ""))


def kind(value) -> str:
    """How a JSON value reads in a message: `null`, `a list`, `a string "x"`."""
    if value is None or isinstance(value, (dict, list)):
        return {type(None): "null", dict: "an object", list: "a list"}[type(value)]
    return f"{ {bool: 'a boolean', str: 'a string'}.get(type(value), 'a number')} {json.dumps(value)[:40]}"


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_json(path: Path, expected: type = dict):
    """A JSON file of the run holding one `expected` (object or list) value; UserError `NAME: PATH problem`."""
    value = parse_json(read_text(path, path.name), path.name, path)
    if not isinstance(value, expected):
        raise damaged(path, f"holds {kind(value)}, not a JSON {'object' if expected is dict else 'list'}", "")
    return value


def read_json(path: Path, fix: str, expected: type = dict):
    """load_json, the error saying what to do."""
    try:
        return load_json(path, expected)
    except UserError as exc:
        raise UserError(f"{exc}; {fix}") from None


def problem_of(exc: UserError, path: Path) -> str:
    """A damaged-file message without its `NAME: PATH ` opening."""
    return str(exc).removeprefix(f"{path.name}: {path} ")


def metrics_lines(path: Path, fix: str) -> list[tuple[str, dict]]:
    """(line, record) of every whole line of metrics.jsonl: a JSON object with an integer step and numbers where the
    report reads them. A last line without its newline is an append cut short (by a crash, or being written now)
    and is left out."""
    try:
        text = read_text(path, path.name)
    except UserError as exc:
        raise UserError(f"{exc}; {fix}") from None
    found = []
    for number, line in jsonl_lines(text[: text.rfind("\n") + 1]):
        try:
            record = parse_json(line, path.name, path, number)
        except UserError as exc:
            raise UserError(f"{exc}; {fix}") from None
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            what = kind(record) if not isinstance(record, dict) else (
                "an object without a step" if "step" not in record else f"a step of {kind(record['step'])}")
            raise damaged(path, f"line {number} is {what}, not a JSON object with an integer step", fix)
        wrong = next((key for key in METRIC_NUMBERS if record.get(key) is not None and not is_number(record[key])),
                     None)
        if wrong:
            raise damaged(path, f"line {number}: {wrong} is {kind(record[wrong])}, not a number", fix)
        found.append((line, record))
    return found


def read_metrics(path: Path, fix: str) -> list[dict]:
    """metrics.jsonl's records (metrics_lines)."""
    return [record for _, record in metrics_lines(path, fix)]


def read_environment(path: Path) -> list[dict]:
    """environment.json: one object with a step and a device per (re)start of the run."""
    fix = "restore it, or delete it (it only records where the run trained)"
    starts = read_json(path, fix, list)
    for index, start in enumerate(starts):
        if not isinstance(start, dict) or type(start.get("step")) is not int or not isinstance(start.get("device"), str):
            raise damaged(path, f"entry {index} is not an object with a step and a device", fix)
    return starts


def read_eval_summary(path: Path) -> dict:
    """eval/summary.json: pass@k scores (numbers from 0 to 1), of the base too under `base`."""
    fix = f"run `qlora eval` with --out {path.parent} again, or move {path.parent} away"
    summary = read_json(path, fix)
    for scores, where in ((summary, ""), (summary.get("base"), "base ")):
        if where and scores is None:
            continue
        if not isinstance(scores, dict):
            raise damaged(path, f"base is {kind(scores)}, not an object of scores", fix)
        for key, value in scores.items():
            if key.startswith("pass@") and not (is_number(value) and 0 <= value <= 1):
                raise damaged(path, f"{where}{key} is {kind(value)}, not a score from 0 to 1", fix)
    return summary


def read_best(path: Path) -> dict:
    """best.json (train.keep_best): the metric, the step whose checkpoint adapter/ is, its score (null when no eval
    ran) and the run's last step."""
    fix = f"delete it and {path.parent / 'adapter'}, then run `qlora train {path.parent / 'recipe.yaml'}` to write both again"
    best = read_json(path, fix)
    if not isinstance(best.get("metric"), str) or type(best.get("step")) is not int \
            or type(best.get("last_step")) is not int or not (best.get("score") is None or is_number(best["score"])):
        raise damaged(path, "is not an object with a metric, an integer step and last_step, and a score", fix)
    return best


def safetensors_problem(path: Path) -> str | None:
    """What makes a safetensors file unreadable (cut short, not safetensors), from its header; None when it reads."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "np"):
            return None
    except (SafetensorError, OSError) as exc:
        return f"is cut short or not safetensors ({exc})"


def lora_config_problem(config: dict, weights: Path) -> str | None:
    """What in adapter_config.json peft cannot load, or that does not fit the weights beside it; None when it fits."""
    from safetensors import safe_open

    r, targets = config.get("r"), config.get("target_modules")
    if config.get("peft_type") != "LORA":
        return f"names peft_type {kind(config.get('peft_type'))}, not LORA"
    if type(r) is not int or r < 1:
        return f"holds r {kind(r)}, not a rank of 1 or more"
    if not is_number(config.get("lora_alpha")):
        return f"holds lora_alpha {kind(config.get('lora_alpha'))}, not a number"
    if not (isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        return f"holds target_modules {kind(targets)}, not module names"
    if config.get("rank_pattern") or not weights.is_file():
        return None  # ranks vary by module; a missing weights file is told by its own check
    with safe_open(weights, "np") as f:
        for key in f.keys():
            if key.endswith("lora_A.weight") and f.get_slice(key).get_shape()[0] != r:
                return f"holds r {r}, but {weights.name} holds rank {f.get_slice(key).get_shape()[0]} weights ({key})"
    return None


def trainer_state_problem(path: Path) -> str | None:
    """What makes a checkpoint's trainer_state.json unusable for the trainer's resume; None when it is."""
    from transformers import TrainerState

    try:
        state = load_json(path)
    except UserError as exc:
        return problem_of(exc, path)
    try:
        TrainerState(**state)
    except TypeError as exc:
        return f"does not hold a trainer state ({exc})"
    if type(state.get("global_step")) is not int or type(state.get("max_steps")) is not int:
        return "holds no integer global_step and max_steps"
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint (every file present) cannot be resumed from: the first of its safetensors or JSON files that
    does not read, with what is wrong; None when each does."""
    for path in sorted(checkpoint.iterdir()):
        problem = None
        if path.name == "trainer_state.json":
            problem = trainer_state_problem(path)
        elif path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix == ".json":
            try:
                load_json(path, object)
            except UserError as exc:
                problem = problem_of(exc, path)
        if problem:
            return f"{path.name} {problem}"
    return None
