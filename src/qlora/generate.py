"""generate(run, prompts, sampling) -> texts, with the run's own template and tokenizer.

Prompts are encoded by data.encode_prompt, the function training used, so the model sees
token-for-token the prefix it was trained on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from qlora.config import GenerationSection, ModelSection, Recipe, load_recipe
from qlora.data import TEMPLATE_FILE, Template, encode_prompt
from qlora.errors import UserError
from qlora.files import write_atomic
from qlora.train import ADAPTER_DIR, RECIPE_FILE, console


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer and template it was trained with."""

    model: Any
    tokenizer: Any
    template: Template
    recipe: Recipe | None  # None for a merged directory


def load_run(path: str | Path) -> LoadedModel:
    """Load a run directory (4-bit base + adapter, as trained) or a merged model directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora.model import device_map, inference_dtype, load_quantized_base, load_tokenizer

    path = Path(path)
    if (path / RECIPE_FILE).is_file():
        recipe = load_recipe(path / RECIPE_FILE)
        adapter = path / ADAPTER_DIR
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{path}: the run has no finished adapter/ (was training interrupted?)")
        model = PeftModel.from_pretrained(load_quantized_base(recipe), adapter)
        tokenizer = load_tokenizer(recipe.model, str(adapter))
        template = Template.load(adapter)
    elif (path / "config.json").is_file() and (path / TEMPLATE_FILE).is_file():
        recipe = None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=inference_dtype(), device_map=device_map())
        tokenizer = load_tokenizer(ModelSection(name_or_path=str(path)))
        template = Template.load(path)
    else:
        raise UserError(f"{path}: not a qlora run directory (no {RECIPE_FILE}) nor a merged model (no config.json "
                        f"and {TEMPLATE_FILE})")
    model.eval()
    tokenizer.padding_side = "left"
    return LoadedModel(model, tokenizer, template, recipe)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class StopAwareStreamer:
    """A generate() streamer that writes new text as it comes, never past a stop string.

    It holds back the few characters that could be the start of a stop string, and an
    incomplete UTF-8 character, until the next tokens decide.
    """

    def __init__(self, tokenizer, stop: list[str], out: TextIO | None = None):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
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


def generate(loaded: LoadedModel, prompts: list[tuple[str, str]], sampling: GenerationSection,
             batch_size: int = 8, on_batch: Callable[[int], None] | None = None, streamer=None) -> list[str]:
    """Generated responses for (instruction, input) prompts, batched with left padding.

    A `streamer` (one prompt at a time) receives tokens as they are generated.
    """
    import torch

    if streamer is not None and sampling.num_beams > 1:
        raise UserError(f"num_beams={sampling.num_beams}: beam search picks its text only at the end, so it cannot "
                        "stream (--stream, --chat); drop --stream or set --num-beams 1")
    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    if streamer is not None:
        batch_size = 1
    texts = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tok, loaded.template, ins, inp) for ins, inp in prompts[start:start + batch_size]]
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
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                stop_strings=list(sampling.stop) or None,
                tokenizer=tok,
                streamer=streamer,
            )
        for row in out[:, width:]:
            texts.append(cut_at_stop(tok.decode(row, skip_special_tokens=True), sampling.stop))
        if on_batch:
            on_batch(len(encoded))
    return texts


def read_prompt_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl file in the training format; each needs a non-empty string instruction."""
    if not path.is_file():
        raise UserError(f"--input-file: file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: row {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise UserError(f"{path}: row {number} has no instruction string")
        if not isinstance(row.get("input") or "", str):
            raise UserError(f"{path}: row {number} has a non-string input")
        rows.append(row)
    return rows


def generate_file(loaded: LoadedModel, in_path: Path, out_path: Path, sampling: GenerationSection,
                  batch_size: int = 8) -> int:
    """Write each row of `in_path` with a `generation` field added to `out_path` (atomically); returns the count."""
    from rich.progress import Progress

    rows = read_prompt_rows(in_path)
    with Progress(console=console) as progress:
        task = progress.add_task("generating", total=len(rows))
        texts = generate(loaded, [(r["instruction"], r.get("input") or "") for r in rows], sampling, batch_size,
                         on_batch=lambda n: progress.advance(task, n))
    write_atomic(out_path, "".join(json.dumps({**r, "generation": t}, ensure_ascii=False) + "\n"
                                   for r, t in zip(rows, texts)))
    return len(rows)


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
            generate(loaded, [(instruction, "")], sampling, streamer=StopAwareStreamer(loaded.tokenizer, sampling.stop))
            sys.stdout.write("\n")
