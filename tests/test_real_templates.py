"""Real vocabularies with real chat templates: qlora trains, token for token, what the model's own template renders.

Fixtures are llama.cpp's own (conftest.real_tokenizer): vocabularies of real models read by transformers' GGUF loader,
each with the chat templates of the models that use it. For every pair and conversation: qlora's ids equal
`apply_chat_template`'s; the trained tokens are exactly the assistant turns as the template renders them, each ending
with the template's own end of turn (nothing after it: no newline, no EOS the template does not render, no
generation prompt, no system or user text); generate's prompt equals the template's generation prompt and is the
training prefix; the stop ids hold the turn end. The expected spans come from rendering the conversation, never from
qlora's code.
"""

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
from conftest import recipe_for

from qlora import data
from qlora.errors import UserError

# The real Qwen3 and QwQ tokenizers add these as tokens of their own (tokenizer_config.json of Qwen/Qwen3-0.6B and
# Qwen/QwQ-32B: ids 151667 and 151668, not special); the qwen2 vocabulary llama.cpp ships (Qwen1.5's) lacks them.
THINK = ("<think>", "</think>")


@dataclass(frozen=True)
class Pair:
    """A real vocabulary with the chat template of a model built on it."""

    vocabulary: str  # models/ggml-vocab-<vocabulary>.gguf
    template: str  # models/templates/<template>.jinja, or a case of llama.cpp's tests/test-chat-template.cpp
    turn_end: str  # the token the template ends an assistant turn with
    eos: str | None = None  # the instruct model's EOS (its tokenizer_config.json), where the vocabulary's differs
    added: tuple[str, ...] = ()  # tokens the instruct model's tokenizer adds
    refused: tuple[str, ...] = ()  # conversations no masking can train exactly (the reason is given where listed)
    qlora_template: str = "tokenizer"  # data.template; a built-in one is judged against this real template

    @property
    def id(self) -> str:
        return "+".join([self.vocabulary, self.template.rsplit("/", 1)[-1], *([f"eos={self.eos}"] if self.eos else []),
                         *([self.qlora_template] if self.qlora_template != "tokenizer" else [])])

    def tokenizer(self, real_tokenizer):
        return real_tokenizer(self.vocabulary, self.template, self.eos, self.added)


