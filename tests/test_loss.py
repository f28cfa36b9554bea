"""The trained-positions loss: the same loss and gradients as the model's own full-logits loss, on every twin."""

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from conftest import ROW, ROW_WITH_INPUT
from qlora.data import TEMPLATES, encode_segments, row_segments
from qlora.loss import fusable_head, trained_token_loss
from qlora.model import add_lora, add_trained_tokens, load_quantized_base, load_tokenizer
from qlora.plan import resolve_recipe

CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


def batch_for(recipe, padding_free, tokenizer):
    rows = []
    for row in (ROW, ROW_WITH_INPUT, dict(ROW, output=ROW["output"] * 3)):
        template = TEMPLATES[recipe.data.template]
        ids, labels = encode_segments(tokenizer, row_segments(row, recipe.data, template, tokenizer))
        rows.append({"input_ids": ids, "labels": labels})
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)(rows)


def adapter_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("arch, tokens, dtype", [
    ("gemma", [], "auto"), ("llama", [], "auto"), ("phi", [], "auto"), ("qwen2", [], "auto"),
    # lora.trained_tokens: a tied head (Gemma), an untied one grown by the new rows (Llama), one whose padded
    # vocabulary already holds them (Qwen2.5's 152064 rows); and in bf16 where auto picks float32 (no AVX512-BF16)
    ("gemma", CHATML_TOKENS, "auto"), ("llama", CHATML_TOKENS, "auto"), ("qwen2", ["<|fim_pad|>", "<|new|>"], "auto"),
    ("gemma", CHATML_TOKENS, "bfloat16"), ("llama", CHATML_TOKENS, "bfloat16")])
@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
def test_loss_and_gradients_equal_the_full_logits_loss(make_recipe, arch, tokens, dtype, padding_free):
    template = {"template": "chatml"} if tokens else {}
    recipe = resolve_recipe(make_recipe(arch=arch, lora={"dropout": 0.0, "trained_tokens": tokens},
                                        data=template, quantization={"compute_dtype": dtype}))
    tokenizer = load_tokenizer(recipe.model)
    add_trained_tokens(tokenizer, tokens)
    torch.manual_seed(0)
    model = add_lora(load_quantized_base(recipe), recipe, tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # a trained adapter, so every layer's gradient flows through it
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * p.std())  # trained rows, away from the base's
    base = model.get_base_model()
    head = fusable_head(base)
    assert head is not None
    batch = batch_for(recipe, padding_free, tokenizer)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.quantization.compute_dtype == "bfloat16")

    with autocast:
        expected = model(**batch).loss  # transformers' own loss: full logits, mean over trained tokens
    expected.backward()
    expected_grads = adapter_grads(model)
    model.zero_grad()
    with autocast:
        total, count = trained_token_loss(base, head, batch)
        loss = total / count
    loss.backward()
    grads = adapter_grads(model)

    assert count == (batch["labels"][:, 1:] != -100).sum()
    assert abs(loss.item() - expected.item()) <= 0.01 * expected.item()
    assert (grads - expected_grads).norm() <= 0.02 * expected_grads.norm()


def test_a_soft_capped_head_matches_too(tmp_path):
    """Gemma-2 soft-caps its logits (tanh): the cap and its gradient are applied as its own forward does."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           final_logit_softcapping=2.0, initializer_range=0.5))
    model.get_output_embeddings().weight.requires_grad_(False)
    ids = torch.randint(0, 300, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    expected = model(input_ids=ids, labels=labels).loss
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    total, count = trained_token_loss(model, model.get_output_embeddings(), {"input_ids": ids, "labels": labels})
    (total / count).backward()
    assert torch.allclose(total / count, expected, rtol=1e-5)
    for got, want in zip((p.grad for p in model.parameters() if p.requires_grad), expected_grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_under_fp16_autocast_a_float32_head_computes_in_fp16_as_the_models_own_head_would():
    """On a T4 peft keeps the head's weight in float32 and autocast runs the model's own head in fp16: qlora's loss
    must do the same (fp16 matmuls, float32 loss), not three float32 matmuls."""
    from qlora.loss import NLL, TrainedTokenCrossEntropy

    torch.manual_seed(0)
    hidden, weight, labels = torch.randn(8, 16, requires_grad=True), torch.randn(50, 16), torch.randint(0, 50, (8,))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = TrainedTokenCrossEntropy.apply(hidden, weight, None, labels, None, 1.0, None, None, NLL)
        own = torch.nn.functional.linear(hidden, weight)  # what autocast makes of the model's own head
    assert own.dtype == torch.float16 and loss.dtype == torch.float32
    fp16 = torch.nn.functional.cross_entropy((hidden.half() @ weight.half().T).float(), labels, reduction="sum")
    fp32 = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    assert loss.item() == fp16.item() != fp32.item()
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and hidden.grad.isfinite().all()
