"""The recipe schema: every shipped recipe validates; user mistakes name the key and the fix."""

import re
from pathlib import Path

import pytest

from qlora.config import apply_overrides, dump_recipe, load_recipe, parse_yaml, recipe_reference, validate_recipe
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


def test_the_recipe_reference_matches_the_schema():
    assert recipe_reference() in (ROOT / "docs" / "reference.md").read_text(), \
        "regenerate with scripts/recipe_reference.py"


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
    ("lora.r=yes", "lora.r: 'yes' is text, not a number, in YAML 1.2, which recipes follow (YAML 1.1 reads True)"),
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



def recipe_with_line(tmp_path, dotted, raw):
    """RECIPE_TEXT with `dotted: raw` written as the user would (a lora key or a key of its train section)."""
    section, name = dotted.split(".")
    text = RECIPE_TEXT + (f"  {name}: {raw}\n" if section == "train" else f"{section}:\n  {name}: {raw}\n")
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml"


@pytest.mark.parametrize("value", ["on", "off"])
def test_on_and_off_are_the_documented_strings_not_booleans(tmp_path, value):
    assert load_recipe(recipe_with_line(tmp_path, "train.liger", value)).train.liger == value
    assert load_recipe(recipe_with_line(tmp_path, "train.seed", "1"), [f"train.liger={value}"]).train.liger == value


@pytest.mark.parametrize("key, raw, yaml_1_1", [
    ("lora.r", "1:30", "90"),  # YAML 1.1's base 60
    ("lora.r", "0755", "493"),  # 1.1: octal 493, 1.2 core: 755; a recipe guesses neither
    ("train.max_steps", "1_000", "1000"),
    ("lora.alpha", "0b11", "3"),
    ("lora.use_rslora", "yes", "True"),
    ("lora.use_dora", "on", "True"),
])
def test_yaml_1_1_surprises_are_refused_naming_the_key(tmp_path, key, raw, yaml_1_1):
    kind, fix = ("a boolean", "write true or false") if yaml_1_1 == "True" else \
        ("a number", "write the number in decimal digits")
    expected = (f"{key}: {raw!r} is text, not {kind}, in YAML 1.2, which recipes follow (YAML 1.1 reads {yaml_1_1}): "
                f"{fix}")
    path = recipe_with_line(tmp_path, key, raw)
    for overrides in ([], [f"{key}={raw}"]):
        with pytest.raises(UserError) as info:
            load_recipe(path if not overrides else recipe_with_line(tmp_path, "train.seed", "1"), overrides)
        assert str(info.value) == f"{path}: {expected}"


def test_what_yaml_1_2_reads_and_recipe_yaml_keeps(tmp_path):
    recipe = load_recipe(recipe_with_line(tmp_path, "generation.stop", "[=, '1e5', '+.5', 2024-01-01]"),
                         ["model.revision=2024-01-01", "lora.r=0o20", "lora.alpha=1e2"])
    assert recipe.model.revision == "2024-01-01" and recipe.lora.r == 16 and recipe.lora.alpha == 100.0
    assert recipe.generation.stop == ["=", "1e5", "+.5", "2024-01-01"]
    text = dump_recipe(recipe)
    assert "'1e5'" in text and "'+.5'" in text  # quoted: recipe.yaml reads back the same here and in any YAML reader
    (tmp_path / "again.yaml").write_text(text)
    assert load_recipe(tmp_path / "again.yaml") == recipe


MERGES = """\
lora: &small {r: 8, alpha: 16, dropout: 0.1}
generation: &greedy {max_new_tokens: 64, temperature: 0.0, top_k: 5}
"""


def test_merge_keys_work_as_yaml_defines_them():
    merged = parse_yaml("a: &a {x: 1, revision: one}\nb: &b {revision: two, z: 2}\n"
                        "c:\n  <<: [*a, *b]\n  x: 3\nd: {<<: *b, z: 4}\n")
    assert merged["c"] == {"x": 3, "revision": "one", "z": 2}  # its own keys win, then the earlier merged mapping's
    assert merged["d"] == {"revision": "two", "z": 4}


def test_merge_keys_in_a_recipe_and_an_override_of_a_merged_section(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE_TEXT.replace("train:\n", "train: &train\n") + "  max_steps: 3\n"
                                     + "lora: {<<: {r: 8, alpha: 16}, alpha: 32}\n")
    recipe = load_recipe(tmp_path / "r.yaml", ["lora.r=4"])
    assert (recipe.lora.r, recipe.lora.alpha, recipe.train.max_steps) == (4, 32.0, 3)


@pytest.mark.parametrize("text, message", [
    ("a: {<<: 3}\n", "line 1: the merge key << takes a mapping or a list of mappings, e.g. <<: *base"),
    ("a:\n  <<: {x: 1}\n  <<: {y: 1}\n", "line 3: duplicate key '<<' (first on line 2); keep one"),
    ("? [a, b]\n: 1\n", "line 1: a key is a sequence; recipe keys are names"),
    ("lora: {1: 2}\n", "line 1: the key '1' reads as 1, not a name; quote it (\"1\") if you mean the text"),
    ("a: &a [*a]\n", "line 1: *a is inside &a itself: an endless recipe"),
    ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "line 1: nested more than 32 levels deep; a recipe needs a few"),
    ("lora: {r: " + "1" * 5001 + "}\n",
     "line 1: a number of 5001 digits is more than Python reads (4300) and any recipe needs"),
    ("a: !!python/name:os.system\n", "line 1: refused the tag !!python/name:os.system: a recipe holds plain values"),
])
def test_yaml_a_recipe_cannot_hold_is_one_line_naming_the_line(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(UserError) as info:
        load_recipe(tmp_path / "r.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'r.yaml'}: {message}")
