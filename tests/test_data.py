"""Loss masking, EOS and BOS per format and template, pinned token by token; bad and long rows."""

import ast
import json
from pathlib import Path

import pytest

from conftest import ROW, ROW_WITH_INPUT
from qlora.config import DataSection, ModelSection
from qlora.data import (IGNORE_INDEX, TEMPLATES, Template, encode_prompt, encode_segments, load_rows, row_segments,
                        split_eval, tokenize_rows)
from qlora.errors import UserError
from qlora.model import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CODE_ALPACA = ROOT.parent / "shared" / "data" / "code_alpaca_2k.json"
SAMPLE = ROOT / "src" / "qlora" / "sample_data" / "python_tasks.json"
CHATML_JINJA = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Square x."},
    {"role": "assistant", "content": "x * x"},
    {"role": "user", "content": "Now cube it."},
    {"role": "assistant", "content": "x ** 3"},
]


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    toks = {arch: load_tokenizer(ModelSection(name_or_path=str(tiny_model(arch)))) for arch in ("gemma", "llama")}
    toks["gemma"].chat_template = CHATML_JINJA  # for template: tokenizer
    return toks


def encode(tok, row, **data):
    section = DataSection(path="x.json", **data)
    return encode_segments(tok, row_segments(row, section, TEMPLATES[section.template], tok))


def ids_of(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


@pytest.mark.parametrize("template", ["alpaca", "chatml", "llama-2", "gemma", "raw", "tokenizer"])
@pytest.mark.parametrize("row", [ROW, ROW_WITH_INPUT], ids=["no-input", "with-input"])
def test_alpaca_rows_mask_the_prompt_and_train_the_reply_through_its_end(tokenizers, template, row):
    tok, t = tokenizers["gemma"], TEMPLATES[template]
    ids, labels = encode(tok, row, template=template)
    prompt = encode_prompt(tok, t, row["instruction"], row["input"])  # what generate feeds the model
    # the gemma twin has <end_of_turn> as one special token, as Gemma's vocabulary: it ends the reply, the newline
    # after it is not trained and no EOS follows; chatml's <|im_end|> is text to it, so EOS ends those replies
    reply, after = {"gemma": (ids_of(tok, row["output"] + "<end_of_turn>"), ids_of(tok, "\n")),
                    "tokenizer": (ids_of(tok, row["output"] + "<|im_end|>\n") + [tok.eos_token_id], [])}.get(
        template, (ids_of(tok, row["output"] + t.reply_end) + [tok.eos_token_id], []))
    assert ids == prompt + reply + after
    assert labels == [IGNORE_INDEX] * len(prompt) + reply + [IGNORE_INDEX] * len(after)
    bos = 0 if template == "tokenizer" else 1  # a chat template writes its own BOS (this one none), ours the family's
    assert ids.count(tok.bos_token_id) == bos and ids[:bos] == [tok.bos_token_id] * bos
    assert row["input"] in tok.decode(prompt) and row["instruction"] in tok.decode(prompt)


def test_alpaca_prompt_text_is_the_standard_one():
    assert TEMPLATES["alpaca"].render("Do X") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo X\n\n### Response:\n")
    assert TEMPLATES["alpaca"].render("Do X", "data") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo X\n\n### Input:\ndata"
        "\n\n### Response:\n")
    assert TEMPLATES["gemma"].render("Hi") == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert TEMPLATES["llama-2"].render("Hi") == "[INST] Hi [/INST]"
    assert TEMPLATES["chatml"].render("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("template", ["chatml", "gemma", "llama-2", "tokenizer"])
def test_messages_train_every_assistant_turn_and_nothing_else(tokenizers, template):
    tok = tokenizers["gemma"]
    ids, labels = encode(tok, {"messages": CONVERSATION}, format="messages", template=template)
    trained = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
    spans = tok.decode([ids[i] for i in trained], skip_special_tokens=False)
    end = {"chatml": "<|im_end|>\n<eos>", "gemma": "<end_of_turn>", "llama-2": "<eos>",
           "tokenizer": "<|im_end|>\n<eos>"}[template]
    assert spans == f"x * x{end}x ** 3{end}"
    masked = tok.decode([t for t, x in zip(ids, labels) if x == IGNORE_INDEX])
    assert "You write Python." in masked and "Square x." in masked and "Now cube it." in masked


def test_system_text_goes_where_each_template_puts_it():
    system = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "U"}]
    render = lambda name: "".join(t for t, _ in TEMPLATES[name].segments(system, add_generation_prompt=True))  # noqa: E731
    assert render("llama-2") == "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nU [/INST]"
    assert render("gemma") == "<start_of_turn>user\nSYS\n\nU<end_of_turn>\n<start_of_turn>model\n"
    assert render("chatml").startswith("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nU")


