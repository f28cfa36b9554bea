"""The real 4-bit path: bitsandbytes NF4 with double quantization, float32 LoRA adapters on top."""

import json
import re
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import TrainerCallback

from qlora.check import check
from qlora.errors import UserError
from qlora.model import add_lora, load_quantized_base, load_tokenizer
from qlora.plan import get_quantization_config, resolve_recipe
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
