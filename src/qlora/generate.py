"""generate(run, prompts, sampling) -> texts, with the run's own template and tokenizer.

Prompts are encoded by data.encode_prompt, the function training used, so the model sees
token-for-token the prefix it was trained on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from qlora.config import GenerationSection, ModelSection, Recipe, load_recipe
from qlora.data import TEMPLATE_FILE, Template, encode_prompt, stop_token_ids, turn_end
from qlora.errors import RunInterrupted, UserError
from qlora.files import check_parent, complete_lines, jsonl_lines, read_jsonl
from qlora.progress import console, heartbeat, progress
from qlora.rundir import ADAPTER_DIR, RECIPE_FILE, check_run_adapter


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer and template it was trained with."""

    model: Any
    tokenizer: Any
    template: Template
    recipe: Recipe | None  # as this machine computes it (plan.inference_recipe); None for a merged directory


def is_run(path: Path) -> bool:
    """Whether `path` is a finished run directory (True) or a merged model (False); anything else is refused."""
    if (path / RECIPE_FILE).is_file():
        if not (path / ADAPTER_DIR / "adapter_config.json").is_file():
            raise UserError(f"{path}: the run has no finished adapter/ (was training interrupted?)")
        check_run_adapter(path)
        return True
    if (path / "config.json").is_file() and (path / TEMPLATE_FILE).is_file():
        return False
    raise UserError(f"{path}: not a qlora run directory (no {RECIPE_FILE}) nor a merged model (no config.json "
                    f"and {TEMPLATE_FILE})")


def load_run(path: str | Path) -> LoadedModel:
    """Load a run directory (4-bit base + adapter, as trained) or a merged model directory."""
    from transformers import AutoModelForCausalLM

    from qlora.model import load_adapter, load_quantized_base, load_tokenizer
    from qlora.plan import inference_dtype, inference_recipe, spread_device_map

    path = Path(path)
    with heartbeat(console, f"loading {path}"):
        if is_run(path):
            recipe = inference_recipe(load_recipe(path / RECIPE_FILE))
            adapter = path / ADAPTER_DIR
            tokenizer = load_tokenizer(recipe.model, str(adapter))
            model = load_adapter(load_quantized_base(recipe), adapter, tokenizer)
            template = Template.load(adapter)
        else:
            recipe = None
            model = AutoModelForCausalLM.from_pretrained(path, dtype=inference_dtype(), device_map=spread_device_map())
            tokenizer = load_tokenizer(ModelSection(name_or_path=str(path)))
            template = Template.load(path)
    model.eval()
    tokenizer.padding_side = "left"
    return LoadedModel(model, tokenizer, template, recipe)


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def decode_escapes(text: str) -> str:
    """A --stop value as its user means it: `\\n`, `\\t`, `\\r` and `\\\\` typed in a shell are a newline, a
    tab, a carriage return and a backslash; any other backslash stays as typed."""
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), text, flags=re.S)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def stop_strings(loaded: LoadedModel, sampling: GenerationSection) -> list[str]:
    """The recipe's stop strings and the end of a reply in the run's template (chatml's <|im_end|>, gemma's
    <end_of_turn>, a chat template's own): a reply ends there, not in the newline the template writes after it
    or in a next turn."""
    end = turn_end(loaded.template, loaded.tokenizer)
    return [*sampling.stop, end] if end and end not in sampling.stop else list(sampling.stop)


class StopAwareStreamer:
    """A generate() streamer that writes new text as it comes, never past a stop string.

    It holds back the few characters that could be the start of a stop string, and an
    incomplete UTF-8 character, until the next tokens decide.
    """

    def __init__(self, loaded: LoadedModel, sampling: GenerationSection, out: TextIO | None = None):
        self.tokenizer, self.stop = loaded.tokenizer, stop_strings(loaded, sampling)
        self.out = out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.seen_prompt = False

    def _emit(self, final: bool) -> None:
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        text = cut_at_stop(full, self.stop)
        if not final and len(text) == len(full):
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[: max(len(text) - hold, 0)].rstrip("\ufffd")
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)

    def put(self, value) -> None:
        if not self.seen_prompt:  # generate() first hands over the prompt
            self.seen_prompt = True
            return
        self.ids.extend(value.flatten().tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)