def test_prompt_completion_masks_the_prompt(tokenizers):
    tok = tokenizers["llama"]
    ids, labels = encode(tok, {"prompt": "Q: 2+2?\nA:", "completion": " 4"}, format="prompt_completion")
    prompt = encode_prompt(tok, TEMPLATES["raw"], "Q: 2+2?\nA:")
    assert ids[:len(prompt)] == prompt and labels == [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
    # the completion's one space is its own `▁`, not doubled by a dummy prefix of its own
    assert "".join(tok.convert_ids_to_tokens(ids[len(prompt):])) == "▁4</s>"


def test_text_format_trains_every_token_and_the_eos(tokenizers):
    tok = tokenizers["gemma"]
    text = "### Human: hi ### Assistant: hello"
    ids, labels = encode(tok, {"text": text}, format="text")
    assert ids == ids_of(tok, text + tok.eos_token, special=True)
    assert labels == [IGNORE_INDEX] + ids[1:]  # all but the BOS, which nothing predicts


def test_fields_map_our_names_to_the_file_columns(tokenizers):
    tok = tokenizers["gemma"]
    renamed = {"question": ROW["instruction"], "response": ROW["output"]}
    assert encode(tok, renamed, fields={"instruction": "question", "output": "response"}) == encode(tok, ROW)
    with pytest.raises(ValueError, match="data.fields.answer is not a field of format alpaca"):
        DataSection(path="x.json", fields={"answer": "a"})


def test_eos_is_trained_when_pad_equals_eos_through_the_trainer_collator(tokenizers):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = tokenizers["llama"]
    assert tok.pad_token_id == tok.eos_token_id  # llama ships no pad token: we pad with EOS
    short, long_ = encode(tok, ROW), encode(tok, ROW_WITH_INPUT)
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(
        [{"input_ids": i, "labels": l} for i, l in (short, long_)])
    n = len(short[0])
    assert n < batch["input_ids"].shape[1]
    assert batch["labels"][0, n - 1].item() == tok.eos_token_id  # the real EOS: trained
    assert (batch["input_ids"][0, n:] == tok.eos_token_id).all()  # padding is EOS too...
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # ...but masked by position, not by id


def test_exactly_one_bos_even_if_the_template_writes_one(tokenizers):
    tok = tokenizers["llama"]
    template = Template("bos", first_user=tok.bos_token + "{content}")
    assert encode_prompt(tok, template, "x").count(tok.bos_token_id) == 1


def write(tmp_path, rows, name="d.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return str(path)


def tokenize(tmp_path, tok, rows, **data):
    section = DataSection(path=write(tmp_path, rows), **data)
    return tokenize_rows(load_rows(section), tok, TEMPLATES[section.template], section, section.path)


def test_long_rows_are_dropped_and_counted_by_default(tmp_path, tokenizers):
    tok = tokenizers["gemma"]
    ids, labels, report = tokenize(tmp_path, tok, [ROW, {**ROW, "output": "x = 1\n" * 200}, ROW], max_length=128)
    assert len(ids) == 2 and report.dropped_too_long == [1] and "1 dropped" in report.summary()
    assert report.stop_trained == report.examples == 2


def test_truncate_keeps_trained_tokens_and_drops_rows_left_with_none(tmp_path, tokenizers):
    tok = tokenizers["gemma"]
    prompt_len = len(encode_prompt(tok, TEMPLATES["alpaca"], ROW["instruction"]))
    rows = [{**ROW, "output": "y = 2\n" * 200}, {**ROW, "instruction": "word " * 300}]
    ids, labels, report = tokenize(tmp_path, tok, rows, max_length=prompt_len + 10, too_long="truncate")
    assert report.truncated == [0] and report.dropped_too_long == [1]
    assert len(labels[0]) == prompt_len + 10 and sum(x != IGNORE_INDEX for x in labels[0]) == 10
    assert report.stop_trained == 0  # reported by `qlora check`: truncated rows never see their end


def test_too_long_error_names_the_row(tmp_path, tokenizers):
    with pytest.raises(UserError, match="row 1 has"):
        tokenize(tmp_path, tokenizers["gemma"], [ROW, {**ROW, "output": "z = 3\n" * 200}], max_length=128,
                 too_long="error")


BAD_ROWS = [ROW, {**ROW, "output": ""}, {"instruction": "x"}, ROW, {**ROW, "output": "  "}, {**ROW, "input": 3}]


def test_invalid_rows_are_reported_by_kind_with_row_numbers(tmp_path, tokenizers):
    with pytest.raises(UserError) as info:
        tokenize(tmp_path, tokenizers["gemma"], BAD_ROWS)
    message = str(info.value)
    assert "4 of 6 rows are invalid" in message and "data.skip_invalid" in message
    assert "2 empty output (rows 1, 4)" in message and "1 missing output (rows 2)" in message
    assert "1 non-string input (rows 5)" in message


def test_skip_invalid_drops_them_with_a_summary_but_not_past_the_limit(tmp_path, tokenizers):
    tok = tokenizers["gemma"]
    rows = [ROW] * 97 + [{**ROW, "output": ""}] * 3
    ids, _, report = tokenize(tmp_path, tok, rows, skip_invalid=True)
    assert len(ids) == 97 and "skipped 3 of 100 rows are invalid: 3 empty output (rows 97, 98, 99)" in report.summary()
    with pytest.raises(UserError, match="over data.max_invalid_fraction=0.05"):
        tokenize(tmp_path, tok, BAD_ROWS, skip_invalid=True)


@pytest.mark.parametrize("messages, kind", [
    ([{"role": "user", "content": "hi"}], "messages without an assistant turn"),
    ([{"role": "bot", "content": "hi"}], "messages with a turn that is not"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "messages with an empty assistant"),
    ("hi", "messages not a non-empty list"),
])
def test_bad_conversations_are_named(tmp_path, tokenizers, messages, kind):
    with pytest.raises(UserError, match=kind):
        tokenize(tmp_path, tokenizers["gemma"], [{"messages": messages}], format="messages")


def test_every_file_format_gives_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [ROW, ROW_WITH_INPUT]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "d.csv", index=False)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "saved")
    for name in ("d.jsonl", "d.parquet", "d.csv", "saved"):
        assert load_rows(DataSection(path=str(tmp_path / name))) == rows, name
    assert load_rows(DataSection(path=write(tmp_path, rows))) == rows


