"""The real 4-bit path: bitsandbytes NF4 with double quantization, float32 LoRA adapters on top."""

import bitsandbytes as bnb
import torch

from qlora.model import add_lora, get_quantization_config, load_quantized_base


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
    model = add_lora(load_quantized_base(recipe), recipe)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    # all-linear: every quantized projection got an adapter
    assert sum(1 for n in trainable if n.endswith("lora_A.default.weight")) == 14


def test_target_modules_list_limits_the_adapters(make_recipe):
    recipe = make_recipe(lora={"target_modules": ["q_proj", "v_proj"], "r": 8})
    model = add_lora(load_quantized_base(recipe), recipe)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 2 * 2 and all(("q_proj" in n or "v_proj" in n) for n in names)
