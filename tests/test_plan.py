"""plan.py: every device decision, on CPU with torch.cuda faked as T4, A100 and H100 machines of 1, 2 and 8 GPUs,
asserting the arguments transformers, bitsandbytes, accelerate and TRL receive; and the import graph that keeps the
decisions in one place."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from qlora.errors import UserError
from qlora.plan import (FSDP_CONFIG, base_arguments, check_devices, cpu_has_native_bf16, device_memory,
                        full_precision_arguments, inference_recipe, make_plan, resolve_attention, resolve_recipe)

GB = 1024**3
GPUS = {(7, 5): "Tesla T4", (8, 0): "NVIDIA A100-SXM4-80GB", (9, 0): "NVIDIA H100 80GB HBM3"}
MACHINES = [(capability, count) for capability in GPUS for count in (1, 2, 8)]


@pytest.fixture(autouse=True, scope="module")
def libraries_imported_as_on_this_cpu():
    """bitsandbytes and TRL (which imports it) imported before torch.cuda is faked: under a faked CUDA they would load
    their CUDA backends, which this CPU build of torch lacks."""
    for module in ("bitsandbytes", "trl.trainer.sft_config", "peft"):
        importlib.import_module(module)


def fake_gpus(monkeypatch, *capabilities, memory=80 * GB):
    """torch.cuda as a machine with these GPUs (compute capabilities) shows it to this rank (LOCAL_RANK)."""
    from qlora import distributed

    name = lambda i=None: GPUS[capabilities[distributed.local_rank() if i is None else i]]  # noqa: E731
    capability = lambda i=None: capabilities[distributed.local_rank() if i is None else i]  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "current_device", distributed.local_rank)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability() >= (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=memory, name=name(i), major=capability(i)[0],
                                                  minor=capability(i)[1]))


def launch(monkeypatch, count: int, rank: int) -> None:
    """This process as rank `rank` of `qlora train --nproc-per-node count` (one process when count is 1)."""
    if count > 1:
        monkeypatch.setenv("WORLD_SIZE", str(count))
        monkeypatch.setenv("LOCAL_RANK", str(rank))


@pytest.mark.parametrize("capability, count", MACHINES, ids=[f"{GPUS[c].split()[-1]}x{n}" for c, n in MACHINES])
def test_each_rank_loads_onto_its_gpu_in_the_dtype_the_gpu_computes_natively(make_recipe, monkeypatch, capability,
                                                                             count):
    fake_gpus(monkeypatch, *[capability] * count)
    recipe = make_recipe()  # compute_dtype, optimizer and attention: auto
    if count > 1:  # one process would see every GPU: the trainer would fall back to DataParallel
        with pytest.raises(UserError, match=f"^{count} CUDA devices are visible: train on all of them with "
                                            f"`qlora train RECIPE --nproc-per-node {count}`"):
            make_plan(recipe)
    rank = count - 1
    launch(monkeypatch, count, rank)
    plan = make_plan(recipe)
    dtype = "bfloat16" if capability >= (8, 0) else "float16"  # Turing has no bf16: fp16 with a loss scaler
    assert plan.recipe.quantization.compute_dtype == dtype and plan.recipe.train.optimizer == "paged_adamw_8bit"
    assert plan.device == f"cuda:{rank} ({GPUS[capability]}, capability {capability[0]}.{capability[1]})"
    assert device_memory() == (80 * GB, f"cuda:{rank}")
    assert not plan.sharded and plan.packed and plan.compile == "eager"  # train.compile: off by default

    load = base_arguments(plan.recipe)
    quantization = load.pop("quantization_config")
    assert load == {"revision": "main", "trust_remote_code": False, "dtype": getattr(torch, dtype),
                    "attn_implementation": "sdpa", "device_map": {"": rank}}
    assert (quantization.load_in_4bit, quantization.bnb_4bit_quant_type, quantization.bnb_4bit_use_double_quant,
            quantization.bnb_4bit_compute_dtype, quantization.bnb_4bit_quant_storage) == (
        True, "nf4", True, getattr(torch, dtype), torch.uint8)
    sft = plan.sft_arguments
    assert {key: sft[key] for key in ("bf16", "fp16", "use_cpu", "optim", "dataloader_pin_memory",
                                      "use_liger_kernel", "ddp_find_unused_parameters", "padding_free")} == {
        "bf16": dtype == "bfloat16", "fp16": dtype == "float16", "use_cpu": False, "optim": "paged_adamw_8bit",
        "dataloader_pin_memory": True, "use_liger_kernel": False, "ddp_find_unused_parameters": False,
        "padding_free": False}
    assert "fsdp" not in sft and "fsdp_config" not in sft
    # merge and generate spread an unquantized model over every visible GPU, then CPU memory
    assert full_precision_arguments(plan.recipe, "auto") == {"revision": "main", "dtype": "auto",
                                                             "trust_remote_code": False, "device_map": "auto"}


@pytest.mark.parametrize("capability, count", [m for m in MACHINES if m[1] > 1],
                         ids=[f"{GPUS[c].split()[-1]}x{n}" for c, n in MACHINES if n > 1])
def test_fsdp_shards_in_the_storage_dtype_without_a_device_map_and_passes_the_fsdp2_keys(make_recipe, monkeypatch,
                                                                                          capability, count):
    fake_gpus(monkeypatch, *[capability] * count)
    launch(monkeypatch, count, 1)
    storage = "bfloat16" if capability >= (8, 0) else "float16"
    recipe = make_recipe(quantization={"quant_storage": storage}, train={"distributed": "fsdp"})
    plan = make_plan(recipe)
    assert plan.sharded and plan.recipe.train.optimizer == "adamw_torch"  # 8-bit state fails to save under FSDP
    load = base_arguments(plan.recipe)
    assert "device_map" not in load and load["dtype"] == getattr(torch, storage)
    assert load["quantization_config"].bnb_4bit_quant_storage == getattr(torch, storage)
    assert plan.sft_arguments["fsdp"] is True and plan.sft_arguments["fsdp_config"] == FSDP_CONFIG
    with pytest.raises(UserError, match=r"^train.optimizer: paged_adamw_8bit fails to save its state under FSDP"):
        make_plan(make_recipe(quantization={"quant_storage": storage},
                              train={"distributed": "fsdp", "optimizer": "paged_adamw_8bit"}))
    with pytest.raises(UserError, match="^train.compile: on, but FSDP wraps the layers after they would be compiled"):
        make_plan(make_recipe(quantization={"quant_storage": storage}, train={"distributed": "fsdp", "compile": "on"}))
    other = "float16" if storage == "bfloat16" else "bfloat16"
    with pytest.raises(UserError, match=f"^quantization.quant_storage: {other} with train.distributed: fsdp must be "
                                        f"the compute dtype, {storage}"):
        make_plan(make_recipe(quantization={"quant_storage": other}, train={"distributed": "fsdp"}))


def test_fsdp_in_one_process_is_not_sharded(make_recipe, monkeypatch):
    fake_gpus(monkeypatch, (8, 0))
    plan = make_plan(make_recipe(quantization={"quant_storage": "bfloat16"}, train={"distributed": "fsdp"}))
    assert not plan.sharded and "fsdp" not in plan.sft_arguments
    assert base_arguments(plan.recipe)["device_map"] == {"": 0}


@pytest.mark.parametrize("capability, accepted", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_compute_needs_ampere_or_newer_and_fp16_runs_everywhere(make_recipe, monkeypatch, capability, accepted):
    fake_gpus(monkeypatch, capability)
    assert make_plan(make_recipe(quantization={"compute_dtype": "float16"})).sft_arguments["fp16"]
    recipe = make_recipe(quantization={"compute_dtype": "bfloat16"})
    if accepted:
        assert make_plan(recipe).sft_arguments["bf16"]
    else:
        with pytest.raises(UserError, match=r"^quantization.compute_dtype: bfloat16 needs a CUDA GPU of compute "
                                            r"capability 8.0 or newer; Tesla T4 is 7.5: use auto \(float16 there\)"):
            make_plan(recipe)


@pytest.mark.parametrize("capabilities, dtype, message", [
    ([(7, 5)], "float16", "flash_attention_2 needs compute capability 8.0 or newer (Ampere); cuda:0 (Tesla T4) has "
                          "7.5: use sdpa"),
    ([(8, 0), (7, 5)], "bfloat16", "flash_attention_2 needs compute capability 8.0 or newer (Ampere); cuda:1 (Tesla T4) "
                                   "has 7.5"),
    ([(8, 0)], "float32", "flash_attention_2 computes in bfloat16 or float16, not quantization.compute_dtype=float32"),
    ([(8, 0)], "bfloat16", None),
    ([(9, 0), (9, 0)], "float16", None),
])
def test_flash_attention_needs_ampere_or_newer_and_half_precision(monkeypatch, capabilities, dtype, message):
    from qlora.config import ModelSection

    fake_gpus(monkeypatch, *capabilities)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())  # flash-attn "installed"
    model = ModelSection(name_or_path="meta-llama/Llama-2-7b-hf", attn_implementation="flash_attention_2")
    if message is None:
        assert resolve_attention(model, dtype) == "flash_attention_2"
    else:
        with pytest.raises(UserError, match=f"model.attn_implementation: {re.escape(message)}"):
            resolve_attention(model, dtype)


def test_flash_attention_takes_trls_padding_free_rows_instead_of_packed_ones(make_recipe, monkeypatch):
    fake_gpus(monkeypatch, (9, 0))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())  # flash-attn and liger "installed"
    plan = make_plan(make_recipe(model={"attn_implementation": "flash_attention_2"}))
    assert not plan.packed and plan.sft_arguments["padding_free"]
    assert base_arguments(plan.recipe)["attn_implementation"] == "flash_attention_2"
    assert plan.sft_arguments["use_liger_kernel"]  # auto: installed, on a GPU


def test_compile_on_a_gpu_needs_triton(make_recipe, monkeypatch):
    fake_gpus(monkeypatch, (8, 0))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "triton" else object())
    with pytest.raises(UserError, match=r"^train.compile: on, but inductor needs triton on CUDA: pip install triton"):
        make_plan(make_recipe(train={"compile": "on"}))
    assert make_plan(make_recipe(train={"compile": "auto"})).compile == \
        "eager (inductor needs triton on CUDA: pip install triton)"


def test_liger_is_off_on_cpu_and_on_without_the_package_is_refused(make_recipe, monkeypatch):
    assert not make_plan(make_recipe()).sft_arguments["use_liger_kernel"]
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"^train.liger: on, but liger-kernel is not installed: pip install "
                                        r"'qlora\[liger\]'"):
        make_plan(make_recipe(train={"liger": "on"}))


def test_on_this_cpu_the_plan_is_the_trainers_cpu_mode(make_recipe):
    plan = make_plan(make_recipe())
    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert plan.recipe.quantization.compute_dtype == dtype and plan.recipe.train.optimizer == "adamw_torch"
    assert base_arguments(plan.recipe)["device_map"] == {"": "cpu"}
    sft = plan.sft_arguments
    assert sft["use_cpu"] and not sft["dataloader_pin_memory"] and sft["bf16"] == (dtype == "bfloat16")
    from trl import SFTConfig

    assert SFTConfig(**sft).use_cpu  # the trainer takes the plan as it is
    assert full_precision_arguments(plan.recipe, torch.float32)["device_map"] == {"": "cpu"}
    assert resolve_recipe(plan.recipe) == plan.recipe  # a recorded run resolves to itself when resumed


@pytest.mark.parametrize("capability, loaded", [((7, 5), "float32"), ((8, 0), "bfloat16")])
def test_a_run_trained_in_bf16_loads_for_inference_where_the_gpu_computes_it_else_in_float32(
        make_recipe, monkeypatch, capsys, capability, loaded):
    fake_gpus(monkeypatch, capability)
    assert inference_recipe(make_recipe(quantization={"compute_dtype": "bfloat16"})
                            ).quantization.compute_dtype == loaded
    said = "the run trained in bfloat16; this GPU (Tesla T4) computes in float32 instead"
    assert (said in " ".join(capsys.readouterr().err.split())) == (loaded == "float32")


def test_a_model_class_without_sdpa_falls_back_to_eager(make_recipe, tmp_path):
    from transformers import Gemma2Config

    Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, vocab_size=256).save_pretrained(tmp_path / "gemma2")
    recipe = make_recipe(model={"name_or_path": str(tmp_path / "gemma2")})
    assert resolve_recipe(recipe).model.attn_implementation == "eager"


def test_several_visible_gpus_under_torchrun_are_one_per_process(monkeypatch):
    fake_gpus(monkeypatch, *[(8, 0)] * 4)
    with pytest.raises(UserError, match="4 CUDA devices are visible"):
        check_devices()
    monkeypatch.setenv("WORLD_SIZE", "4")
    check_devices()


def imports(path: Path) -> set[str]:
    """The qlora modules `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "qlora":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlora."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("qlora.")}
    return found - {path.stem}


def test_the_modules_import_each_other_without_a_cycle_and_the_plan_imports_neither_check_nor_train():
    graph = {path.stem: imports(path) for path in (ROOT / "src" / "qlora").glob("*.py")}
    assert not graph["plan"] & {"check", "train", "model"}
    done, visiting = set(), []

    def visit(module):
        if module in visiting:
            pytest.fail(f"import cycle: {' -> '.join(visiting[visiting.index(module):] + [module])}")
        if module not in done:
            visiting.append(module)
            for imported in sorted(graph.get(module, ())):
                visit(imported)
            visiting.pop()
            done.add(module)

    for module in sorted(graph):
        visit(module)


def test_importing_qlora_quiets_nothing_until_a_model_loads_or_the_cli_runs():
    """The libraries' noise is quieted by compat.quiet_library_noise, called by the loaders and the CLI, not as a side
    effect of an import."""
    probe = """
import logging, warnings
import qlora.check, qlora.generate, qlora.merge, qlora.model, qlora.plan, qlora.train
def quiet():
    paged = any(f[0] == "ignore" and f[1] and f[1].match("Paged optimizers are not supported on CPU")
                for f in warnings.filters)
    return paged, logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.ERROR
print(quiet())
from qlora.compat import quiet_library_noise
quiet_library_noise()
print(quiet())
"""
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True
                          ).stdout.split("\n")[:2] == ["(False, False)", "(True, True)"]
