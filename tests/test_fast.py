"""The fast path computes the same loss as the plain one: padding-free batches and the fused, tiled LM head."""

import json

import torch

from conftest import ROW, ROW_WITH_INPUT
from qlora.data import TEMPLATES, encode_segments, row_segments
from qlora.model import add_lora, load_quantized_base, load_tokenizer
from qlora.train import train

ROWS = [ROW, ROW_WITH_INPUT, {**ROW, "output": "def f(xs):\n    return sorted(set(xs))"},
        {**ROW_WITH_INPUT, "instruction": "Explain briefly.", "output": "It adds."}] * 2


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_padding_free_trains_exactly_like_padded_batches(make_recipe, tmp_path):
    schedule = {"max_steps": 6, "batch_size": 4, "logging_steps": 1, "save_steps": 100, "learning_rate": 1e-3}
    padded = losses(train(make_recipe(ROWS, train={**schedule, "padding_free": False,
                                                   "output_dir": str(tmp_path / "padded")})))
    free = losses(train(make_recipe(ROWS, train=schedule)))
    assert len(padded) == len(free) == 6
    for a, b in zip(padded, free):
        assert abs(a - b) / a < 0.01, (padded, free)


def test_fused_tiled_lm_head_gives_the_full_logits_loss_and_gradients(make_recipe):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    recipe = make_recipe(rows=ROWS)
    tok = load_tokenizer(recipe.model)
    examples = [encode_segments(tok, row_segments(r, recipe.data, TEMPLATES["alpaca"], tok)) for r in ROWS[:4]]
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(
        [{"input_ids": i, "labels": l} for i, l in examples])

    model = add_lora(load_quantized_base(recipe), recipe)
    torch.manual_seed(0)
    for name, p in model.named_parameters():  # non-zero lora_B so the adapter takes part in the forward
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    plain = model(**batch, use_cache=False).loss
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    add_fused_lm_head(model.get_base_model())
    fused = model(**batch, use_cache=False, fused_lm_head=True).loss
    fused.backward()
    assert abs(fused.item() - plain.item()) / plain.item() < 1e-4
    # the head's logits are summed in another order (tiles): in the bf16 compute dtype, per-element gradients
    # differ by rounding, so compare each gradient tensor as a whole
    errors = {n: ((p.grad - plain_grads[n]).norm() / plain_grads[n].norm()).item()
              for n, p in model.named_parameters() if p.requires_grad}
    print(f"largest relative gradient difference: {max(errors.values()):.3g}")
    assert max(errors.values()) < 1e-2, errors
