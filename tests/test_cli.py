"""The CLI shim: fast --help, exit code 2 with one line for user errors, nothing written."""

import subprocess
import sys

QLORA = [sys.executable, "-m", "qlora.cli"]


def run(*args, cwd=None):
    return subprocess.run([*QLORA, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_module_imports_no_heavy_library():
    code = ("import sys, qlora.cli; print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', "
            "'datasets', 'bitsandbytes', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("train", "tiny"):
        assert command in result.stdout


def write_recipe(tmp_path, extra=""):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name_or_path: some/model}\n"
        f"data: {{path: {tmp_path / 'missing.json'}}}\n"
        f"train: {{output_dir: {tmp_path / 'run'}}}\n" + extra
    )
    return recipe


def assert_user_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_unknown_key_exits_2_with_suggestion_and_writes_nothing(tmp_path):
    result = run("train", str(write_recipe(tmp_path, "lora: {rnak: 8}\n")))
    assert_user_error(result, "lora.rnak", "did you mean lora.r?")
    assert not (tmp_path / "run").exists()


def test_bad_override_value_exits_2(tmp_path):
    result = run("train", str(write_recipe(tmp_path)), "--set", "lora.r=-1")
    assert_user_error(result, "lora.r")


def test_missing_data_file_exits_2_naming_it(tmp_path):
    result = run("train", str(write_recipe(tmp_path)))
    assert_user_error(result, str(tmp_path / "missing.json"))
    assert not (tmp_path / "run").exists()


def test_tiny_refuses_unknown_architecture(tmp_path):
    assert_user_error(run("tiny", "gpt5", str(tmp_path / "m")), "gemma, llama, mistral, phi")


def test_env_lists_every_package_and_the_device_and_version_prints_it():
    from importlib.metadata import version

    from qlora.environment import PACKAGES

    result = run("env")
    assert result.returncode == 0, result.stderr
    names = [line.split(":")[0] for line in result.stdout.splitlines()]
    assert set(PACKAGES) <= set(names) and "python" in names and "bitsandbytes backend" in names
    assert any(line.startswith("device ") for line in result.stdout.splitlines())
    assert f"torch: {version('torch')}" in result.stdout
    assert "Failed to load" not in result.stderr  # bitsandbytes' harmless CPU-kernel warning is silenced
    assert run("--version").stdout == f"qlora {version('qlora')}\n"


def test_help_names_values_and_choices_not_python_types():
    import os

    for command, choice in (("merge", "dequantized|original"), ("export", "f16|bf16|q8_0|f32"),
                            ("eval", "instruct|completion"), ("train", None), ("generate", None)):
        result = subprocess.run([sys.executable, "-m", "qlora", command, "--help"], capture_output=True, text=True,
                                env={**os.environ, "COLUMNS": "200"}, timeout=300)
        assert result.returncode == 0
        assert not any(t in result.stdout for t in ("<str>", "<int>", "<float>"))
        assert result.stdout.count("<bool>") == 1  # click's own --help; every flag of ours shows no value
        assert choice is None or choice in result.stdout


def test_a_malformed_command_line_is_one_error_line_and_exit_2(tmp_path):
    for args, message in ((["merge", "x"], "error: Missing option '--output'. (see --help)"),
                          (["eval", "x", "--n", "abc"], "error: Invalid value for '--n': "),
                          (["nonsense"], "error: No such command 'nonsense'. (see --help)")):
        result = run(*args, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith(message)
    bare = run()  # bare `qlora` shows its help
    assert bare.returncode == 0 and "Usage: " in bare.stdout and "Commands" in bare.stdout
