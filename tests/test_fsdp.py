"""train.distributed: fsdp (FSDP-QLoRA): the arguments transformers, accelerate and bitsandbytes receive, and two gloo
CPU ranks training under FSDP2 for real (fully_shard over the 4-bit weights) with only the device gates lifted
(tests/fsdp_on_gloo.py says which): each holds half the base, the losses are DDP's, and a resume is exact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig
from trl import SFTConfig

from conftest import recipe_for
from qlora.check import GB, estimate_memory, memory_problem, model_shape
from qlora.checkpoint import QLoRATrainer
from qlora.config import dump_recipe, validate_recipe
from qlora.model import add_lora, load_quantized_base, load_tokenizer
from qlora.plan import sft_arguments
from test_distributed import ROWS, free_port, qlora_train

FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")


@pytest.fixture
def fsdp_env(monkeypatch):
    """The FSDP environment variables unset, and restored after the test (sharded loading sets them)."""
    for name in FSDP_ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def loads(monkeypatch, fsdp_env):
    """Every from_pretrained call's keyword arguments, with the FSDP environment it saw; the load itself is real."""
    real, calls = AutoModelForCausalLM.from_pretrained, []

    def recorded(*args, **kwargs):
        calls.append({**kwargs, "env": {name: os.environ.get(name) for name in FSDP_ENV}})
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recorded)
    return calls


def float16_recipe(tmp_path, tiny_model, monkeypatch, distributed):
    """float16 compute and storage (a T4's FSDP-QLoRA), on a machine that accepts it."""
    monkeypatch.setattr("qlora.plan.resolve_compute_dtype", lambda name: name)
    return recipe_for(tmp_path, tiny_model("gemma"), ROWS, train={"distributed": distributed},
                      quantization={"compute_dtype": "float16", "quant_storage": "float16"})


def test_sharding_sets_the_environment_first_loads_without_a_device_map_and_passes_fsdp2_keys_only(
        tmp_path, tiny_model, monkeypatch, loads):
    recipe = float16_recipe(tmp_path, tiny_model, monkeypatch, "fsdp")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank of `qlora train --nproc-per-node 2`
    load_quantized_base(recipe)
    assert loads[0]["env"] == {"ACCELERATE_USE_FSDP": "True", "FSDP_CPU_RAM_EFFICIENT_LOADING": "True"}
    assert "device_map" not in loads[0] and loads[0]["dtype"] == torch.float16  # the storage dtype, whole units
    assert loads[0]["quantization_config"].bnb_4bit_quant_storage == torch.float16

    arguments = sft_arguments(recipe)
    assert arguments["fsdp"] is True and arguments["fsdp_config"] == {
        "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
        "cpu_ram_efficient_loading": True, "state_dict_type": "FULL_STATE_DICT"}
    # what transformers hands accelerate's FullyShardedDataParallelPlugin: FSDP2, none of FSDP1's keys
    # (in one process, as resolve_recipe makes them on a GPU: fp16 and auto's optimizer are CUDA-only here)
    monkeypatch.setenv("WORLD_SIZE", "1")
    plugin = SFTConfig(**{**arguments, "fp16": False, "optim": "adamw_torch"}).fsdp_plugin_args
    assert plugin == {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                      "cpu_ram_efficient_loading": True, "state_dict_type": "FULL_STATE_DICT",
                      "reshard_after_forward": True}


def test_without_sharding_the_base_goes_to_this_device_and_the_environment_is_left_alone(tmp_path, tiny_model,
                                                                                        monkeypatch, loads):
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = recipe_for(tmp_path, tiny_model("gemma"), ROWS)  # ddp
    load_quantized_base(recipe)
    assert loads[0]["device_map"] == {"": "cpu"} and loads[0]["env"] == dict.fromkeys(FSDP_ENV)
    assert "fsdp" not in sft_arguments(recipe)


@pytest.mark.parametrize("distributed, adapter", [("fsdp", torch.float16), ("ddp", torch.float32)])
def test_the_adapter_is_in_the_storage_dtype_when_sharded_and_the_trainer_keeps_it(tmp_path, tiny_model, monkeypatch,
                                                                                    fsdp_env, distributed, adapter):
    """FSDP flattens one dtype per unit: with quant_storage float16 the adapter is float16 too, not TRL's bf16."""
    recipe = float16_recipe(tmp_path, tiny_model, monkeypatch, distributed)
    monkeypatch.setenv("WORLD_SIZE", "2")
    tokenizer = load_tokenizer(recipe.model)
    model = add_lora(load_quantized_base(recipe), recipe, tokenizer)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {adapter}
    # the trainer in one process, for what is checked here (with sharding's environment it would make an FSDP1 plugin)
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in FSDP_ENV:
        monkeypatch.delenv(name, raising=False)
    # trainer arguments this CPU accepts (fp16 and auto's optimizer are CUDA-only); TRL's cast does not depend on them
    arguments = {**sft_arguments(recipe), "fp16": False, "optim": "adamw_torch"}
    trainer = QLoRATrainer(model=model, args=SFTConfig(**arguments), processing_class=tokenizer,
                           train_dataset=Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]]}))
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {adapter}