ALL = ("single", "multi", "system", "code")
PAIRS = [
    # Qwen1.5/2/2.5's vocabulary, EOS <|endoftext|> as the base models' (Qwen/Qwen2.5-7B tokenizer_config.json)
    Pair("qwen2", "Qwen-Qwen2.5-7B-Instruct", "<|im_end|>"),
    Pair("qwen2", "Qwen-Qwen2.5-7B-Instruct", "<|im_end|>", eos="<|im_end|>"),  # Qwen/Qwen2.5-7B-Instruct's EOS
    # llama.cpp's copy of QwQ-32B's template ends the generation prompt with "<think>\n</think>" (QwQ's own with
    # "<think>\n"), text its assistant turns never render: the prompt generate feeds is never the training prefix
    Pair("qwen2", "Qwen-QwQ-32B", "<|im_end|>", eos="<|im_end|>", added=THINK, refused=ALL),
    # renders an empty "<think>\n\n</think>\n\n" before the last reply only: part of that turn, which the model writes
    Pair("qwen2", "Qwen-Qwen3-0.6B", "<|im_end|>", eos="<|im_end|>", added=THINK),
    Pair("qwen2", "Qwen3-Coder", "<|im_end|>", eos="<|im_end|>"),
    # the generation prompt ends in "<think>\n"; the last reply renders "<think>\n\n</think>": "\n\n" is one token,
    # so the reply starts inside a token; earlier replies render with no "<think>" at all
    Pair("qwen35", "Qwen3.5-4B", "<|im_end|>", refused=ALL),
    # ChatML as SmolLM2-Instruct and Qwen2.5-Instruct use it (their EOS is <|im_end|>), in its minimal real form
    Pair("qwen2", "teknium/OpenHermes-2.5-Mistral-7B", "<|im_end|>", eos="<|im_end|>"),
    Pair("qwen2", "teknium/OpenHermes-2.5-Mistral-7B", "<|im_end|>", eos="<|im_end|>", qlora_template="chatml"),
    # Llama 3's vocabulary, EOS <|end_of_text|> as the base models'; the 3.x instruct models' tokenizer_config.json
    # name <|eot_id|> (meta-llama/Llama-3.1-8B-Instruct, -3.2-3B-Instruct, -3.3-70B-Instruct)
    Pair("llama-bpe", "meta-llama-Llama-3.1-8B-Instruct", "<|eot_id|>"),
    Pair("llama-bpe", "meta-llama-Llama-3.1-8B-Instruct", "<|eot_id|>", eos="<|eot_id|>"),
    Pair("llama-bpe", "meta-llama-Llama-3.2-3B-Instruct", "<|eot_id|>", eos="<|eot_id|>"),
    Pair("llama-bpe", "meta-llama-Llama-3.3-70B-Instruct", "<|eot_id|>", eos="<|eot_id|>"),
    # Meta-Llama-3-8B-Instruct as first released: the assistant header after every conversation, with or without
    # add_generation_prompt (text only at the end: never trained)
    Pair("llama-bpe", "Llama-3", "<|eot_id|>"),
    Pair("llama-bpe", "meetkai-functionary-medium-v3.1", "<|eot_id|>"),
    Pair("llama-bpe", "meetkai-functionary-medium-v3.2", "<|eot_id|>"),  # replies render as ">>>all\n" + content
    # Phi-3's vocabulary, EOS <|endoftext|> as microsoft/Phi-3.5-mini-instruct's tokenizer_config.json; Phi-3.5 renders
    # the EOS once, after the last turn's "<|end|>\n"; Phi-3-mini renders <s>, Phi-3-mini/-medium drop system text
    Pair("phi-3", "microsoft-Phi-3.5-mini-instruct", "<|end|>"),
    Pair("phi-3", "Phi-3-mini", "<|end|>"),
    Pair("phi-3", "Phi-3-medium", "<|end|>"),
    Pair("phi-3", "Phi-3-vision", "<|end|>"),
    # Llama 1/2's SentencePiece vocabulary: Vicuna 1.1 (FastChat's format), Vigogne 2 (Llama-2-chat's [INST] format)
    Pair("llama-spm", "eachadea/vicuna-13b-1.1", "</s>"),
    Pair("llama-spm", "bofenghuang/vigogne-2-70b-chat", "</s>"),
    # deepseek-ai/deepseek-coder-*-instruct's tokenizer_config.json names <|EOT|> as EOS (the base's: <｜end▁of▁sentence｜>)
    Pair("deepseek-coder", "deepseek-ai/deepseek-coder-33b-instruct", "<|EOT|>", eos="<|EOT|>"),
    # DeepSeek-V2 kept DeepSeek LLM's 100k vocabulary and its "User: / Assistant:" chat format
    Pair("deepseek-llm", "DeepSeek-V2", "<｜end▁of▁sentence｜>"),
]
# Not paired, by what llama.cpp 0.3.36 ships and transformers 5.25 loads:
# - vocabularies transformers' GGUF loader refuses: command-r ("architecture command-r is not supported": so no
#   c4ai-command-r-plus / command-r7b / Cohere2MoE template), gemma-4 (its config's per-layer num_key_value_heads
#   fails validation: so no gemma-4-31B-it template), baichuan, bert-bge, gpt-neox, mpt, nomic-bert-moe, refact;
# - vocabularies that load but ship with no template of theirs: gpt-2, starcoder, falcon, aquila;
# - templates whose model's vocabulary is not shipped: gemma-2-2b-it and gemma-7b-it (Gemma's), the Mistral family
#   (v0.2, v1, v3, v7, Nemo, Small, Devstral, Ministral; AlphaMonarch and OpenHermes are Mistral 7B fine-tunes: their
#   SentencePiece differs from Llama's), SmolLM3, granite, GLM, Kimi, MiniMax, LFM2, gpt-oss, Nemotron, Apertus,
#   and the rest of models/templates;
# - templates that rename a base vocabulary's reserved tokens (DeepSeek-R1-Distill-Llama/-Qwen, Hermes-2-Pro/Hermes-3
#   on Llama 3): the base vocabulary has no such tokens;
# - fireworks-ai firefunction-v2 needs the template variables `functions` and `datetime`, which a chat never passes;
# - Orca-Vicuna is a format, not a model's template; Phi-3-small uses a tiktoken vocabulary.

CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "Write a function that reverses a string."},
        {"role": "assistant", "content": 'def reverse(s):\n    """Return s reversed."""\n    return s[::-1]'},
    ],
    "multi": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "12."},
        {"role": "user", "content": "Say it in words."},
        {"role": "assistant", "content": "Twelve."},
    ],
    "system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "11"},
    ],
    "code": [
        {"role": "user", "content": "Écris une fonction qui salue — 你好 🦙"},
        {"role": "assistant", "content": 'def grüße(name):\n\treturn f"Grüß Gott, {name} — 你好 🦙"'},
    ],
}
CASES = [pytest.param(pair, name, id=f"{pair.id}-{name}") for pair in PAIRS for name in CONVERSATIONS]
TRAINED = [case for case in CASES if case.values[1] not in case.values[0].refused]
BY_PAIR = [pytest.param(pair, id=pair.id) for pair in PAIRS]


