"""The recipe schema: every shipped recipe validates; user mistakes name the key and the fix."""

import re
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


def test_fsdp_needs_the_4bit_weights_in_a_float_storage():
    fsdp = {**MINIMAL, "train": {**MINIMAL["train"], "distributed": "fsdp"}}
    assert error_for(fsdp) == ("r.yaml: train.distributed: fsdp shards the 4-bit weights, which FSDP can only do when "
                               "they are stored in a float dtype: set quantization.quant_storage to the compute dtype "
                               "(bfloat16)")
    recipe = validate_recipe({**fsdp, "quantization": {"quant_storage": "bfloat16"}}, "r.yaml")
    assert recipe.train.distributed == "fsdp"
    assert validate_recipe({**fsdp, "quantization": {"load_in_4bit": False}}, "r.yaml")  # nothing to shard in 4 bits


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
    with pytest.raises(UserError, match="recipe: file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_readme_recipe_reference_matches_the_schema():
    assert recipe_reference() in (ROOT / "README.md").read_text(), "regenerate with scripts/recipe_reference.py"


RECIPE_TEXT = "model: {name_or_path: m}\ndata: {path: d.json}\ntrain:\n  output_dir: runs/x\n  learning_rate: 2e-4\n"


def test_exponent_floats_read_as_numbers_in_recipes_and_overrides(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE_TEXT)
    assert load_recipe(tmp_path / "r.yaml").train.learning_rate == 2e-4
    assert load_recipe(tmp_path / "r.yaml", ["train.learning_rate=1E-5"]).train.learning_rate == 1e-5


@pytest.mark.parametrize("text, message", [
    (RECIPE_TEXT + "train: {output_dir: y}\n", "line 6: duplicate key 'train' (first on line 3)"),
    (RECIPE_TEXT + "  output_dir: y\n", "line 6: duplicate key 'output_dir' (first on line 4)"),
])
def test_duplicate_keys_are_refused_naming_both_lines(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe(tmp_path / "r.yaml")


@pytest.mark.parametrize("override, message", [
    ("lora.r=yes", "lora.r: Input should be a valid integer (got True)"),
    ("lora.r='16'", "lora.r: Input should be a valid integer (got '16')"),
    ("train.max_steps=1.5", "train.max_steps: Input should be a valid integer (got 1.5)"),
    ("train.learning_rate=fast", "train.learning_rate: Input should be a valid number (got 'fast')"),
    ("lora.use_rslora=1", "lora.use_rslora: Input should be a valid boolean (got 1)"),
    ("lora.alpha=.inf", "lora.alpha: Input should be a finite number (got inf)"),
    ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
    (f"generation.seed={2**32}", "generation.seed: Input should be less than or equal to 4294967295"),
])
def test_values_are_never_coerced(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        validate_recipe(apply_overrides(MINIMAL, [override]), "r.yaml")


@pytest.mark.parametrize("content, message", [
    (b"\xef\xbb\xbf" + RECIPE_TEXT.encode(), None),  # a UTF-8 BOM, as Windows editors write: fine
    (RECIPE_TEXT.replace("d.json", "caf\u00e9.json").encode("latin-1"), "is not UTF-8 text (byte 0xe9 on line 2)"),
    (b"\x7fELF\x02\x01\x01\0\0\0", "is a binary file"),
])
def test_recipe_encodings(tmp_path, content, message):
    (tmp_path / "r.yaml").write_bytes(content)
    if message is None:
        assert load_recipe(tmp_path / "r.yaml").data.path == "d.json"
    else:
        with pytest.raises(UserError, match=re.escape(message)):
            load_recipe(tmp_path / "r.yaml")


def test_min_lr_ratio_needs_the_cosine_schedule():
    raw = {**MINIMAL, "train": {**MINIMAL["train"], "min_lr_ratio": 0.1, "lr_scheduler": "linear"}}
    assert error_for(raw) == ("r.yaml: train.min_lr_ratio applies to the cosine schedule, not linear; set "
                              "train.lr_scheduler: cosine or drop min_lr_ratio")