def test_fsdp_is_refused_where_one_gpu_cannot_load_the_whole_4bit_base(tmp_path, monkeypatch):
    """Llama-2-70B on 4 GPUs of 24 GB: its shards and a batch would fit, but each GPU loads the 4-bit base whole."""
    LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8).save_pretrained(tmp_path)
    recipe = validate_recipe({"model": {"name_or_path": str(tmp_path)}, "data": {"path": "x.json"},
                              "quantization": {"compute_dtype": "bfloat16", "quant_storage": "bfloat16"},
                              "train": {"output_dir": "x", "batch_size": 1, "distributed": "fsdp",
                                        "optimizer": "adamw_torch"}}, "r")  # auto, resolved on a GPU
    memory = estimate_memory(recipe, model_shape(recipe), 1024, processes=4)
    assert sum(memory["parts"].values()) < 24 * GB < memory["loading_whole_base"] == memory["total"]
    monkeypatch.setattr("qlora.check.device_memory", lambda: (24 * GB, "cuda:0"))
    assert memory_problem(recipe, memory) == (
        "train.distributed: fsdp: every GPU loads the whole 4-bit base before FSDP shards it, an estimated 33.9 GiB, "
        "more than the 24.0 GiB of cuda:0 (accelerate 1.16 loads only a full-precision base on rank 0 alone); use "
        "GPUs with more memory")


def write_recipe(directory: Path, model_dir: Path, **train_section) -> Path:
    """4 steps of 2 ranks x batch 1 in bf16, a checkpoint every 2 steps; a constant learning rate, so a run of 2
    steps resumed for 2 more is the run of 4."""
    directory.mkdir(parents=True, exist_ok=True)
    recipe = recipe_for(directory, model_dir, ROWS,
                        quantization={"compute_dtype": "bfloat16", "quant_storage": "bfloat16"},
                        train={"batch_size": 1, "logging_steps": 1, "lr_scheduler": "constant", **train_section})
    path = directory / "recipe.yaml"
    path.write_text(dump_recipe(recipe))
    return path


def fsdp_on_gloo(recipe: Path, *flags: str) -> str:
    """Run the recipe on 2 gloo ranks under FSDP; return the console (stderr)."""
    worker = Path(__file__).with_name("fsdp_on_gloo.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), str(worker), str(recipe), *flags], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_model):
    recipe = write_recipe(tmp_path_factory.mktemp("fsdp"), tiny_model("gemma"), distributed="fsdp")
    fsdp_on_gloo(recipe)
    return recipe.parent


def test_two_gloo_ranks_each_hold_half_the_4bit_base_in_one_dtype(fsdp_run):
    ranks = [json.loads((fsdp_run / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["base_bytes_here"] == pytest.approx(rank["base_bytes"] / 2, rel=0.01)
        assert rank["base_dtypes"] == rank["adapter_dtypes"] == ["torch.bfloat16"]
    assert ranks[0]["base_bytes_here"] + ranks[1]["base_bytes_here"] == ranks[0]["base_bytes"]


def test_fsdp_losses_match_ddp_within_one_percent(fsdp_run, tmp_path, tiny_model):
    ddp = write_recipe(tmp_path, tiny_model("gemma"))
    done = qlora_train(ddp, "--nproc-per-node", "2", "--master-port", str(free_port()))
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]
    sharded, replicated = losses(fsdp_run / "run"), losses(tmp_path / "run")
    assert len(sharded) == len(replicated) == 4
    assert sharded == pytest.approx(replicated, rel=0.01)
    assert sharded[-1] < sharded[0]


def test_an_fsdp_run_resumed_from_its_checkpoint_equals_the_uninterrupted_one(fsdp_run, tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("gemma"), distributed="fsdp", max_steps=2)
    fsdp_on_gloo(recipe)
    err = fsdp_on_gloo(recipe, "--set", "train.max_steps=4")
    assert f"resuming from {tmp_path / 'run/checkpoints/checkpoint-2'} (step 2)" in err
    written = {path.suffix for path in (tmp_path / "run/checkpoints").rglob("*") if path.is_file()}
    assert written == {".safetensors", ".json", ".md"}  # peft's model card; no pickle, and the resume read none
    # (fsdp_on_gloo refuses torch.load)
    assert err.count("2 processes (FSDP): effective batch 1 x 1 x 2 = 2 examples per optimizer step") == 1
    resumed, uninterrupted = (load_file(run / "run/adapter/adapter_model.safetensors") for run in (tmp_path, fsdp_run))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert losses(tmp_path / "run") == losses(fsdp_run / "run")
