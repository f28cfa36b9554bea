"""Shared fixtures: tiny random models of real architectures, built once per test session, offline."""

import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from qlora.config import validate_recipe  # noqa: E402

ROW = {
    "instruction": "Write a function that reverses a string.",
    "input": "",
    "output": 'def reverse(s):\n    """Return s reversed."""\n    return s[::-1]',
}
ROW_WITH_INPUT = {
    "instruction": "Add type hints to this function.",
    "input": "def add(a, b):\n    return a + b",
    "output": "def add(a: int, b: int) -> int:\n    return a + b",
}


def snapshot(directory) -> dict[str, str]:
    """Every path under `directory` with a hash of its content: equal snapshots, nothing written or changed."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch) -> directory of a saved tiny random model (built once per architecture)."""
    from qlora.tiny import build_tiny_model

    built = {}

    def get(arch: str = "gemma"):
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp("models") / arch)
        return built[arch]

    return get


# bf16 compute, as users run it on a GPU, for the run most tests share, also on a CPU where auto picks float32 (no
# AVX512-BF16); the rest run auto, since emulated bf16 makes training ~2.5x slower there
BF16 = {"compute_dtype": "bfloat16"}


def recipe_for(directory, model_dir, rows=(ROW,), **sections):
    """A validated Recipe training the model in `model_dir` on `rows`, writing into `directory`."""
    data_file = directory / "data.json"
    data_file.write_text(json.dumps(list(rows)))
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"dropout": 0.0},
        "data": {"path": str(data_file), "max_length": 512},
        "train": {"output_dir": str(directory / "run"), "max_steps": 4, "batch_size": 2, "grad_accum": 1,
                  "learning_rate": 1e-2, "logging_steps": 2, "save_steps": 2, "warmup_ratio": 0.0},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return validate_recipe(raw, "test recipe")


@pytest.fixture
def make_recipe(tmp_path, tiny_model):
    """make_recipe(rows, arch, **section overrides) -> a validated Recipe training on `rows` in tmp_path."""

    def make(rows=(ROW,), arch="gemma", **sections):
        return recipe_for(tmp_path, tiny_model(arch), rows, **sections)

    return make


@pytest.fixture(scope="session")
def memorised_run(tmp_path_factory, tiny_model):
    """A run of a tiny Gemma trained (100 steps) until it reproduces ROW's response exactly."""
    from qlora.train import train

    recipe = recipe_for(tmp_path_factory.mktemp("memorised"), tiny_model("gemma"), [ROW], quantization=BF16,
                        train={"max_steps": 100, "batch_size": 1, "lr_scheduler": "constant",
                               "logging_steps": 25, "save_steps": 1000})
    return train(recipe)


@pytest.fixture(scope="session")
def trained_tokens_run(tmp_path_factory, tiny_model):
    """A run of a tiny Llama-2 (whose tokenizer lacks ChatML's tokens) trained with template chatml and
    lora.trained_tokens until it reproduces ROW's response: 20 steps, then resumed to 40."""
    from qlora.train import train

    recipe = recipe_for(tmp_path_factory.mktemp("trained-tokens"), tiny_model("llama"), [ROW],
                        data={"template": "chatml"}, lora={"trained_tokens": ["<|im_start|>", "<|im_end|>"]},
                        train={"max_steps": 20, "batch_size": 1, "learning_rate": 3e-3, "lr_scheduler": "constant",
                               "logging_steps": 20, "save_steps": 20})
    train(recipe)
    return train(recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": 40})}))


@pytest.fixture(scope="session")
def llama_cpp():
    """llama.cpp's stock converter; a test using it skips only when no package registry answered pip."""
    from qlora.errors import RunFailed
    from qlora.llamacpp import llama_cpp_dir

    try:
        return llama_cpp_dir()
    except RunFailed as exc:
        if "(from versions: none)" in str(exc):
            pytest.skip(f"no package registry reachable for llama.cpp's converter: {exc}")
        raise
