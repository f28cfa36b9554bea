"""Each shipped recipe, with its model swapped for a tiny one of the same architecture, trains and generates."""

import json
from pathlib import Path

import pytest

from qlora.config import GenerationSection, apply_overrides, read_recipe_file, validate_recipe
from qlora.generate import generate, load_run
from qlora.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARCH = {"google/gemma-2b": "gemma", "meta-llama/Llama-2-7b-hf": "llama", "mistralai/Mistral-7B-v0.1": "mistral",
        "microsoft/phi-2": "phi"}
HUB_RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "tiny-code.yaml")


def rows_for(data):
    """Four rows in the recipe's own format and column names."""
    column = lambda name: data.fields.get(name, name)  # noqa: E731
    if data.format == "text":
        return [{"text": f"### Human: What is {i} + {i}? ### Assistant: {2 * i}."} for i in range(4)]
    return [{column("instruction"): f"Return {i} doubled.", column("input"): "" if i % 2 else f"x = {i}",
             column("output"): f"def f():\n    return {2 * i}"} for i in range(4)]


@pytest.mark.parametrize("path", HUB_RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_and_generates_on_a_tiny_model_of_its_architecture(path, tmp_path, tiny_model):
    raw = read_recipe_file(path)
    recipe = validate_recipe(raw, str(path))
    assert recipe.model.name_or_path in ARCH, "a recipe for a new architecture needs a tiny twin in qlora.tiny"
    assert len(recipe.model.revision) == 40  # every base model is pinned to a commit
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(rows_for(recipe.data)))
    raw = apply_overrides(raw, [
        f"model.name_or_path={tiny_model(ARCH[recipe.model.name_or_path])}", "model.revision=main",
        f"data.path={data_file}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.save_steps=2",
        "train.batch_size=2", "train.grad_accum=1", "train.logging_steps=1", "train.optimizer=adamw_torch",  # paged optimizers need CUDA
        "quantization.compute_dtype=float32",
    ])
    run = train(validate_recipe(raw, str(path)))
    loaded = load_run(run)
    sampling = loaded.recipe.generation.model_copy(update={"max_new_tokens": 4})
    assert len(generate(loaded, [("Return 3 doubled.", "")], sampling)) == 1
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all("loss" in m or "eval_loss" in m for m in metrics)
    if recipe.data.eval_fraction:
        assert any("eval_loss" in m for m in metrics)