def check_streamable(sampling: GenerationSection) -> None:
    """Refuse beam search where text streams (--stream, --chat): it picks its text only at the end."""
    if sampling.num_beams > 1:
        raise UserError(f"num_beams={sampling.num_beams}: beam search picks its text only at the end, so it cannot "
                        "stream (--stream, --chat); drop --stream or set --num-beams 1")


def check_beams(path: Path, num_beams: int | None, rows: int) -> None:
    """Refuse, before the model loads, more beams (--num-beams, else the run's generation.num_beams) than the
    vocabulary has tokens (the first step has no more distinct continuations) or than this device's memory holds
    for `rows` prompts at once: each beam keeps at least three float32 rows of logits over the vocabulary (the
    logits, their log-probabilities, the beam scores), before any activation or cache."""
    from transformers import AutoConfig

    from qlora.plan import device_memory

    flag = "--num-beams" if num_beams is not None else "generation.num_beams"
    run = is_run(path)
    if num_beams is None:
        num_beams = load_recipe(path / RECIPE_FILE).generation.num_beams if run else 1
    if num_beams == 1:
        return
    model = load_recipe(path / RECIPE_FILE).model if run else ModelSection(name_or_path=str(path))
    try:
        config = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
    except OSError:  # loading the model says why, in one line
        return
    vocab = getattr(config, "text_config", config).vocab_size
    available, device = device_memory()
    fits = available // (rows * 3 * 4 * vocab)
    if num_beams > min(vocab, fits):
        raise UserError(f"{flag} {num_beams}: give at most {min(vocab, fits):,}: no more than the {vocab:,} tokens of "
                        f"the vocabulary, and {rows} prompt(s) x beams x 3 float32 rows of logits must fit the "
                        f"{available / 1024**3:.1f} GiB of {device}")


def generate(loaded: LoadedModel, prompts: list[tuple[str, str]], sampling: GenerationSection,
             batch_size: int = 8, streamer=None) -> list[str]:
    """Generated responses for (instruction, input) prompts, batched with left padding.

    A `streamer` (one prompt at a time) receives tokens as they are generated.
    """
    encoded = [encode_prompt(loaded.tokenizer, loaded.template, ins, inp) for ins, inp in prompts]
    return generate_from_ids(loaded, encoded, sampling, batch_size, streamer)


def generate_from_ids(loaded: LoadedModel, prompts: list[list[int]], sampling: GenerationSection,
                      batch_size: int = 8, streamer=None) -> list[str]:
    """Generated texts continuing prompts given as token ids (generate's engine; eval's raw completion prompts)."""
    import torch

    if streamer is not None:
        check_streamable(sampling)
    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    if streamer is not None:
        batch_size = 1
    stop = stop_strings(loaded, sampling)
    texts = []
    for start in range(0, len(prompts), batch_size):
        encoded = prompts[start:start + batch_size]
        width = max(map(len, encoded))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        sample = sampling.temperature > 0
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sample,
                temperature=sampling.temperature if sample else None,
                top_p=sampling.top_p if sample else None,
                top_k=sampling.top_k if sample else None,
                num_beams=sampling.num_beams,
                repetition_penalty=sampling.repetition_penalty,
                eos_token_id=stop_token_ids(tok, loaded.template),
                pad_token_id=tok.pad_token_id,
                stop_strings=stop or None,
                tokenizer=tok,
                streamer=streamer,
            )
        for row in out[:, width:]:
            texts.append(cut_at_stop(tok.decode(row, skip_special_tokens=True), stop))
    return texts


