"""Token-level truth, for every twin, template and format: the ids trained on are the ids a consumer gets.

The consumer is plain transformers: the merged model's chat template renders the conversation and
`apply_chat_template(..., tokenize=True)` tokenizes it. Training must have used exactly those ids, with
no reply starting on a spurious prefix (SentencePiece's `▁`), and generate's prompt must be the
training sequence's prefix token for token.
"""

import pytest
from transformers import AutoTokenizer

from conftest import ROW, ROW_WITH_INPUT
from qlora.config import DataSection
from qlora.data import (IGNORE_INDEX, TEMPLATES, adds_bos, encode_prompt, encode_segments, row_segments, stop_token_ids,
                        turn_end)
from qlora.merge import chat_template
from qlora.tiny import ARCHITECTURES

CHAT_TEMPLATES = ("alpaca", "chatml", "llama-2", "gemma")
CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Reverse a string."},
    {"role": "assistant", "content": ROW["output"]},
    {"role": "user", "content": "Now with a loop, über-simple ✓"},
    {"role": "assistant", "content": "def reverse(s):\n\tout = ''\n\tfor c in s:\n\t\tout = c + out\n\treturn out"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    loaded = {}

    def get(arch):
        if arch not in loaded:
            loaded[arch] = AutoTokenizer.from_pretrained(tiny_model(arch))
        return loaded[arch]

    return get


def consumer(tok, template_name, messages):
    """What plain transformers does with the merged model: render with its chat template, tokenize that."""
    template = TEMPLATES[template_name]
    tok.chat_template = chat_template(template, adds_bos(tok), turn_end(template, tok) is None)
    text = tok.apply_chat_template(messages, tokenize=False)
    return text, tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def trained_runs(ids, labels):
    """The token runs that are trained, in order."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_multi_turn_training_ids_are_what_the_merged_chat_template_gives(tokenizer, arch, template):
    tok = tokenizer(arch)
    data = DataSection(path="x.json", format="messages", template=template)
    ids, labels = encode_segments(tok, row_segments({"messages": CONVERSATION}, data, TEMPLATES[template], tok))
    text, consumer_ids = consumer(tok, template, CONVERSATION)
    assert ids == consumer_ids, f"{arch}/{template}: training ids differ from the consumer's for {text!r}"
    if adds_bos(tok):  # exactly one BOS, where the family adds one
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    runs = trained_runs(ids, labels)
    assert len(runs) == len(replies)
    end = turn_end(TEMPLATES[template], tok)
    for run, reply in zip(runs, replies):
        # a reply ends with the template's own turn end where the tokenizer has it as one token (the twins with
        # <end_of_turn> / <|im_end|>), with EOS elsewhere: never with both, and the newline after it is not trained
        assert run[-1] == (tok.convert_tokens_to_ids(end) if end else tok.eos_token_id)
        assert run.count(tok.eos_token_id) == (0 if end else 1)
        # the reply's first token is the one a joint tokenization gives: no `▁` prefix where the text has no space
        assert tok.decode(run, skip_special_tokens=True).startswith(reply)
        first = tok.convert_ids_to_tokens(run[0])
        assert not first.startswith(("▁", "Ġ")) or reply[:1] == " ", (arch, template, first)


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_prompt_is_the_training_prefix_token_for_token(tokenizer, arch, template):
    tok = tokenizer(arch)
    for row in (ROW, ROW_WITH_INPUT):
        data = DataSection(path="x.json", template=template)
        ids, labels = encode_segments(tok, row_segments(row, data, TEMPLATES[template], tok))
        first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert encode_prompt(tok, TEMPLATES[template], row["instruction"], row["input"]) == ids[:first_trained]
        end = "" if turn_end(TEMPLATES[template], tok) else tok.eos_token
        assert tok.decode(ids[first_trained:]) == row["output"] + TEMPLATES[template].reply_end + end
        assert stop_token_ids(tok, TEMPLATES[template])[0] == tok.eos_token_id


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prompt_completion_and_text_formats_tokenize_as_one_string(tokenizer, arch):
    tok = tokenizer(arch)
    raw = TEMPLATES["raw"]
    row = {"prompt": "Q: what is 2 + 2?\nA:", "completion": " 4"}
    ids, labels = encode_segments(tok, row_segments(row, DataSection(path="x", format="prompt_completion"), raw, tok))
    messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    assert ids == consumer(tok, "raw", messages)[1]
    prompt = encode_prompt(tok, raw, row["prompt"])
    assert ids[:len(prompt)] == prompt and all(label == IGNORE_INDEX for label in labels[:len(prompt)])
    assert labels[len(prompt):] == ids[len(prompt):]
    text = "def add(a, b):\n    return a + b"
    ids, labels = encode_segments(tok, row_segments({"text": text}, DataSection(path="x", format="text"), raw, tok))
    bos = tok.bos_token if adds_bos(tok) else ""
    assert ids == tok(bos + text + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert labels[-1] == tok.eos_token_id
