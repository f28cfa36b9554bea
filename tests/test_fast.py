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

    model = add_lora(load_quantized_base(recipe), recipe, tok)
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


def test_best_fit_decreasing_fills_rows_and_keeps_every_example():
    from qlora.collate import best_fit_decreasing

    lengths = [700, 300, 900, 100, 500, 2100, 250]
    bins = best_fit_decreasing(lengths, 1000)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1000 for b in bins if len(b) > 1)  # one row per over-long example
    assert [sorted(b) for b in bins] == [[5], [2, 3], [0, 1], [4, 6]]


def test_packed_rows_give_each_example_its_own_loss(make_recipe):
    """Examples packed into rows never attend to each other or to the padding: the summed loss of a packed
    micro-batch equals the sum of each example's loss computed alone."""
    from qlora.collate import PackedCollator
    from qlora.loss import fusable_head, trained_token_loss

    recipe = make_recipe(rows=ROWS)
    tok = load_tokenizer(recipe.model)
    examples = [dict(zip(("input_ids", "labels"), encode_segments(tok, row_segments(r, recipe.data,
                                                                                        TEMPLATES["alpaca"], tok))))
                for r in ROWS[:4]]
    capacity = max(len(e["input_ids"]) for e in examples) + 10  # several rows, some with padding
    batch = PackedCollator(tok.pad_token_id, capacity)(examples)
    assert batch["input_ids"].shape[0] > 1 and (batch["labels"] != -100).sum() == sum(
        sum(x != -100 for x in e["labels"]) for e in examples)  # the first label of each is the masked BOS anyway
    model = add_lora(load_quantized_base(recipe), recipe, tok)
    base = model.get_base_model()
    head = fusable_head(base)
    with torch.no_grad():
        packed, _ = trained_token_loss(base, head, batch)
        alone = sum(trained_token_loss(base, head, PackedCollator(tok.pad_token_id, capacity)([e]))[0]
                    for e in examples)
    assert abs(packed.item() - alone.item()) <= 1e-3 * alone.item()