def read_prompt_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl file in the training format; each needs a non-empty string instruction."""
    rows = []
    for number, row in read_jsonl(path, "--input-file"):
        index = len(rows)
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise UserError(f"--input-file: {path} row {index} (line {number}) has no instruction string")
        if not isinstance(row.get("input") or "", str):
            raise UserError(f"--input-file: {path} row {index} (line {number}) has a non-string input")
        rows.append(row)
    if not rows:
        raise UserError(f"--input-file: {path} holds no rows")
    return rows


def row_line(row: dict[str, Any], generation: str) -> str:
    """The line generate_file writes for `row`: its fields, then `generation` last (replacing a field of that name)."""
    return json.dumps({**{k: v for k, v in row.items() if k != "generation"}, "generation": generation},
                      ensure_ascii=False)


# a JSON string as json.dumps writes it, cut anywhere (even inside an escape), or whole and followed by the row's `}`
STRING_CUT_SHORT = re.compile(r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-f]{4})*(?:\\(?:u[0-9a-f]{0,3})?|"}?)?')


def cut_from_rows(rows: list[dict[str, Any]]) -> Callable[[str, int], bool]:
    """complete_lines' proof for --output-file: a line cut short must be the start of the line this command writes
    for the row after the whole ones, with any generated text."""
    def wrote(line: str, whole: int) -> bool:
        if whole >= len(rows):
            return False
        fields = row_line(rows[whole], "")[:-3]  # up to `"generation": `, where the generated text starts
        if len(line) <= len(fields):
            return fields.startswith(line)
        return line.startswith(fields) and STRING_CUT_SHORT.fullmatch(line, len(fields)) is not None
    return wrote


def rows_already_written(out_path: Path, in_path: Path, rows: list[dict[str, Any]]) -> int:
    """How many of `rows` an earlier run of the same command wrote to `out_path` (checked before a model loads,
    changing nothing).

    Those lines must be the first rows with a `generation` added; a last line cut short by a crash must be the start
    of the next one (it is regenerated). Anything else is refused, so another file is never appended to or cut.
    """
    if out_path.is_dir():
        raise UserError(f"--output-file: {out_path} is a directory; name a .jsonl file")
    check_parent(out_path, "--output-file")
    if not os.access(out_path.parent, os.W_OK):
        raise UserError(f"--output-file: {out_path.parent} is not writable")
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise UserError(f"--output-file: {out_path} is the --input-file; name another file")
    if not out_path.exists():
        return 0
    written = jsonl_lines(complete_lines(out_path, "--output-file", cut_from_rows(rows), cut=False))
    for index, (number, line) in enumerate(written):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or JSON Python will not read
            row = None
        same = (isinstance(row, dict) and index < len(rows) and isinstance(row.get("generation"), str)
                and row == {**rows[index], "generation": row["generation"]})
        if not same:
            raise UserError(f"--output-file: {out_path} line {number} is not row {index} of {in_path} with its "
                            "generation, so it is not this command's earlier output; name another file")
    return len(written)


def generate_file(loaded: LoadedModel, in_path: Path, rows: list[dict[str, Any]], out_path: Path,
                  sampling: GenerationSection, batch_size: int = 8) -> tuple[int, int]:
    """Append each row of `in_path` not yet in `out_path`, with a `generation` field, batch by batch (each batch
    flushed to disk); returns (rows written now, rows there before). Ctrl-C keeps every finished batch."""
    done = rows_already_written(out_path, in_path, rows)
    if out_path.exists():  # checked again as it is cut: the file may have changed while the model loaded
        complete_lines(out_path, "--output-file", cut_from_rows(rows))
    written = 0
    try:
        with out_path.open("a", encoding="utf-8") as out, progress(console, "generating", len(rows), done) as bar:
            for start in range(done, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                texts = generate(loaded, [(r["instruction"], r.get("input") or "") for r in batch], sampling,
                                 batch_size)
                out.write("".join(row_line(r, t) + "\n" for r, t in zip(batch, texts)))
                out.flush()
                os.fsync(out.fileno())
                written += len(batch)
                bar.advance(len(batch))
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGINT/SIGTERM under errors.interruptible
        signum = getattr(exc, "signum", signal.SIGINT)
        raise RunInterrupted(f"{signal.Signals(signum).name}: {done + written} of {len(rows)} rows are in "
                             f"{out_path}; run the same command to generate the rest", signum) from None
    return written, done


def ask(prompt: str) -> str:
    """Read a line, with the prompt on stderr so stdout carries only generated text."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def chat(loaded: LoadedModel, sampling: GenerationSection, read: Callable[[str], str] = ask) -> None:
    """Interactive loop: each line is an instruction, answered as it streams; EOF or 'exit' ends it.

    Every turn is a fresh single-turn prompt, as the model was trained.
    """
    while True:
        try:
            instruction = read("> ")
        except EOFError:
            break
        if instruction.strip() in {"exit", "quit"}:
            break
        if instruction.strip():
            generate(loaded, [(instruction, "")], sampling, streamer=StopAwareStreamer(loaded, sampling))
            sys.stdout.write("\n")
