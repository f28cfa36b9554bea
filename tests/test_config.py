"""The recipe schema: every shipped recipe validates; user mistakes name the key and the fix."""

from pathlib import Path

import pytest

from qlora.config import apply_overrides, load_recipe, recipe_reference, validate_recipe
from qlora.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name_or_path": "m"}, "data": {"path": "d.json"}, "train": {"output_dir": "runs/x"}}


def error_for(raw):
    with pytest.raises(UserError) as info:
        validate_recipe(raw, "r.yaml")
    return str(info.value)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_opens_with_its_command(path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and f"qlora train configs/{path.name}" in first
    assert recipe.quantization.quant_type == "nf4"


def test_defaults_are_the_qlora_paper_settings():
    recipe = validate_recipe(MINIMAL, "r.yaml")
    q = recipe.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "auto")
    assert recipe.lora.target_modules == "all-linear"
    assert recipe.model.trust_remote_code is False


def test_unknown_key_suggests_the_nearest_valid_key():
    message = error_for({**MINIMAL, "lora": {"rnak": 8}})
    assert "lora.rnak" in message and "did you mean lora.r?" in message


def test_unknown_section_is_named():
    assert "did you mean train?" in error_for({**MINIMAL, "trian": {}})


def test_wrong_type_names_key_and_value():
    message = error_for({**MINIMAL, "lora": {"r": "big"}})
    assert message.startswith("r.yaml: lora.r:") and "'big'" in message


def test_wrong_choice_lists_what_is_allowed():
    message = error_for({**MINIMAL, "quantization": {"quant_type": "int8"}})
    assert "quantization.quant_type" in message and "'nf4'" in message and "'fp4'" in message


def test_missing_required_key_is_named():
    assert "data.path is required" in error_for({**MINIMAL, "data": {}})


def test_overrides_are_dotted_and_yaml_typed():
    raw = apply_overrides(MINIMAL, ["lora.r=32", "lora.target_modules=[q_proj, v_proj]", "train.max_steps=100"])
    recipe = validate_recipe(raw, "r.yaml")
    assert recipe.lora.r == 32 and recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.max_steps == 100
    assert "lora" not in MINIMAL  # the original mapping is untouched


@pytest.mark.parametrize("bad", ["lora.r", "=3", "model.name_or_path.x=1"])
def test_malformed_override_is_a_user_error(bad):
    with pytest.raises(UserError, match="--set"):
        apply_overrides(MINIMAL, [bad])


def test_python_yaml_tags_are_refused(tmp_path):
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(UserError, match="refused"):
        load_recipe(recipe)
    assert not (tmp_path / "pwned").exists()


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_readme_recipe_reference_matches_the_schema():
    assert recipe_reference() in (ROOT / "README.md").read_text(), "regenerate with scripts/recipe_reference.py"
