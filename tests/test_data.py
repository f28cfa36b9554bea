"""Loss masking, EOS and BOS on real rows, long and bad rows, and our own sample data."""

import ast
import json
from pathlib import Path

import pytest

from conftest import ROW, ROW_WITH_INPUT
from qlora.config import DataSection
from qlora.data import IGNORE_INDEX, TEMPLATES, Template, build_dataset, encode_example, encode_prompt, load_rows
from qlora.errors import UserError
from qlora.model import load_tokenizer
from qlora.config import ModelSection

ALPACA = TEMPLATES["alpaca"]
CODE_ALPACA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "code_alpaca_2k.json"
SAMPLE = Path(__file__).resolve().parents[1] / "src" / "qlora" / "sample_data" / "python_tasks.json"


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    return {arch: load_tokenizer(ModelSection(name_or_path=str(tiny_model(arch)))) for arch in ("gemma", "llama")}


@pytest.mark.parametrize("row", [ROW, ROW_WITH_INPUT], ids=["no-input", "with-input"])
def test_prompt_is_masked_and_response_plus_eos_trained(tokenizers, row):
    tok = tokenizers["gemma"]
    ids, labels = encode_example(tok, ALPACA, row)
    prompt = tok(ALPACA.render(row["instruction"], row["input"]))["input_ids"]
    response = tok(row["output"], add_special_tokens=False)["input_ids"]
    assert ids == prompt + response + [tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * len(prompt) + response + [tok.eos_token_id]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids[len(prompt):-1]) == row["output"]
    assert "### Input:" in tok.decode(prompt) if row["input"] else "### Input:" not in tok.decode(prompt)


def test_generate_prompt_is_the_training_prefix(tokenizers):
    tok = tokenizers["gemma"]
    ids, labels = encode_example(tok, ALPACA, ROW_WITH_INPUT)
    prompt = encode_prompt(tok, ALPACA, ROW_WITH_INPUT["instruction"], ROW_WITH_INPUT["input"])
    assert ids[: len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE_INDEX != labels[len(prompt)]


def test_eos_is_trained_when_pad_equals_eos_through_the_trainer_collator(tokenizers):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = tokenizers["llama"]
    assert tok.pad_token_id == tok.eos_token_id  # llama ships no pad token: we pad with EOS
    short, long_ = encode_example(tok, ALPACA, ROW), encode_example(tok, ALPACA, ROW_WITH_INPUT)
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(
        [{"input_ids": i, "labels": l} for i, l in (short, long_)]
    )
    n = len(short[0])
    assert n < batch["input_ids"].shape[1]
    assert batch["labels"][0, n - 1].item() == tok.eos_token_id  # the real EOS: trained
    assert (batch["input_ids"][0, n:] == tok.eos_token_id).all()  # padding is EOS too...
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # ...but masked by position, not by id


def test_exactly_one_bos_even_if_the_template_writes_one(tokenizers):
    tok = tokenizers["llama"]
    template = Template("bos", tok.bos_token + ALPACA.prompt_no_input, tok.bos_token + ALPACA.prompt_with_input)
    assert encode_prompt(tok, template, "x").count(tok.bos_token_id) == 1


def section(tmp_path, rows, **kw):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    return DataSection(path=str(path), **kw)


def test_long_rows_are_dropped_and_counted_by_default(tmp_path, tokenizers):
    tok = tokenizers["gemma"]
    long_row = {**ROW, "output": "x = 1\n" * 200}
    data = section(tmp_path, [ROW, long_row, ROW], max_length=128)
    dataset, report = build_dataset(load_rows(data), tok, ALPACA, data)
    assert len(dataset) == 2 and report.dropped_too_long == [1]
    assert "1 dropped" in report.summary()
    assert all(row["labels"][-1] == tok.eos_token_id for row in dataset)


def test_truncate_keeps_trained_tokens_and_drops_rows_left_with_none(tmp_path, tokenizers):
    tok = tokenizers["gemma"]
    prompt_len = len(encode_prompt(tok, ALPACA, ROW["instruction"]))
    huge_prompt = {**ROW, "instruction": "word " * 300}
    data = section(tmp_path, [{**ROW, "output": "y = 2\n" * 200}, huge_prompt], max_length=prompt_len + 10,
                   too_long="truncate")
    dataset, report = build_dataset(load_rows(data), tok, ALPACA, data)
    assert report.truncated == [0] and report.dropped_too_long == [1]
    labels = dataset[0]["labels"]
    assert len(labels) == prompt_len + 10 and sum(x != IGNORE_INDEX for x in labels) == 10


def test_too_long_error_names_the_row(tmp_path, tokenizers):
    data = section(tmp_path, [ROW, {**ROW, "output": "z = 3\n" * 200}], max_length=128, too_long="error")
    with pytest.raises(UserError, match="row 1 has"):
        build_dataset(load_rows(data), tokenizers["gemma"], ALPACA, data)


def test_invalid_rows_are_reported_by_kind_with_row_numbers(tmp_path, tokenizers):
    rows = [ROW, {**ROW, "output": ""}, {"instruction": "x"}, ROW, {**ROW, "output": "  "}, {**ROW, "input": 3}]
    data = section(tmp_path, rows)
    with pytest.raises(UserError) as info:
        build_dataset(load_rows(data), tokenizers["gemma"], ALPACA, data)
    message = str(info.value)
    assert "4 of 6 rows are invalid" in message
    assert "2 empty output (rows 1, 4)" in message and "1 missing output (rows 2)" in message
    assert "1 non-string input (rows 5)" in message


def test_jsonl_and_json_give_the_same_rows(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in (ROW, ROW_WITH_INPUT)) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([ROW, ROW_WITH_INPUT]))
    assert load_rows(DataSection(path=str(tmp_path / "d.jsonl"))) == load_rows(DataSection(path=str(tmp_path / "d.json")))


def test_broken_jsonl_line_is_named(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROW) + "\n{oops\n")
    with pytest.raises(UserError, match="line 2"):
        load_rows(DataSection(path=str(tmp_path / "d.jsonl")))


@pytest.mark.skipif(not CODE_ALPACA.is_file(), reason="../shared/data/code_alpaca_2k.json is not in this checkout")
def test_real_code_alpaca_file_names_its_empty_outputs(tokenizers):
    data = DataSection(path=str(CODE_ALPACA))
    with pytest.raises(UserError) as info:
        build_dataset(load_rows(data), tokenizers["gemma"], ALPACA, data)
    assert "2 of 2017 rows are invalid: 2 empty output (rows 237, 1859)" in str(info.value)


def test_sample_data_is_at_least_200_correct_python_tasks():
    rows = json.loads(SAMPLE.read_text(encoding="utf-8"))
    assert len(rows) >= 200
    assert len({r["instruction"] for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        ast.parse(row["output"])
