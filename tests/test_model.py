"""The real 4-bit path: bitsandbytes NF4 with double quantization, float32 LoRA adapters on top."""

import json
import re
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import TrainerCallback

from qlora.check import check
from qlora.config import ModelSection
from qlora.errors import UserError
from qlora.model import (add_lora, check_devices, cpu_has_native_bf16, get_quantization_config,
                         load_quantized_base, load_tokenizer, resolve_attention, resolve_recipe)
from qlora.train import train


def test_base_linears_are_nf4_double_quantized(make_recipe):
    recipe = make_recipe()
    model = load_quantized_base(recipe)
    linears = [m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    for layer in linears:
        state = layer.weight.quant_state
        assert layer.weight.dtype == torch.uint8
        assert state.quant_type == "nf4" and state.nested  # nested = double quantization
    config = get_quantization_config(recipe.quantization)
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_quant_type == "nf4"


def test_lora_adapters_are_the_only_trainable_weights_and_stay_float32(make_recipe):
    recipe = make_recipe()
    model = add_lora(load_quantized_base(recipe), recipe, load_tokenizer(recipe.model))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    # all-linear: every quantized projection got an adapter
    assert sum(1 for n in trainable if n.endswith("lora_A.default.weight")) == 14


def test_target_modules_list_limits_the_adapters(make_recipe):
    recipe = make_recipe(lora={"target_modules": ["q_proj", "v_proj"], "r": 8})
    model = add_lora(load_quantized_base(recipe), recipe, load_tokenizer(recipe.model))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 2 * 2 and all(("q_proj" in n or "v_proj" in n) for n in names)


def test_auto_settings_resolve_for_this_machine(make_recipe):
    resolved = resolve_recipe(make_recipe())
    native = cpu_has_native_bf16()
    assert resolved.quantization.compute_dtype == ("bfloat16" if native else "float32")
    assert resolved.train.optimizer == "adamw_torch" and resolved.model.attn_implementation == "sdpa"
    assert resolve_recipe(resolved) == resolved  # a recorded run resolves to itself when resumed


def test_a_model_class_without_sdpa_falls_back_to_eager(make_recipe, tmp_path):
    from transformers import Gemma2Config

    Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, vocab_size=256).save_pretrained(tmp_path / "gemma2")
    recipe = make_recipe(model={"name_or_path": str(tmp_path / "gemma2")})
    assert resolve_recipe(recipe).model.attn_implementation == "eager"


@pytest.mark.parametrize("sections, env, message", [
    ({"quantization": {"compute_dtype": "float16"}}, {}, "quantization.compute_dtype: float16 mixed precision needs"),
    ({"model": {"attn_implementation": "flash_attention_2"}}, {}, "model.attn_implementation: flash_attention_2 needs"),
    ({"quantization": {"quant_storage": "bfloat16"}, "train": {"distributed": "fsdp"}}, {},
     "train.distributed: fsdp shards the model across CUDA GPUs and this machine has none; use ddp"),
], ids=["fp16-on-cpu", "flash-attn-on-cpu", "fsdp-on-cpu"])
def test_check_and_train_refuse_what_this_machine_cannot_run(make_recipe, monkeypatch, sections, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    recipe = make_recipe(**sections)
    for command in (check, train):
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            command(recipe)
    assert not Path(recipe.train.output_dir).exists()  # refused before anything was written


def test_several_visible_gpus_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(UserError, match="4 CUDA devices are visible: train on all of them with `qlora train RECIPE "
                                        "--nproc-per-node 4`, or on one with CUDA_VISIBLE_DEVICES=0"):
        check_devices()
    monkeypatch.setenv("WORLD_SIZE", "4")  # one process per GPU under torchrun
    check_devices()


def fake_gpus(monkeypatch, *capabilities):
    """torch.cuda as a machine with these GPUs (compute capabilities) shows it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capabilities[i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: {(7, 5): "Tesla T4", (8, 0): "A100",
                                                                   (9, 0): "H100"}[capabilities[i]])


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
    fake_gpus(monkeypatch, *capabilities)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())  # flash-attn "installed"
    model = ModelSection(name_or_path="meta-llama/Llama-2-7b-hf", attn_implementation="flash_attention_2")
    if message is None:
        assert resolve_attention(model, dtype) == "flash_attention_2"
    else:
        with pytest.raises(UserError, match=f"model.attn_implementation: {re.escape(message)}"):
            resolve_attention(model, dtype)


@pytest.mark.parametrize("arch", ["gemma", "llama"], ids=["tied-head", "untied-head"])
def test_training_keeps_embedding_and_head_in_the_compute_dtype_and_norms_in_float32(make_recipe, arch):
    """peft's fp32 upcast is undone for the embedding and head only (README: "Embedding and LM head in bf16")."""

    class Dtypes(TrainerCallback):  # what the trainer really trains, after its own casts
        def on_step_end(self, args, state, control, model=None, **kwargs):
            base = model.get_base_model()
            self.embedding, self.head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
            self.norms = {p.dtype for n, p in base.named_parameters() if "norm" in n}
            self.adapters = {p.dtype for p in model.parameters() if p.requires_grad}
            self.linears = {m.weight.dtype for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)}

    recipe = make_recipe(arch=arch)
    compute = getattr(torch, resolve_recipe(recipe).quantization.compute_dtype)  # bf16 here, float32 without it
    dtypes = Dtypes()
    run = train(recipe, callbacks=[dtypes])
    assert dtypes.embedding.dtype == dtypes.head.dtype == compute
    assert (dtypes.head is dtypes.embedding) == (arch == "gemma")  # the cast kept Gemma's tie
    assert dtypes.norms == {torch.float32} and dtypes.adapters == {torch.float32}
    assert dtypes.linears == {torch.uint8}  # still NF4
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < loss < float("inf") for loss in losses) and losses[1] < losses[0]