def test_broken_jsonl_line_and_missing_file_are_named(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROW) + "\n{oops\n")
    with pytest.raises(UserError, match="line 2"):
        load_rows(DataSection(path=str(tmp_path / "d.jsonl")))
    with pytest.raises(UserError, match="file not found"):
        load_rows(DataSection(path=str(tmp_path / "nope.csv")))


def test_jsonl_splits_on_newlines_only_and_a_bom_is_accepted(tmp_path):
    rows = [dict(ROW, output="a = 1\u2028b = 2\x1c\x85"), ROW_WITH_INPUT]  # characters str.splitlines splits on
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False)
                                                                 for r in rows).encode())
    assert load_rows(DataSection(path=str(tmp_path / "d.jsonl"))) == rows
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbfinstruction,output\nx,y\n")
    assert load_rows(DataSection(path=str(tmp_path / "d.csv"))) == [{"instruction": "x", "output": "y"}]


@pytest.mark.parametrize("name, content, message", [
    ("d.json", b"\x89PNG\r\n\x1a\n\0\0", "is a binary file"),
    ("d.jsonl", json.dumps(ROW).replace("string", "caf\u00e9").encode("latin-1"), "is not UTF-8 text (byte 0xe9 on line 1)"),
    ("d.csv", "instruction,output\ncaf\u00e9,x\n".encode("cp1252"), "is not UTF-8 text (byte 0xe9 on line 2)"),
    ("d.parquet", b"PAR1 not parquet PAR1", "is not a readable Parquet file"),
    ("d.json", b'{"rows": []}', "holds a JSON dict; expected a list of rows"),
])
def test_files_that_are_not_what_they_claim_are_one_line_naming_the_key_and_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    for key in ("path", "eval_path"):
        data = DataSection(path=str(tmp_path / name), eval_path=str(tmp_path / name))
        with pytest.raises(UserError) as info:
            load_rows(data, key)
        assert str(info.value).startswith(f"data.{key}: {tmp_path / name}") and message in str(info.value)
        assert "\n" not in str(info.value)


