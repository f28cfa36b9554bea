"""Shared fixtures: tiny random models of real architectures, built once per test session, offline."""

import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from qlora.config import apply_overrides, read_recipe_file, validate_recipe  # noqa: E402
from qlora.errors import RunFailed  # noqa: E402
from qlora.fetch import cached_model_dir, fetch  # noqa: E402

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


def real_chat_template(llama_cpp, name: str) -> str:
    """A real model's chat template that llama.cpp tests with: models/templates/<name>.jinja, or the template of the
    case called `name` in tests/test-chat-template.cpp (older models' templates, held there as C string literals)."""
    import re

    path = llama_cpp / "models" / "templates" / f"{name}.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    source = (llama_cpp / "tests" / "test-chat-template.cpp").read_text(encoding="utf-8")
    literal = r'"((?:[^"\\]|\\.)*)"'
    cases = re.findall(r"/\* \.name= \*/ " + literal + r",\s*(?://[^\n]*\s*)*/\* \.template_str= \*/ (?:U8C\()?"
                       + literal, source)

    def unescape(text):
        return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), text)

    return {unescape(case): unescape(template) for case, template in cases}[name]


@pytest.fixture(scope="session")
def real_tokenizer(llama_cpp):
    """real_tokenizer(vocabulary, template=None, eos=None, added=()) -> the Hugging Face tokenizer of a real vocabulary that
    llama.cpp ships (models/ggml-vocab-<vocabulary>.gguf, read by transformers' GGUF loader) whose chat_template is a
    real model's (real_chat_template).

    `eos` and `added` make it the instruct model's tokenizer where that differs from its base vocabulary: its EOS and
    the tokens it adds. A vocabulary is read once (5-60 s) and kept as a tokenizer directory beside it, per
    transformers version (which does the conversion); each distinct tokenizer loads once per session (1-3 s), and
    templates share it as shallow copies (its chat_template is a plain attribute).
    """
    import copy
    import shutil

    import transformers
    from transformers import AutoTokenizer

    loaded = {}

    def load(vocabulary, eos, added):
        saved = llama_cpp / "models" / f"ggml-vocab-{vocabulary}.transformers-{transformers.__version__}"
        if not saved.is_dir():
            tmp = saved.with_name(f"{saved.name}.{os.getpid()}.tmp")
            gguf = AutoTokenizer.from_pretrained(llama_cpp / "models", gguf_file=f"ggml-vocab-{vocabulary}.gguf")
            gguf.save_pretrained(tmp)
            try:
                tmp.rename(saved)
            except OSError:  # another session saved it first
                shutil.rmtree(tmp)
        tokenizer = AutoTokenizer.from_pretrained(saved)
        tokenizer.add_tokens(list(added))
        if eos:
            tokenizer.eos_token = eos
        return tokenizer

    def get(vocabulary: str, template: str | None = None, eos: str | None = None, added: tuple[str, ...] = ()):
        key = vocabulary, eos, added
        if key not in loaded:
            loaded[key] = load(*key)
        tokenizer = copy.copy(loaded[key])
        if template:
            tokenizer.chat_template = real_chat_template(llama_cpp, template)
        return tokenizer

    return get


# The real pretrained model (tests/test_real_model.py, tests/test_readme.py): fetched once, trained once.
ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_RECIPE = ROOT / "configs" / "smollm2-code.yaml"


def skip_without_index(exc: RunFailed):
    if "(from versions: none)" in str(exc):
        pytest.skip(f"no package index reachable for the real model: {exc}")
    raise exc


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as `qlora fetch` writes it, kept in the cache per transformers version (a second fetch
    of the same release does nothing)."""
    try:
        return fetch("smollm2-135m", cached_model_dir("smollm2-135m"))
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
    recipe = validate_recipe(apply_overrides(read_recipe_file(SMOLLM2_RECIPE),
                                             [f"{k}={v}" for k, v in swaps.items()]), str(SMOLLM2_RECIPE))
    return train(recipe)
