"""A run is portable: one trained in float16 on a GPU (a T4) generates, merges, verifies and exports on this CPU,
which computes it in float32 and says so; training that recipe here is still refused."""

import json
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROW
from qlora.cli import app
from qlora.config import GenerationSection, dump_recipe, load_recipe
from qlora.generate import generate, load_run
from qlora.merge import merge, verify

FALLBACK = "the run trained in float16; this CPU computes in float32 instead"
GREEDY = GenerationSection(max_new_tokens=60)


@pytest.fixture(scope="module")
def float16_run(memorised_run, tmp_path_factory):
    """A copy of the memorised run with the files a T4 writes: recipe.yaml records compute_dtype float16 (what train
    resolves auto to there) and environment.json that device. The adapter is float32 whatever the compute dtype."""
    run = shutil.copytree(memorised_run, tmp_path_factory.mktemp("t4") / "run")
    recipe = load_recipe(run / "recipe.yaml")
    q = recipe.quantization.model_copy(update={"compute_dtype": "float16"})
    (run / "recipe.yaml").write_text(dump_recipe(recipe.model_copy(update={"quantization": q})))
    starts = json.loads((run / "environment.json").read_text())
    (run / "environment.json").write_text(json.dumps([{**s, "device": "cuda:0 (Tesla T4, capability 7.5)"}
                                                      for s in starts]))
    return run


def test_training_the_float16_recipe_here_is_still_refused(float16_run):
    result = CliRunner().invoke(app, ["train", str(float16_run / "recipe.yaml")])
    assert result.exit_code == 2
    assert "quantization.compute_dtype: float16 mixed precision needs a CUDA GPU" in result.stderr


def test_generate_computes_in_float32_says_so_once_and_reproduces_the_response(float16_run, capsys):
    loaded = load_run(float16_run)
    assert capsys.readouterr().err.count(FALLBACK) == 1
    assert loaded.model.config.quantization_config.bnb_4bit_compute_dtype == torch.float32
    assert generate(loaded, [(ROW["instruction"], "")], GREEDY) == [ROW["output"]]


def test_merge_writes_the_trained_float16_by_default_and_verify_passes(float16_run, tmp_path):
    result = CliRunner().invoke(app, ["merge", str(float16_run), "--output", str(tmp_path / "merged"), "--verify"])
    assert result.exit_code == 0, result.output
    assert FALLBACK in result.stderr
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float16"
    assert "compute_dtype: float16" in (tmp_path / "merged" / "README.md").read_text()  # the recipe as trained


def test_merge_to_float32_is_exact_and_reproduces_the_response(float16_run, tmp_path):
    merged = merge(float16_run, tmp_path / "merged", dtype="float32")
    report = verify(float16_run, merged)
    assert report.passed and report.merge_agreement == 1.0, report.summary()
    assert generate(load_run(merged), [(ROW["instruction"], "")], GREEDY) == [ROW["output"]]


def test_export_ships_the_float16_run(float16_run, tmp_path, llama_cpp):
    from qlora.export import export

    gguf, modelfile = export(float16_run, tmp_path / "ship", "f16", llama_cpp)
    assert gguf.is_file() and modelfile.read_text().startswith(f"FROM ./{gguf.name}\n")


def test_eval_loss_computes_the_float16_run_here(float16_run, tmp_path):
    (tmp_path / "heldout.json").write_text(json.dumps([ROW]))
    result = CliRunner().invoke(app, ["eval", str(float16_run), "--loss", str(tmp_path / "heldout.json")])
    assert result.exit_code == 0, result.output
    assert FALLBACK in result.stderr
    run, base = re.search(r"run (\S+) \(perplexity .*base (\S+) \(", result.stdout).groups()
    assert float(run) < 0.1 < float(base)  # the memorised response: the adapter computed here, not lost
