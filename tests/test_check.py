"""qlora check: the pre-flight report, its exit codes, and the memory estimate's arithmetic."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROW, ROW_WITH_INPUT
from qlora.check import GB, check, estimate_memory, model_shape, packing_efficiency, padding_efficiency
from qlora.config import validate_recipe
from qlora.errors import UserError
from qlora.train import train

CODE_ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "code_alpaca_2k.json"
needs_code_alpaca = pytest.mark.skipif(not CODE_ALPACA.is_file(), reason="../shared/data/code_alpaca_2k.json absent")


def test_report_on_clean_data(make_recipe):
    report = check(make_recipe(rows=[ROW, ROW_WITH_INPUT, ROW]))
    d = report.data
    assert report.errors == [] and d.rows_total == 3 and d.examples == 3 and d.stop_trained == 3
    assert 0 < d.trained_tokens < d.tokens
    assert report.length_stats["min"] <= report.length_stats["median"] <= report.length_stats["max"]
    assert sum(c for _, _, c in report.histogram) == 3
    # r=16 x (in+out) over the tiny Gemma's 14 linears: 2 layers x (q 128+128, k and v 128+32, o 128+128,
    # gate and up 128+1024, down 1024+128) = 2 x 4288 x 16
    assert report.trainable_parameters == 137_216
    first = report.examples[0]
    assert [trained for _, trained in first] == [False, True]
    assert first[1][0] == ROW["output"] + "<eos>"


def test_train_stops_on_the_same_error_check_reports(make_recipe):
    recipe = make_recipe(rows=[ROW, {**ROW, "output": ""}])
    report = check(recipe)
    with pytest.raises(UserError) as info:
        train(recipe)
    assert report.errors == [str(info.value)] and "rows 1" in str(info.value)
    assert not Path(recipe.train.output_dir).exists()


def test_efficiencies():
    assert padding_efficiency([10, 10, 10, 10], 2, seed=0) == 1.0
    assert padding_efficiency([10, 30], 2, seed=0) == 40 / 60
    assert packing_efficiency([60, 40, 50, 50], 100) == 1.0  # 60+40 and 50+50
    assert packing_efficiency([70, 70], 100) == 140 / 200


def test_memory_estimate_arithmetic_on_the_real_gemma_2b_shape(tmp_path):
    from transformers import GemmaConfig

    GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                num_attention_heads=8, num_key_value_heads=1, head_dim=256).save_pretrained(tmp_path)
    raw = {"model": {"name_or_path": str(tmp_path)}, "quantization": {"compute_dtype": "bfloat16"},
           "data": {"path": "x.json"},
           "train": {"output_dir": "x", "batch_size": 4, "optimizer": "paged_adamw_8bit"}}
    recipe = validate_recipe(raw, "r")
    shape = model_shape(recipe)
    assert shape.lora == 19_611_648  # the figure peft prints for Gemma-2B, r=16, all-linear
    m = estimate_memory(recipe, shape, tokens=4 * 1024)
    parts = m["parts"]
    assert parts["nf4_weights"] == shape.quantized / 2
    # one chunk of 2^25 // 256000 = 131 tokens of logits (bf16 matmul output + float32 copy) + hidden states, gradient
    assert parts["lm_head_chunk"] == 131 * 256000 * (2 + 4) + 2 * 4 * 1024 * 2048 * 4
    assert m["unfused_logits"] == 4 * 1024 * 256000 * (2 + 4 + 4)
    assert parts["lora_weights_grads_optimizer"] == shape.lora * 10
    # bf16 compute: the tied 256k x 2048 embedding in bf16 (0.98 GiB), the norms in float32
    assert shape.embeddings == 256000 * 2048 and 0 < shape.other - shape.embeddings < 100_000
    assert parts["unquantized_weights"] == shape.embeddings * 2 + (shape.other - shape.embeddings) * 4
    assert m["activations_with_checkpointing"] < m["activations_without_checkpointing"]
    assert 4.7 * GB < m["total"] < 5 * GB  # 4.88 GiB
    single_quant = {"compute_dtype": "bfloat16", "double_quant": False}
    single = estimate_memory(validate_recipe({**raw, "quantization": single_quant}, "r"), shape, 4 * 1024)
    assert single["parts"]["quantization_constants"] > 3 * parts["quantization_constants"]
    # float16 keeps peft's float32 upcast (fp16's range); the residual stream is float32 either way (the norms)
    fp16 = estimate_memory(validate_recipe({**raw, "quantization": {"compute_dtype": "float16"}}, "r"), shape, 4 * 1024)
    assert fp16["parts"]["unquantized_weights"] == shape.other * 4
    # trained tokens: peft builds the whole input embedding's gradient (float32), unless the embedding trains whole
    assert "trained_token_embedding_gradient" not in parts
    tokens = {"trained_tokens": ["<|im_start|>"]}
    rows = estimate_memory(validate_recipe({**raw, "lora": tokens}, "r"), shape, 4 * 1024)["parts"]
    assert rows["trained_token_embedding_gradient"] == 256000 * 2048 * 4
    whole = validate_recipe({**raw, "lora": {**tokens, "modules_to_save": ["embed_tokens"]}}, "r")
    assert "trained_token_embedding_gradient" not in estimate_memory(whole, shape, 4 * 1024)["parts"]
    assert fp16["activations_with_checkpointing"] == m["activations_with_checkpointing"]
    # the checkpointed layer inputs, one layer's saved tensors, the largest weight dequantized (16384 x 2048)
    per_layer = 4 * 1024 * (22 * 16384 + 48 * 2048 + 4 * 256)
    assert m["activations_with_checkpointing"] == 18 * 4 * 1024 * 2048 * 5 + per_layer + 16384 * 2048 * 2
    # per GPU: DDP holds everything on each; FSDP splits the weights and the adapter's state, not the activations
    assert estimate_memory(recipe, shape, 4 * 1024, processes=4)["parts"] == parts
    fsdp = validate_recipe({**raw, "quantization": {"compute_dtype": "bfloat16", "quant_storage": "bfloat16"},
                            "train": {**raw["train"], "distributed": "fsdp"}}, "r")
    split = estimate_memory(fsdp, shape, 4 * 1024, processes=4)["parts"]
    assert split["nf4_weights"] == parts["nf4_weights"] / 4 and split["activations"] == parts["activations"]


def run_check(recipe_path, *args):
    return subprocess.run([sys.executable, "-m", "qlora.cli", "check", str(recipe_path), *args],
                          capture_output=True, text=True, timeout=300)


def write_recipe(tmp_path, tiny_model, data_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {tiny_model('gemma')}}}\n"
                      f"data: {{path: {data_path}, max_length: 512}}\n"
                      f"train: {{output_dir: {tmp_path / 'run'}}}\n")
    return recipe


@needs_code_alpaca
def test_code_alpaca_exits_2_naming_its_empty_rows_and_passes_with_skip_invalid(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model, CODE_ALPACA)
    result = run_check(recipe)
    assert result.returncode == 2
    assert "2 empty output (rows 237, 1859)" in result.stdout  # the report, on stdout
    [error] = result.stderr.splitlines()  # the reason train would stop, one line on stderr
    assert error.startswith("error: ") and "2 empty output" in error and "data.skip_invalid" in error
    assert "[-" in result.stdout and "+]" in result.stdout  # masked / trained markers when not a terminal
    assert run_check(recipe, "--set", "data.skip_invalid=true").returncode == 0


@needs_code_alpaca
def test_the_same_file_as_jsonl_parquet_and_csv_gives_the_same_report(tmp_path, tiny_model):
    import datasets

    rows = json.loads(CODE_ALPACA.read_text())
    table = datasets.Dataset.from_list(rows)
    table.to_json(tmp_path / "d.jsonl", force_ascii=False)
    table.to_parquet(tmp_path / "d.parquet")
    table.to_csv(tmp_path / "d.csv", index=False)
    reports = []
    for name in ("d.jsonl", "d.parquet", "d.csv"):
        result = run_check(write_recipe(tmp_path, tiny_model, tmp_path / name), "--json")
        assert result.returncode == 2, result.stderr
        report = json.loads(result.stdout)
        report["data"].pop("source")
        report["errors"] = [e.split(": ", 1)[1] for e in report["errors"]]
        reports.append(report)
    assert reports[0] == reports[1] == reports[2]
    assert reports[0]["data"]["invalid"] == {"empty output": [237, 1859]}


def test_check_prints_the_memory_of_each_process_for_several(tmp_path, tiny_model):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([ROW]))
    result = run_check(write_recipe(tmp_path, tiny_model, data), "--nproc-per-node", "4", "--nnodes", "2")
    assert result.returncode == 0, result.stderr
    import torch

    # on a CPU the estimate is of RAM, per process
    expected = (r"peak GPU memory estimate: [\d.]+ GiB per GPU, 8 GPUs" if torch.cuda.is_available()
                else r"peak RAM \(CPU training\) estimate: [\d.]+ GiB per process, 8 processes")
    assert re.search(expected + " with ddp", result.stdout), result.stdout


def test_check_names_the_trained_tokens_ids_and_the_grown_embeddings(make_recipe):
    from rich.console import Console

    from qlora.check import print_report

    recipe = make_recipe(arch="llama", data={"template": "chatml"},
                         lora={"trained_tokens": ["<|im_start|>", "<|im_end|>"]})
    report = check(recipe)
    assert report.trained_token_ids == {"<|im_start|>": 1024, "<|im_end|>": 1025} and report.vocabulary == 1024
    out = io.StringIO()
    print_report(report, recipe, Console(file=out, width=200))
    text = out.getvalue()
    assert "lora.trained_tokens: <|im_start|> id 1024, <|im_end|> id 1025; the embeddings grow from 1,024 to 1,026 rows" \
        in text
    assert "trained_token_embedding_gradient" in text


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "adamw_8bit", "adamw_torch"])
def test_check_says_when_8bit_adamw_costs_more_than_it_saves_on_a_cpu(make_recipe, optimizer):
    """bitsandbytes' 8-bit AdamW on CPU: 4.7x adamw_torch's step on SmolLM2-135M's adapter (scripts/bench_optimizer.py)
    for 6 bytes of state per trainable parameter."""
    report = check(make_recipe(train={"optimizer": optimizer}))
    if optimizer == "adamw_torch":
        assert report.notes == []
        return
    saved = round(137_216 * 6 / 2**20)  # the tiny Gemma's adapter: 0.8 MiB
    assert report.notes == [
        f"train.optimizer: {optimizer} saves {saved} MiB of optimizer state here, but on a CPU bitsandbytes runs it as "
        "a chain of small ops: 4.7x the step time of adamw_torch on SmolLM2-135M's adapter (142 vs 30 ms, "
        "benchmarks/results/optimizer-smollm2-135m-cpu.json); use optimizer: auto (adamw_torch on CPU) unless RAM is "
        "that tight"]