def test_eval_split_is_seeded_and_disjoint():
    ids = [[i] for i in range(100)]
    (train, _), (held, _) = split_eval(ids, ids, 0.1, seed=1)
    assert len(held) == 10 and len(train) == 90 and not set(map(tuple, train)) & set(map(tuple, held))
    assert split_eval(ids, ids, 0.1, seed=1)[1][0] == held != split_eval(ids, ids, 0.1, seed=2)[1][0]


@pytest.mark.skipif(not CODE_ALPACA.is_file(), reason="../shared/data/code_alpaca_2k.json is not in this checkout")
def test_real_code_alpaca_file_names_its_empty_outputs(tokenizers):
    data = DataSection(path=str(CODE_ALPACA))
    with pytest.raises(UserError) as info:
        tokenize_rows(load_rows(data), tokenizers["gemma"], TEMPLATES["alpaca"], data, data.path)
    assert "2 of 2017 rows are invalid: 2 empty output (rows 237, 1859)" in str(info.value)


def test_sample_data_is_at_least_200_correct_python_tasks():
    rows = json.loads(SAMPLE.read_text(encoding="utf-8"))
    checks = json.loads((Path(__file__).parent / "sample_data_checks.json").read_text(encoding="utf-8"))
    assert len(rows) >= 200
    assert len({r["instruction"] for r in rows}) == len(rows)
    for index, row in enumerate(rows):
        assert set(row) == {"instruction", "input", "output"}
        ast.parse(row["output"])
        # each solution runs and passes the asserts written for its task (INPUT: the row's input field)
        namespace = {"__name__": "sample", "INPUT": row["input"]}
        exec(compile(row["output"], f"<row {index} output>", "exec"), namespace)  # noqa: S102 - our own data
        exec(compile(checks[row["instruction"]], f"<row {index} check>", "exec"), namespace)  # noqa: S102


def test_a_format_that_matches_no_row_says_which_columns_the_file_has(tmp_path, tokenizers):
    with pytest.raises(UserError, match="Does data.format \\(messages\\) match the file\\? Its first row has the "
                                        "columns instruction, input, output"):
        tokenize(tmp_path, tokenizers["gemma"], [ROW, ROW_WITH_INPUT], format="messages")


def test_train_on_inputs_makes_every_token_a_label(tmp_path, tokenizers):
    tok = tokenizers["gemma"]
    masked_ids, masked, _ = tokenize(tmp_path, tok, [ROW, ROW_WITH_INPUT])
    ids, labels, report = tokenize(tmp_path, tok, [ROW, ROW_WITH_INPUT], train_on_inputs=True)
    assert ids == masked_ids and labels == ids  # the same tokens, all trained
    assert any(IGNORE_INDEX in lab for lab in masked)
    assert report.trained_tokens == report.tokens


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from qlora.tiny import build_tokenizer

    return build_tokenizer("qwen2")


@pytest.mark.parametrize("name", ["qwen2_5_training", "qwen2_5"])
def test_generation_markers_of_trl_training_templates_decide_what_is_trained(qwen_tokenizer, name):
    """TRL ships each model's template and a training variant with {% generation %} around the assistant's text;
    with the markers, qlora trains exactly the marked text (transformers' assistant mask), without them the text
    through the turn end. Both on Qwen2.5's real vocabulary (the qwen2 twin's) and its real templates."""
    import trl

    tok = qwen_tokenizer
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")
    messages = [{"role": "user", "content": "Square x."}, {"role": "assistant", "content": "x * x"},
                {"role": "user", "content": "Cube it."}, {"role": "assistant", "content": "x ** 3"}]
    ids, labels = encode_segments(tok, row_segments({"messages": messages}, DataSection(
        path="x.json", format="messages", template="tokenizer"), TEMPLATES["tokenizer"], tok))
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    trained = tok.decode([t for t, x in zip(ids, labels) if x != IGNORE_INDEX])
    if name.endswith("_training"):  # TRL's markers hold the newline before and after the reply
        assert trained == "\nx * x<|im_end|>\n\nx ** 3<|im_end|>\n"
    else:
        assert trained == "x * x<|im_end|>x ** 3<|im_end|>"
