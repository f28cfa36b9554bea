"""Training data: load rows, check them, render the prompt template, tokenize and mask.

The prompt and the response are tokenized separately and concatenated, so the tokens a model is
trained on after the prompt are exactly the tokens `generate` feeds it: the prompt ids come from
`encode_prompt`, the one function both use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora.config import DataSection
from qlora.errors import UserError

IGNORE_INDEX = -100  # label of a token that is not trained (PyTorch cross-entropy's ignore_index)
LOCAL_SUFFIXES = (".json", ".jsonl")
TEMPLATE_FILE = "template.json"


@dataclass(frozen=True)
class Template:
    """A prompt template: how an instruction (and optional input) becomes the text before the response."""

    name: str
    prompt_no_input: str
    prompt_with_input: str

    def render(self, instruction: str, input: str = "") -> str:
        if input:
            return self.prompt_with_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def save(self, directory: Path) -> None:
        (directory / TEMPLATE_FILE).write_text(json.dumps(self.__dict__, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> Template:
        return cls(**json.loads((directory / TEMPLATE_FILE).read_text(encoding="utf-8")))


TEMPLATES = {
    "alpaca": Template(
        name="alpaca",
        prompt_no_input=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        ),
        prompt_with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
    ),
}


def is_local_path(path: str) -> bool:
    """Whether data.path names a local file rather than a hub dataset id."""
    return path.endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~")) or Path(path).exists()


def _read_local(path: Path) -> list[Any]:
    if not path.is_file():
        raise UserError(f"data.path: file not found: {path} (check the path, relative to {Path.cwd()})")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg}); use .jsonl for JSON lines") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of rows, got a {type(rows).__name__}")
    return rows


def load_rows(data: DataSection) -> list[Any]:
    """The raw rows of data.path: a local .json/.jsonl file or a hub dataset (revision, split)."""
    if is_local_path(data.path):
        rows = _read_local(Path(data.path).expanduser())
    else:
        import datasets

        try:
            rows = list(datasets.load_dataset(data.path, revision=data.revision, split=data.split))
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad id, split or no network
            raise UserError(f"data.path: could not load hub dataset {data.path!r} "
                            f"(revision {data.revision}, split {data.split}): {exc}") from None
    return rows[: data.max_rows] if data.max_rows else rows


@dataclass
class DataReport:
    """What happened to every row: used, invalid (by kind, with row numbers), too long."""

    rows_total: int = 0
    invalid: dict[str, list[int]] = field(default_factory=dict)
    dropped_too_long: list[int] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self) -> str:
        parts = [f"{self.examples} of {self.rows_total} rows used, {self.tokens} tokens "
                 f"({self.trained_tokens / max(self.tokens, 1):.0%} trained)"]
        if self.dropped_too_long:
            parts.append(f"{len(self.dropped_too_long)} dropped as longer than data.max_length "
                         f"(rows {_first_rows(self.dropped_too_long)})")
        if self.truncated:
            parts.append(f"{len(self.truncated)} truncated (rows {_first_rows(self.truncated)})")
        return "; ".join(parts)


def _first_rows(rows: list[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, rows[:limit]))
    return shown + (", ..." if len(rows) > limit else "")


def row_problem(row: Any) -> str | None:
    """Why an Alpaca row cannot be trained on, or None if it is fine."""
    if not isinstance(row, dict):
        return "not an object"
    for key in ("instruction", "output"):
        if key not in row or row[key] is None:
            return f"missing {key}"
        if not isinstance(row[key], str):
            return f"non-string {key}"
        if not row[key].strip():
            return f"empty {key}"
    if row.get("input") is not None and not isinstance(row["input"], str):
        return "non-string input"
    return None


def check_rows(rows: list[Any], source: str) -> None:
    """Raise a UserError listing invalid rows by kind with their (0-based) row numbers."""
    invalid: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        problem = row_problem(row)
        if problem:
            invalid.setdefault(problem, []).append(index)
    if invalid:
        kinds = "; ".join(f"{len(idx)} {kind} (rows {_first_rows(idx)})" for kind, idx in invalid.items())
        raise UserError(f"{source}: {sum(map(len, invalid.values()))} of {len(rows)} rows are invalid: {kinds}. "
                        "Fix or remove those rows.")
    if not rows:
        raise UserError(f"{source}: no rows to train on")


def encode_prompt(tokenizer, template: Template, instruction: str, input: str = "") -> list[int]:
    """Token ids of the rendered prompt, with exactly the BOS the tokenizer's own convention adds (never two)."""
    ids = tokenizer(template.render(instruction, input), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def encode_example(tokenizer, template: Template, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one Alpaca row: prompt masked with -100, response and final EOS trained.

    The EOS label is set explicitly, never derived from the pad id, so it is trained even when
    the tokenizer pads with EOS.
    """
    prompt = encode_prompt(tokenizer, template, row["instruction"], row.get("input") or "")
    response = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def build_dataset(rows: list[Any], tokenizer, template: Template, data: DataSection):
    """Tokenize checked rows into a datasets.Dataset of input_ids/labels, applying data.too_long."""
    import datasets

    check_rows(rows, data.path)
    report = DataReport(rows_total=len(rows))
    input_ids, labels = [], []
    for index, row in enumerate(rows):
        ids, lab = encode_example(tokenizer, template, row)
        if len(ids) > data.max_length:
            prompt_len = lab.count(IGNORE_INDEX)
            if data.too_long == "error":
                raise UserError(f"{data.path}: row {index} has {len(ids)} tokens, over data.max_length="
                                f"{data.max_length}; raise max_length or set data.too_long to drop or truncate")
            if data.too_long == "drop" or prompt_len >= data.max_length:
                report.dropped_too_long.append(index)
                continue
            ids, lab = ids[: data.max_length], lab[: data.max_length]
            report.truncated.append(index)
        input_ids.append(ids)
        labels.append(lab)
        report.tokens += len(ids)
        report.trained_tokens += sum(1 for x in lab if x != IGNORE_INDEX)
    report.examples = len(input_ids)
    if not input_ids:
        raise UserError(f"{data.path}: every row is longer than data.max_length={data.max_length}; raise it")
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels}), report