def chat_ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    """apply_chat_template's token ids (transformers 5 returns a BatchEncoding unless told otherwise)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@dataclass
class Rendered:
    """A conversation as the template renders and the tokenizer tokenizes it, with its assistant turns' tokens."""

    ids: list[int]
    labels: list[int]  # the token where it lies in an assistant turn, else IGNORE_INDEX
    unmaskable: int | None  # index of the first assistant message whose turn does not start on the prompt's tokens


def render(tokenizer, messages, turn_end: str) -> Rendered:
    """Each assistant turn runs from where the template's generation prompt for it ends (the prompt rendered on its own
    must be a token prefix of the conversation: the reply is what a model generates after it) through the first
    `turn_end` after that."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    assert ids == chat_ids(tokenizer, messages)
    spans, unmaskable = [], None
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        prompt_ids = chat_ids(tokenizer, messages[:k], add_generation_prompt=True)
        if not text.startswith(prompt) or ids[:len(prompt_ids)] != prompt_ids:
            unmaskable = k if unmaskable is None else unmaskable
            continue
        end = text.index(turn_end, len(prompt)) + len(turn_end)
        assert message["content"].strip() in text[len(prompt):end]
        spans.append((len(prompt), end))
    assert not any(a < edge < b for a, b in offsets for span in spans for edge in span), "a token straddles a turn"
    labels = [token if any(a <= begin and end <= b for a, b in spans) else data.IGNORE_INDEX
              for token, (begin, end) in zip(ids, offsets)]
    return Rendered(ids, labels, unmaskable)


def trained_runs(tokenizer, ids, labels) -> list[str]:
    """Each maximal run of trained tokens, decoded."""
    runs, run = [], []
    for token, label in [*zip(ids, labels), (None, data.IGNORE_INDEX)]:
        if label != data.IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


@pytest.mark.parametrize("pair,conversation", CASES)
def test_the_template_decides_which_conversations_are_refused(real_tokenizer, pair, conversation):
    tokenizer, messages = pair.tokenizer(real_tokenizer), CONVERSATIONS[conversation]
    unmaskable = render(tokenizer, messages, pair.turn_end).unmaskable
    assert (unmaskable is not None) == (conversation in pair.refused)
    if unmaskable is not None:
        # named by its index in the row's messages list, as in the data file
        with pytest.raises(UserError, match=rf"(?i)(turn|message)s?\W{{0,3}}{unmaskable}\b"):
            data.encode_conversation(tokenizer, data.TEMPLATES[pair.qlora_template], messages)


@pytest.mark.parametrize("pair,conversation", TRAINED)
def test_ids_are_the_templates_own(real_tokenizer, pair, conversation):
    tokenizer, messages = pair.tokenizer(real_tokenizer), CONVERSATIONS[conversation]
    ids, _ = data.encode_conversation(tokenizer, data.TEMPLATES[pair.qlora_template], messages)
    assert tokenizer.decode(ids) == tokenizer.decode(chat_ids(tokenizer, messages))
    assert ids == chat_ids(tokenizer, messages)


@pytest.mark.parametrize("pair,conversation", TRAINED)
def test_exactly_the_assistant_turns_are_trained(real_tokenizer, pair, conversation):
    tokenizer, messages = pair.tokenizer(real_tokenizer), CONVERSATIONS[conversation]
    expected = render(tokenizer, messages, pair.turn_end)
    ids, labels = data.encode_conversation(tokenizer, data.TEMPLATES[pair.qlora_template], messages)
    assert trained_runs(tokenizer, ids, labels) == trained_runs(tokenizer, expected.ids, expected.labels)
    assert labels == expected.labels


@pytest.mark.parametrize("pair", BY_PAIR)
def test_generate_prompt_is_the_templates_and_the_training_prefix(real_tokenizer, pair):
    tokenizer, messages = pair.tokenizer(real_tokenizer), CONVERSATIONS["single"]
    template = data.TEMPLATES[pair.qlora_template]
    prompt = data.encode_prompt(tokenizer, template, messages[0]["content"])
    assert prompt == chat_ids(tokenizer, messages[:1], add_generation_prompt=True)
    if "single" not in pair.refused:
        ids, _ = data.encode_conversation(tokenizer, template, messages)
        assert ids[:len(prompt)] == prompt


@pytest.mark.parametrize("pair", BY_PAIR)
def test_the_templates_markers_are_tokens_of_the_vocabulary(real_tokenizer, pair):
    """As in the real model's tokenizer: the fixture adds none of these, the vocabulary holds them."""
    tokenizer = pair.tokenizer(real_tokenizer)
    text = tokenizer.apply_chat_template(CONVERSATIONS["system"], tokenize=False)
    markers = {pair.turn_end, *pair.added, *re.findall(r"<\|[^|<>\s]+\|>|<｜[^｜\s]+｜>", text)}
    assert {m: len(tokenizer(m, add_special_tokens=False)["input_ids"]) for m in markers} == dict.fromkeys(markers, 1)


