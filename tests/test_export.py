"""qlora export: a memorised twin shipped as GGUF + Ollama Modelfile, judged by gguf-py and the tokenizer."""

import re

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from conftest import ROW
from qlora.cli import app
from qlora.data import Template, encode_prompt, encode_text
from qlora.errors import UserError
from qlora.export import export
from qlora.llamacpp import gguf_reader
from qlora.rundir import ADAPTER_DIR


def test_export_writes_a_gguf_of_the_merged_model_and_a_modelfile_with_the_training_prompt(
        memorised_run, tmp_path, llama_cpp):
    gguf, modelfile = export(memorised_run, tmp_path / "ship", "q8_0", llama_cpp)
    assert gguf == tmp_path / "ship" / f"{memorised_run.name}-q8_0.gguf"
    assert sorted(p.name for p in (tmp_path / "ship").iterdir()) == [".qlora.json", "Modelfile", "README.md", gguf.name]

    tokenizer = AutoTokenizer.from_pretrained(memorised_run / ADAPTER_DIR)
    reader = gguf_reader(gguf, llama_cpp)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True  # llama.cpp puts BOS before TEMPLATE

    text = modelfile.read_text()
    assert text.startswith(f"FROM ./{gguf.name}\n")
    assert f'PARAMETER stop "{tokenizer.eos_token}"' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    rendered = template.replace("{{ .Prompt }}", ROW["instruction"])  # what Ollama sends for this instruction
    assert encode_text(tokenizer, rendered) == encode_prompt(tokenizer, Template.load(memorised_run / ADAPTER_DIR),
                                                             ROW["instruction"])


def test_export_never_replaces_what_it_did_not_write(memorised_run, tmp_path, llama_cpp):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="--output .* exists and is not empty"):
        export(memorised_run, tmp_path / "mine", llama_cpp=llama_cpp)
    with pytest.raises(UserError, match="so --overwrite will not delete it"):
        export(memorised_run, tmp_path / "mine", llama_cpp=llama_cpp, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    result = CliRunner().invoke(app, ["export", str(memorised_run), "--output", str(tmp_path / "x"),
                                      "--outtype", "q4"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --outtype 'q4': choose f16, bf16, q8_0, f32")
