"""Training data: load rows, check them, render the prompt template, tokenize and mask.

A row becomes a conversation, the template renders it as text segments marked trained or not,
and each segment is tokenized on its own. Generation encodes its prompt with the same functions,
so the tokens a model sees at inference are token-for-token the prefix it was trained on.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlora.config import DataSection
from qlora.errors import UserError, one_line
from qlora.files import parse_json, read_jsonl, read_text

IGNORE_INDEX = -100  # label of a token that is not trained (PyTorch cross-entropy's ignore_index)
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
TEMPLATE_FILE = "template.json"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Template:
    """How a conversation becomes text. Formats hold {content}, {input} (alpaca) and {system} placeholders.

    A user turn renders `first_user` (or `user` after the first) and, where a reply follows,
    `reply_start` (the generation prompt). A reply is its content plus `reply_end`; the reply is trained,
    everything else is masked. System text is rendered with `system` and placed at {system} in
    `first_user`, or before it; "" drops it. How a reply ends is the tokenizer's business (see
    `turn_end`): where `reply_end` is one special token of it, that token ends the trained reply and the
    whitespace after it is not trained; elsewhere the whole `reply_end` and then EOS are trained.
    """

    name: str
    first_user: str = "{content}"
    user: str = "{content}"
    reply_start: str = ""
    reply_end: str = ""
    system: str = ""
    first_user_with_input: str | None = None

    def render(self, instruction: str, input: str = "") -> str:
        """The single-turn prompt text for an instruction (and alpaca input), ending where the reply starts."""
        return "".join(text for text, _ in self.segments([{"role": "user", "content": instruction}], input, True))

    def segments(self, messages: list[dict[str, str]], input: str = "", add_generation_prompt: bool = False,
                 eos: str | None = None) -> list[tuple[str, bool]]:
        """(text, trained) segments of a conversation. With `eos`, each reply is trained with its whole
        `reply_end` and `eos` after it; without, `reply_end` ends the turn, its trailing whitespace untrained."""
        system = "".join(_fill(self.system, content=m["content"]) for m in messages if m["role"] == "system")
        out: list[tuple[str, bool]] = []
        turns = [m for m in messages if m["role"] != "system"]
        end = self.reply_end.rstrip()
        for i, m in enumerate(turns):
            if m["role"] == "assistant":
                reply = m["content"] + self.reply_end
                if eos is not None:
                    out.append((reply if reply.endswith(eos) else reply + eos, True))
                else:
                    out += [(m["content"] + end, True), (self.reply_end[len(end):], False)]
                continue
            first, content = not out, m["content"]
            fmt = self.first_user if first else self.user
            if first and input:
                if self.first_user_with_input:
                    fmt = self.first_user_with_input
                else:  # no input slot: the input follows the instruction in the message
                    content = f"{content}\n\n{input}"
            text = _fill(fmt, content=content, input=input, system=system if first else "")
            if first and "{system}" not in fmt:
                text = system + text
            follows = i + 1 < len(turns) and turns[i + 1]["role"] == "assistant"
            if follows or (i + 1 == len(turns) and add_generation_prompt):
                text += self.reply_start
            out.append((text, False))
        return [(text, trained) for text, trained in out if text]

    def save(self, directory: Path) -> None:
        (directory / TEMPLATE_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> Template:
        return cls(**json.loads((directory / TEMPLATE_FILE).read_text(encoding="utf-8")))


def _fill(fmt: str, **values: str) -> str:
    """Replace {name} placeholders in one pass (values may themselves contain braces)."""
    return re.sub(r"\{(content|input|system)\}", lambda m: values.get(m.group(1), ""), fmt)


ALPACA_PREAMBLE = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"
TEMPLATES = {
    "alpaca": Template(
        "alpaca",
        first_user=ALPACA_PREAMBLE.format("") + "### Instruction:\n{content}\n\n",
        first_user_with_input=ALPACA_PREAMBLE.format(", paired with an input that provides further context")
        + "### Instruction:\n{content}\n\n### Input:\n{input}\n\n",
        user="\n\n### Instruction:\n{content}\n\n",
        reply_start="### Response:\n",
    ),
    "chatml": Template(
        "chatml",
        first_user="<|im_start|>user\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        reply_start="<|im_start|>assistant\n",
        reply_end="<|im_end|>\n",
        system="<|im_start|>system\n{content}<|im_end|>\n",
    ),
    "llama-2": Template(
        "llama-2",
        first_user="[INST] {system}{content} [/INST]",
        user="[INST] {content} [/INST]",
        system="<<SYS>>\n{content}\n<</SYS>>\n\n",
    ),
    "gemma": Template(  # Gemma has no system role: system text opens the first user turn
        "gemma",
        first_user="<start_of_turn>user\n{system}{content}<end_of_turn>\n",
        user="<start_of_turn>user\n{content}<end_of_turn>\n",
        reply_start="<start_of_turn>model\n",
        reply_end="<end_of_turn>\n",
        system="{content}\n\n",
    ),
    "raw": Template("raw"),
    "tokenizer": Template("tokenizer"),  # rendered by the tokenizer's own chat template
}


def special_texts(tokenizer) -> list[str]:
    """The texts of the tokenizer's special tokens (its own and the added ones marked special), longest first."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted({t for t in [*tokenizer.all_special_tokens, *added] if t}, key=len, reverse=True)


