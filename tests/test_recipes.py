"""Each shipped recipe runs as shipped on a tiny twin of its architecture: checkpoint, interrupt, resume, finish,
generate. Only the model and data (paths, revisions) and the run's length and size are swapped; the optimizer
(paged 8-bit AdamW), compute dtype (auto), attention kernel and everything else are the recipe's own."""

import json
import signal
from pathlib import Path

import pytest

from qlora.config import apply_overrides, read_recipe_file, validate_recipe
from qlora.errors import RunInterrupted
from qlora.generate import generate, load_run
from qlora.train import train
from test_reliability import SignalAt, metrics, names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARCH = {"google/gemma-2b": "gemma", "meta-llama/Llama-2-7b-hf": "llama", "mistralai/Mistral-7B-v0.1": "mistral",
        "microsoft/phi-2": "phi", "Qwen/Qwen2.5-Coder-7B": "qwen2"}
# recipes on a model a qlora command writes locally, and what runs each as shipped
LOCAL_RECIPES = {"tiny-code.yaml": "the random twin `qlora tiny gemma` writes (tests/test_tiny.py)",
                 "smollm2-code.yaml": "the real model `qlora fetch smollm2-135m` writes: tests/test_real_model.py"}
HUB_RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in LOCAL_RECIPES)
# the only keys a test may swap: where the model and data come from, and how long and large the run is
SWAPPABLE = {"model.name_or_path", "model.revision", "data.path", "data.revision", "train.output_dir",
             "train.max_steps", "train.save_steps", "train.logging_steps", "train.batch_size", "train.grad_accum"}


def rows_for(data):
    """Eight rows in the recipe's own format and column names."""
    column = lambda name: data.fields.get(name, name)  # noqa: E731
    if data.format == "text":
        return [{column("text"): f"### Human: What is {i} + {i}? ### Assistant: {2 * i}."} for i in range(8)]
    return [{column("instruction"): f"Return {i} doubled.", column("input"): "" if i % 2 else f"x = {i}",
             column("output"): f"def f():\n    return {2 * i}"} for i in range(8)]


def test_every_recipe_is_pinned_and_runs_the_users_configuration():
    for path in HUB_RECIPES:
        recipe = validate_recipe(read_recipe_file(path), str(path))
        assert recipe.model.name_or_path in ARCH, f"{path.name}: a new architecture needs a twin in qlora.tiny"
        assert len(recipe.model.revision) == 40, f"{path.name}: pin the base model to a commit"
        assert recipe.quantization.compute_dtype == "auto" and recipe.train.optimizer == "paged_adamw_8bit"


def test_local_recipes_train_on_a_directory_that_a_qlora_command_writes():
    for name in LOCAL_RECIPES:
        recipe = validate_recipe(read_recipe_file(CONFIGS / name), name)
        assert recipe.model.name_or_path.startswith("models/"), f"{name}: not a model a qlora command writes"
        assert "qlora " in (CONFIGS / name).read_text().splitlines()[1], f"{name}: say which command makes the model"


@pytest.mark.parametrize("path", HUB_RECIPES, ids=lambda p: p.stem)
def test_recipe_as_shipped_checkpoints_resumes_finishes_and_generates(path, tmp_path, tiny_model):
    raw = read_recipe_file(path)
    recipe = validate_recipe(raw, str(path))
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(rows_for(recipe.data)))
    swaps = {"model.name_or_path": tiny_model(ARCH[recipe.model.name_or_path]), "model.revision": "main",
             "data.path": data_file, "data.revision": "null", "train.output_dir": tmp_path / "run",
             "train.max_steps": 4, "train.save_steps": 2, "train.logging_steps": 1, "train.batch_size": 2,
             "train.grad_accum": 1}
    assert set(swaps) <= SWAPPABLE
    shipped = validate_recipe(apply_overrides(raw, [f"{key}={value}" for key, value in swaps.items()]), str(path))

    with pytest.raises(RunInterrupted, match="SIGTERM after step 3") as stopped:
        train(shipped, callbacks=[SignalAt(3, signal.SIGTERM)])
    assert stopped.value.exit_code == 143
    run = tmp_path / "run"
    assert names(run / "checkpoints") == ["checkpoint-2", "checkpoint-3"]
    assert train(shipped) == run  # resumes at step 3 and finishes
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3, 4]
    saved = validate_recipe(read_recipe_file(run / "recipe.yaml"), "recipe.yaml")
    assert saved.train.optimizer == "paged_adamw_8bit" and saved.quantization.compute_dtype != "auto"

    loaded = load_run(run)
    sampling = loaded.recipe.generation.model_copy(update={"max_new_tokens": 4})
    assert len(generate(loaded, [("Return 3 doubled.", "")], sampling)) == 1
    if recipe.data.eval_fraction:
        assert any("eval_loss" in m for m in metrics(run))