@pytest.mark.parametrize("pair", [pair for pair in BY_PAIR if pair.values[0].refused != ALL])  # a run can exist
def test_stop_ids_hold_the_turn_end(real_tokenizer, pair):
    tokenizer = pair.tokenizer(real_tokenizer)
    turn_end = tokenizer.convert_tokens_to_ids(pair.turn_end)
    assert turn_end in data.stop_token_ids(tokenizer, data.TEMPLATES[pair.qlora_template])


# llama.cpp's reference tokenizations (models/ggml-vocab-*.gguf.inp/.out) were made with each model's own Hugging Face
# tokenizer. The GGUF loader rebuilds it from the vocabulary and merges, without Llama 3's `ignore_merges` (a word in the
# vocabulary is one token even where merges never build it) or DeepSeek's digit-and-symbol pre-tokenizer; and
# transformers 5's Llama tokenizer (Metaspace, prepend_scheme "first") adds no "▁" before a leading space where the
# older one did. These texts tokenize differently; every other one exactly as the real tokenizer.
DIFFERS = {
    "llama-bpe": lambda text: text == "Cửa Việt",
    "llama-spm": lambda text: text.startswith(" "),
    "deepseek-coder": lambda text: text == "ied 4 ½ months",
    "deepseek-llm": lambda text: text == "ied 4 ½ months",
}


@pytest.mark.parametrize("vocabulary", sorted({pair.vocabulary for pair in PAIRS}))
def test_the_vocabulary_tokenizes_as_the_real_models_tokenizer(llama_cpp, real_tokenizer, vocabulary):
    tokenizer = real_tokenizer(vocabulary)
    reference = llama_cpp / "models" / f"ggml-vocab-{vocabulary}.gguf"
    texts = reference.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = reference.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    differ = [text for text, line in zip(texts, expected, strict=False)
              if tokenizer(text, add_special_tokens=False)["input_ids"] != [int(i) for i in line.split()]]
    assert len(texts) >= 40 and [text for text in differ if not DIFFERS.get(vocabulary, bool)(text)] == []


def test_check_prints_the_assistant_turns_as_trained(tmp_path, real_tokenizer):
    """`qlora check` on a model whose tokenizer is a real one: its printed example shows the same trained spans."""
    from rich.console import Console

    from qlora.check import check, print_report
    from qlora.tiny import build_config

    pair = PAIRS[0]  # Qwen2.5's base vocabulary (EOS <|endoftext|>) with Qwen2.5-7B-Instruct's template
    tokenizer, messages = pair.tokenizer(real_tokenizer), CONVERSATIONS["system"]
    model = tmp_path / "model"  # check reads the config and tokenizer only, never weights
    tokenizer.save_pretrained(model)
    build_config("qwen2", tokenizer).save_pretrained(model)
    recipe = recipe_for(tmp_path, model, [{"messages": messages}],
                        data={"format": "messages", "template": "tokenizer"})
    report = check(recipe)
    out = io.StringIO()
    print_report(report, recipe, Console(file=out, width=100_000))
    example = out.getvalue().split("example 1 (masked / trained):\n", 1)[1]
    spans = re.findall(r"\[([-+])(.*?)\1\]", example, flags=re.DOTALL)
    expected = render(tokenizer, messages, pair.turn_end)
    assert [text for mark, text in spans if mark == "+"] == trained_runs(tokenizer, expected.ids, expected.labels)
    assert "".join(text for _, text in spans) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_a_cache_unpacked_with_other_files_is_never_taken_for_this_one(monkeypatch):
    """A llama.cpp tree unpacked before the vocabularies and templates were kept lives in a directory of its own name."""
    from qlora import llamacpp

    current = llamacpp.default_cache()
    monkeypatch.setattr(llamacpp, "KEEP", (llamacpp.CONVERTER, "LICENSE", "conversion/", "gguf-py/gguf/",
                                           "gguf-py/LICENSE", "models/ggml-vocab-gpt-2.gguf",
                                           "models/ggml-vocab-qwen2.gguf"))
    assert llamacpp.default_cache().parent == current.parent and llamacpp.default_cache() != current