def _render_chat(tokenizer, messages, add_generation_prompt: bool, turn: int) -> str:
    """The tokenizer's chat template rendered as text; a template error is a UserError naming the turn."""
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - jinja raises TemplateError, and templates raise their own exceptions
        raise UserError(f"data.template: the model's chat template refused the conversation up to turn {turn} "
                        f"({one_line(exc)}); fix the row or choose chatml, llama-2 or gemma") from None


def has_generation_markers(tokenizer) -> bool:
    """Whether the chat template marks assistant text with {% generation %} (transformers' assistant mask)."""
    return bool(re.search(r"{%-?\s*generation\s*-?%}", tokenizer.chat_template or ""))


def _marked_segments(tokenizer, messages, full: str) -> list[tuple[str, bool]]:
    """Segments of `full` from the template's own {% generation %} blocks, through transformers' assistant mask."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True,
                                            tokenizer_kwargs={"return_offsets_mapping": True})
    spans: list[list[int]] = []  # character spans of the marked tokens, adjacent ones joined
    for (begin, end), marked in zip(encoded["offset_mapping"], encoded["assistant_masks"]):
        if marked and end > begin:
            if spans and spans[-1][1] == begin:
                spans[-1][1] = end
            else:
                spans.append([begin, end])
    out, done = [], 0
    for begin, end in spans:
        out += [(full[done:begin], False), (full[begin:end], True)]
        done = end
    return [*out, (full[done:], False)]


def chat_template_segments(tokenizer, messages: list[dict[str, str]],
                           add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """(text, trained) segments of the conversation exactly as the tokenizer's own chat template renders it (see
    _chat_segments), from a template that can be masked exactly (see _probe_chat_template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("data.template: tokenizer, but the model's tokenizer has no chat template; "
                        "choose alpaca, chatml, llama-2 or gemma")
    _, problem = _probe_chat_template(tokenizer, tokenizer.chat_template)
    if problem and not add_generation_prompt:  # a prompt to generate from is the template's, maskable or not
        raise _unmaskable(f"turn {next((i for i, m in enumerate(messages) if m['role'] == 'assistant'), 0)}", problem)
    return _chat_segments(tokenizer, messages, add_generation_prompt)


def _chat_segments(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """(text, trained) segments of the conversation as the tokenizer's own chat template renders it.

    The text is the template's render of the whole conversation, nothing added (no BOS of ours, no EOS
    after a turn end the template writes itself). Each assistant turn starts where the template's
    generation prompt for it ends and is trained through the special token that ends it after the content
    (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`); what follows that token (a newline, an EOS
    written after the last turn only) is not. Where no special token ends a reply, the turn's text and an
    EOS inserted after it are trained. Templates with {% generation %} markers are masked by them.
    """
    full = _render_chat(tokenizer, messages, add_generation_prompt, len(messages))
    if not add_generation_prompt and has_generation_markers(tokenizer):
        return [s for s in _marked_segments(tokenizer, messages, full) if s[0]]
    specials = special_texts(tokenizer)
    turn_end = re.compile(r"\s*(?:" + "|".join(map(re.escape, specials)) + ")") if specials else None
    out, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render_chat(tokenizer, messages[:i], True, i)
        content = m["content"].strip()
        start = full.find(content, len(prompt))
        if not full.startswith(prompt) or len(prompt) < done or start < 0:
            raise UserError(f"data.template: the model's chat template renders turn {i} (assistant) differently "
                            "once the conversation goes on, so that reply cannot be masked exactly; train single "
                            "turns, or choose chatml, llama-2 or gemma")
        ended = turn_end.match(full, start + len(content)) if turn_end else None
        out.append((full[done:len(prompt)], False))
        if ended:
            out.append((full[len(prompt):ended.end()], True))
            done = ended.end()
        else:  # no special token ends the reply: the text the template writes for this turn, then EOS, are trained
            turn = _render_chat(tokenizer, messages[: i + 1], False, i + 1)
            done = len(turn) if full.startswith(turn) and len(turn) >= start + len(content) else start + len(content)
            out.append((full[len(prompt):done] + tokenizer.eos_token, True))
    out.append((full[done:], False))
    return [s for s in out if s[0]]


@functools.lru_cache(maxsize=8)  # asked for every row: render and tokenize the probe once per template
def _probe_chat_template(tokenizer, chat_template: str) -> tuple[str | None, str | None]:
    """(the special token that ends a reply, or None; why no reply can be masked exactly, or None) for the
    tokenizer's chat template (`chat_template`, its text, keys the cache), from a probe conversation. A template
    whose generation prompt is not a token prefix of the conversation it renders cannot be masked (Qwen3.5's
    prompt ends `<think>\n` where the render goes on `\n\n</think>`)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        segments = _chat_segments(tokenizer, probe, False)
        encode_segments(tokenizer, segments)
    except BoundaryMerge as exc:
        return None, f"{exc}, so generation could never feed the model its training prefix"
    except UserError:  # its generation prompt is not how the conversation it renders goes on (QwQ's `</think>`)
        return None, "its generation prompt is not the start of the reply it renders"
    reply = next(text for text, trained in segments if trained).rstrip()
    return next((t for t in special_texts(tokenizer) if reply.endswith(t)), None), None


def _unmaskable(turn: int | str, problem: str) -> UserError:
    return UserError(f"data.template: the model's chat template cannot be masked exactly at {turn} (assistant): "
                     f"{problem}; choose chatml, llama-2 or gemma")


def turn_end(template: Template, tokenizer) -> str | None:
    """The special token that ends a reply as `template` renders it with `tokenizer` (chatml's <|im_end|>, gemma's
    <end_of_turn>, a chat template's own), or None where the template ends a reply with nothing of its own and
    EOS is appended instead (alpaca, raw, llama-2)."""
    if template.name == "tokenizer":
        end, problem = _probe_chat_template(tokenizer, tokenizer.chat_template)
        if problem:
            raise _unmaskable("every turn", problem)
        return end
    end = template.reply_end.strip()
    ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
    return end if len(ids) == 1 and end in special_texts(tokenizer) else None


def stop_token_ids(tokenizer, template: Template) -> list[int]:
    """The ids that end a reply: EOS, and the template's turn end where that is another token."""
    end = turn_end(template, tokenizer)
    ids = [tokenizer.eos_token_id, *([tokenizer.convert_tokens_to_ids(end)] if end else [])]
    return list(dict.fromkeys(ids))


def segments_for(template: Template, tokenizer, messages, input: str = "", add_generation_prompt: bool = False):
    """The exact text of a conversation, whose first turn may carry an alpaca input, as (text, trained) segments.

    Joined, the segments are the whole text to tokenize: the BOS is written in front where the family adds one
    (a chat template writes its own), and EOS after a reply where the template has no turn end of its own.
    """
    if template.name == "tokenizer":
        if input:  # chat templates have no input slot: it follows the instruction in the message
            messages = [{**messages[0], "content": f"{messages[0]['content']}\n\n{input}"}, *messages[1:]]
        return chat_template_segments(tokenizer, messages, add_generation_prompt)
    eos = None if turn_end(template, tokenizer) else tokenizer.eos_token
    return _with_bos(tokenizer, template.segments(messages, input, add_generation_prompt, eos))


# a reply that starts with whitespace the template's prompt also ends with, typically
BOUNDARY_PROBLEM = "reply not on a token boundary (strip its leading whitespace)"


class BoundaryMerge(ValueError):
    """The tokenizer merges the end of a prompt into the reply that follows it (see encode_segments)."""


@functools.lru_cache(maxsize=4)  # asked for every row and every reply in it: tokenize the probe once
def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every encoded text with its BOS (Llama, Gemma: yes; GPT-2 style: no)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


def with_bos(tokenizer, text: str) -> str:
    """`text` with the BOS token written in front where the family uses one, as a chat template renders it."""
    bos = tokenizer.bos_token if adds_bos(tokenizer) else ""
    return text if text.startswith(bos) else bos + text


def _with_bos(tokenizer, segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """The segments with an untrained BOS in front where the family adds one and the text has none."""
    bos = tokenizer.bos_token if adds_bos(tokenizer) else ""
    if not bos or (segments and segments[0][0].startswith(bos)):
        return segments
    return [(bos, False), *segments]


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a raw text (a completion prompt): its BOS written in front (once) where the family adds one,
    then the whole string tokenized as one, special-token text included."""
    return tokenizer(with_bos(tokenizer, text), add_special_tokens=False)["input_ids"]


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation tokenized as ONE string, exactly as a consumer tokenizes it.

    The segments (see segments_for: BOS and EOS already in them) are joined and tokenized once, special-token
    text included and nothing added, as `apply_chat_template(..., tokenize=True)` does, so SentencePiece's dummy
    prefix and BPE merges fall as they do for anyone tokenizing the rendered conversation. A token is trained
    when its first character lies in a trained segment; an EOS label is set that way too, never derived from
    the pad id, so it is trained even when padding uses EOS. Raises BoundaryMerge when a reply does not start
    on a token boundary, or when the prompt before it tokenizes differently on its own: generation could then
    never feed the model its training prefix.
    """
    full, trained_spans = "", []
    for part, trained in segments:
        if trained:
            trained_spans.append((len(full), len(full) + len(part)))
        full += part
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [token if end > begin and any(a <= begin < b for a, b in trained_spans) else IGNORE_INDEX
              for token, (begin, end) in zip(ids, offsets)]
    for start, _ in trained_spans:
        if any(begin < start < end for begin, end in offsets):
            raise BoundaryMerge(f"a token spans the end of the prompt and the reply at {full[:start][-20:]!r}")
        prefix = [token for token, (begin, end) in zip(ids, offsets) if end <= start]
        if tokenizer(full[:start], add_special_tokens=False)["input_ids"] != prefix:
            raise BoundaryMerge(f"the prompt ending {full[:start][-20:]!r} tokenizes differently without its reply")
    return ids, labels


def encode_conversation(tokenizer, template: Template, messages: list[dict[str, str]],
                        input: str = "") -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation, as training sees it."""
    return encode_segments(tokenizer, segments_for(template, tokenizer, messages, input))


def encode_prompt(tokenizer, template: Template, instruction: str, input: str = "") -> list[int]:
    """Token ids of a single-turn prompt, exactly as the training sequence starts."""
    messages = [{"role": "user", "content": instruction}]
    text = "".join(t for t, _ in segments_for(template, tokenizer, messages, input, True))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# Loading ------------------------------------------------------------------------------------------


def is_local_path(path: str) -> bool:
    """Whether data.path names a local file or directory rather than a hub dataset id."""
    return path.endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~")) or Path(path).exists()


def _read_json(path: Path, what: str) -> list[Any]:
    if path.suffix == ".jsonl":
        return [row for _, row in read_jsonl(path, what)]
    rows = parse_json(read_text(path, what), what, path, hint="; use .jsonl for JSON lines")
    if not isinstance(rows, list):
        raise UserError(f"{what}: {path} holds a JSON {type(rows).__name__}; expected a list of rows")
    return rows


def _read_local(path: Path, data: DataSection, what: str) -> list[Any]:
    if not path.exists():
        raise UserError(f"{what}: file not found: {path} (check the path, relative to {Path.cwd()})")
    if path.is_dir():
        import datasets

        import pyarrow

        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise UserError(f"{what}: {path} is a directory but not one saved by datasets.save_to_disk") from None
        except (ValueError, KeyError, TypeError, OSError, pyarrow.ArrowException) as exc:  # a damaged JSON or Arrow file
            raise UserError(f"{what}: {path} is a dataset directory that cannot be read ({one_line(exc)}); save it "
                            "again with datasets.save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            if data.split not in loaded:
                raise UserError(f"data.split: {path} has no split {data.split!r} (it has {', '.join(loaded)})")
            loaded = loaded[data.split]
        return list(loaded)
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as exc:
            raise UserError(f"{what}: {path} is not a readable Parquet file ({one_line(exc)})") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path, what), newline=""))
        rows = []
        for row in reader:
            if None in row:  # where DictReader puts the fields past the header's
                raise UserError(f"{what}: {path} line {reader.line_num} (row {len(rows)}) has "
                                f"{len(reader.fieldnames) + len(row[None])} fields but the header has "
                                f"{len(reader.fieldnames)}; quote a field that holds a comma")
            rows.append(row)
        return rows
    return _read_json(path, what)


def load_rows(data: DataSection, key: str = "path") -> list[Any]:
    """The raw rows of data.path (or data.eval_path): a local file or directory, or a hub dataset."""
    path, what = getattr(data, key), f"data.{key}"
    if is_local_path(path):
        rows = _read_local(Path(path).expanduser(), data, what)
    else:
        import datasets

        try:
            rows = list(datasets.load_dataset(path, data.subset, revision=data.revision, split=data.split))
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad id, split or no network
            raise UserError(f"{what}: could not load hub dataset {path!r} (subset {data.subset}, revision "
                            f"{data.revision}, split {data.split}): {exc}") from None
    return rows[: data.max_rows] if data.max_rows else rows


# Checking and converting rows ---------------------------------------------------------------------


def _string_problem(row: dict, column: str, required: bool = True) -> str | None:
    value = row.get(column)
    if value is None:
        return f"missing {column}" if required else None
    if not isinstance(value, str):
        return f"non-string {column}"
    if required and not value.strip():
        return f"empty {column}"
    return None


def _messages_problem(value: Any, column: str) -> str | None:
    if not isinstance(value, list) or not value:
        return f"missing {column}" if value is None else f"{column} not a non-empty list"
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"{column} with a turn that is not {{role: system|user|assistant, content}}"
        if not isinstance(m.get("content"), str):
            return f"{column} with a non-string content"
    replies = [m for m in value if m["role"] == "assistant"]
    if not replies:
        return f"{column} without an assistant turn"
    if any(not m["content"].strip() for m in replies):
        return f"{column} with an empty assistant turn"
    return None


def row_problem(row: Any, data: DataSection) -> str | None:
    """Why a row cannot be trained on (a short kind, naming the file's column), or None if it is fine."""
    if not isinstance(row, dict):
        return "not an object"
    c = data.column
    if data.format == "alpaca":
        return (_string_problem(row, c("instruction")) or _string_problem(row, c("output"))
                or _string_problem(row, c("input"), required=False))
    if data.format == "prompt_completion":
        return _string_problem(row, c("prompt")) or _string_problem(row, c("completion"))
    if data.format == "messages":
        return _messages_problem(row.get(c("messages")), c("messages"))
    return _string_problem(row, c("text"))


def row_segments(row: dict, data: DataSection, template: Template, tokenizer) -> list[tuple[str, bool]]:
    """A checked row as (text, trained) segments."""
    c = data.column
    if data.format == "text":
        text, eos = row[c("text")], tokenizer.eos_token
        return _with_bos(tokenizer, [(text if text.endswith(eos) else text + eos, True)])
    if data.format == "messages":
        return segments_for(template, tokenizer, [{"role": m["role"], "content": m["content"]}
                                                  for m in row[c("messages")]])
    if data.format == "alpaca":
        user, reply, input = row[c("instruction")], row[c("output")], row.get(c("input")) or ""
    else:
        user, reply, input = row[c("prompt")], row[c("completion")], ""
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return segments_for(template, tokenizer, messages, input)


def _first_rows(rows: list[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, rows[:limit]))
    return shown + (", ..." if len(rows) > limit else "")


@dataclass
class DataReport:
    """What happened to every row: invalid (by kind, with 0-based row numbers), too long, used."""

    source: str
    rows_total: int = 0
    invalid: dict[str, list[int]] = field(default_factory=dict)
    dropped_too_long: list[int] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens per kept example
    tokens: int = 0
    trained_tokens: int = 0
    most_trained: int = 0  # trained tokens of the example with the most
    stop_trained: int = 0  # kept examples whose last trained token ends a reply (EOS or the template's turn end)

    @property
    def examples(self) -> int:
        return len(self.lengths)

    @property
    def invalid_count(self) -> int:
        return sum(map(len, self.invalid.values()))

    def invalid_summary(self) -> str:
        kinds = "; ".join(f"{len(rows)} {kind} (rows {_first_rows(rows)})" for kind, rows in self.invalid.items())
        return f"{self.invalid_count} of {self.rows_total} rows are invalid: {kinds}"

    def summary(self) -> str:
        parts = [f"{self.examples} of {self.rows_total} rows used, {self.tokens} tokens "
                 f"({self.trained_tokens / max(self.tokens, 1):.0%} trained)"]
        if self.invalid:
            parts.append("skipped " + self.invalid_summary())
        if self.dropped_too_long:
            parts.append(f"{len(self.dropped_too_long)} dropped as longer than data.max_length "
                         f"(rows {_first_rows(self.dropped_too_long)})")
        if self.truncated:
            parts.append(f"{len(self.truncated)} truncated (rows {_first_rows(self.truncated)})")
        return "; ".join(parts)


def check_mapped_columns(rows: list[Any], data: DataSection, source: str) -> None:
    """Each column data.fields names must be in some row: a misspelt optional one (alpaca's input) would otherwise
    train every row without it."""
    found = list(dict.fromkeys(key for row in rows if isinstance(row, dict) for key in row))
    for name, column in data.fields.items():
        if column not in found:
            raise UserError(f"data.fields.{name}: no row of {source} has a column {column!r}; its columns are "
                            f"{', '.join(map(str, found)) or 'none'}")


def find_invalid(rows: list[Any], data: DataSection, report: DataReport) -> list[int]:
    """Record invalid rows in the report; raise a UserError unless data.skip_invalid allows them.

    Returns the indices of the valid rows.
    """
    check_mapped_columns(rows, data, report.source)
    valid = []
    for index, row in enumerate(rows):
        problem = row_problem(row, data)
        if problem:
            report.invalid.setdefault(problem, []).append(index)
        else:
            valid.append(index)
    if not rows:
        raise UserError(f"{report.source}: no rows to train on")
    if report.invalid_count == len(rows) and isinstance(rows[0], dict):
        raise UserError(f"{report.source}: {report.invalid_summary()}. Does data.format ({data.format}) match "
                        f"the file? Its first row has the columns {', '.join(rows[0])}; map them with data.fields")
    enforce_invalid_policy(data, report)
    return valid


def enforce_invalid_policy(data: DataSection, report: DataReport) -> None:
    """Raise a UserError for the invalid rows in the report unless data.skip_invalid (within its cap) allows them."""
    if not report.invalid:
        return
    if not data.skip_invalid:
        raise UserError(f"{report.source}: {report.invalid_summary()}. Fix or remove them, or set "
                        "data.skip_invalid: true to drop them")
    fraction = report.invalid_count / report.rows_total
    if fraction > data.max_invalid_fraction:
        raise UserError(f"{report.source}: {report.invalid_summary()}: {fraction:.1%} is over "
                        f"data.max_invalid_fraction={data.max_invalid_fraction}; fix the file or raise it")


def tokenize_rows(rows: list[Any], tokenizer, template: Template, data: DataSection, source: str):
    """Check and tokenize rows: (input_ids list, labels list, DataReport), applying data.too_long."""
    from rich.console import Console
    from rich.progress import track

    report = DataReport(source=source, rows_total=len(rows))
    input_ids, labels = [], []
    valid = find_invalid(rows, data, report)
    stops = set(stop_token_ids(tokenizer, template))
    console = Console(stderr=True)
    # in a terminal only: elsewhere a transient bar leaves a blank line in the log
    for index in track(valid, description=f"tokenizing {len(valid)} rows", console=console, transient=True,
                       disable=len(valid) < 1000 or not console.is_terminal):
        try:
            ids, lab = encode_segments(tokenizer, row_segments(rows[index], data, template, tokenizer))
        except BoundaryMerge:
            report.invalid.setdefault(BOUNDARY_PROBLEM, []).append(index)
            continue
        replies = lab
        if data.train_on_inputs:  # every token is a label; the model's shift leaves the first unscored
            lab = list(ids)
        if len(ids) > data.max_length:
            if data.too_long == "error":
                raise UserError(f"{source}: row {index} has {len(ids)} tokens, over data.max_length="
                                f"{data.max_length}; raise max_length or set data.too_long to drop or truncate")
            ids, lab, replies = ids[: data.max_length], lab[: data.max_length], replies[: data.max_length]
            if data.too_long == "drop" or all(x == IGNORE_INDEX for x in lab):
                report.dropped_too_long.append(index)
                continue
            report.truncated.append(index)
        report.stop_trained += next((x for x in reversed(replies) if x != IGNORE_INDEX), None) in stops
        input_ids.append(ids)
        labels.append(lab)
        report.lengths.append(len(ids))
        report.tokens += len(ids)
        trained = sum(1 for x in lab if x != IGNORE_INDEX)
        report.trained_tokens += trained
        report.most_trained = max(report.most_trained, trained)
    enforce_invalid_policy(data, report)
    if not input_ids:
        raise UserError(f"{source}: no row fits data.max_length={data.max_length}; raise it")
    return input_ids, labels, report


def split_eval(input_ids: list, labels: list, fraction: float, seed: int):
    """Seeded hold-out of `fraction` of the examples: ((train ids, labels), (eval ids, labels))."""
    order = list(range(len(input_ids)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * fraction))
    held, kept = sorted(order[:n_eval]), sorted(order[n_eval:])
    if not kept:
        raise UserError(f"data.eval_fraction={fraction} leaves no rows to train on")

    def pick(indices):
        return [input_ids[i] for i in indices], [labels[i] for i in indices]

    return pick(kept), pick(held)


def build_datasets(recipe, rows: list[Any], eval_rows: list[Any] | None, tokenizer, template: Template):
    """(train Dataset, eval Dataset or None, DataReport) for a recipe's already loaded training and eval rows."""
    import datasets

    data = recipe.data
    ids, labels, report = tokenize_rows(rows, tokenizer, template, data, data.path)
    eval_set = None
    if data.eval_path:
        eval_ids, eval_labels, _ = tokenize_rows(eval_rows, tokenizer, template, data, data.eval_path)
        eval_set = datasets.Dataset.from_dict({"input_ids": eval_ids, "labels": eval_labels})
    elif data.eval_fraction:
        (ids, labels), (eval_ids, eval_labels) = split_eval(ids, labels, data.eval_fraction, recipe.train.seed)
        eval_set = datasets.Dataset.from_dict({"input_ids": eval_ids, "labels": eval_labels})
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}), eval_set, report
