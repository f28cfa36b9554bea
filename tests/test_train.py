"""End to end on CPU: quantize -> LoRA -> SFTTrainer -> run directory -> load -> greedy decode."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import ROW, ROW_WITH_INPUT
from qlora.config import load_recipe
from qlora.data import encode_prompt
from qlora.errors import UserError
from qlora.generate import load_run
from qlora.plan import resolve_recipe
from qlora.train import train


class WeightWatcher(TrainerCallback):
    """Snapshots every weight when training starts and ends."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.state_dict().items()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_training_writes_the_run_directory_and_changes_only_the_adapter(make_recipe):
    recipe = make_recipe(rows=[ROW, ROW_WITH_INPUT])
    watcher = WeightWatcher()
    run = train(recipe, callbacks=[watcher])

    saved = load_recipe(run / "recipe.yaml")
    assert saved == resolve_recipe(recipe)  # auto settings as this machine resolved them
    assert saved.quantization.compute_dtype in ("bfloat16", "float32") and saved.train.optimizer == "adamw_torch"
    assert [start["step"] for start in json.loads((run / "environment.json").read_text())] == [0]
    adapter = run / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "template.json"):
        assert (adapter / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    for m in metrics:
        assert m["loss"] > 0 and m["tokens_per_second"] > 0 and m["learning_rate"] is not None

    lora = [n for n in watcher.before if "lora_" in n]
    base = [n for n in watcher.before if "lora_" not in n]
    assert lora and base
    assert all(not torch.equal(watcher.before[n], watcher.after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(watcher.before[n], watcher.after[n]) for n in base)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)


def greedy_tokens(loaded, instruction):
    prompt = encode_prompt(loaded.tokenizer, loaded.template, instruction)
    with torch.no_grad():
        out = loaded.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=80, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_memorises_one_example_then_stops_with_eos(memorised_run):
    run = memorised_run
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.05 < losses[0]
    loaded = load_run(run)
    tokens = greedy_tokens(loaded, ROW["instruction"])
    assert tokens[-1] == loaded.tokenizer.eos_token_id
    assert loaded.tokenizer.decode(tokens[:-1]) == ROW["output"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "phi"])
def test_each_architecture_trains_and_generates(make_recipe, arch):
    from qlora.config import GenerationSection
    from qlora.generate import generate

    run = train(make_recipe(rows=[ROW, ROW_WITH_INPUT], arch=arch))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    texts = generate(load_run(run), [(ROW["instruction"], "")], GenerationSection(max_new_tokens=5))
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_an_existing_run_is_extended_or_with_overwrite_started_over(make_recipe, capsys):
    recipe = make_recipe(train={"max_steps": 1, "save_steps": 1})
    run = train(recipe)
    longer = recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": 2})})
    assert train(longer) == run
    assert f"resuming from {run / 'checkpoints/checkpoint-1'}" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2]
    assert train(recipe, overwrite=True) == run
    assert "resuming" not in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-1"]


def test_a_non_empty_directory_that_is_not_a_run_is_never_touched(make_recipe, tmp_path):
    recipe = make_recipe(train={"max_steps": 1})
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a directory `qlora train` wrote, so --overwrite will not delete it"):
        train(recipe, overwrite=True)
    with pytest.raises(UserError, match="not a qlora run"):
        train(recipe)
    assert (run / "notes.txt").read_text() == "mine"


def test_the_console_shows_one_line_per_logging_step_and_no_raw_dicts(make_recipe, capsys):
    train(make_recipe(train={"max_steps": 4, "logging_steps": 2}))
    out, err = capsys.readouterr()
    assert "{'" not in out + err and "/4 [" not in err  # no printed log dicts, no tqdm bar over the 4 steps
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split(" · ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all(" · loss " in line and " · lr " in line and " tok/s" in line and "GiB RSS" in line for line in lines)
    assert "trained to step 4 in " in err


def test_tensorboard_event_files_are_written_beside_the_metrics(make_recipe):
    run = train(make_recipe(train={"max_steps": 2, "logging_steps": 1, "report_to": ["tensorboard"]}))
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert not list((run / "checkpoints").glob("runs"))


def test_optimizer_schedule_eval_neftune_and_extra_knobs_reach_the_trainer(make_recipe):
    class Seen(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.args, self.betas = args, optimizer.param_groups[0]["betas"]
            embedding = model.get_input_embeddings()
            ids = torch.tensor([[1, 2, 3]])
            training = embedding(ids)  # NEFTune's noise is added in training mode only
            embedding.eval()
            clean = embedding(ids)
            self.noisy = not torch.equal(training, clean)
            self.clean_in_eval = torch.equal(clean, embedding(ids))
            embedding.train()

    seen = Seen()
    recipe = make_recipe(rows=[ROW, ROW_WITH_INPUT] * 5, data={"eval_fraction": 0.2},
                         train={"max_steps": 4, "logging_steps": 1, "save_steps": 4, "eval_steps": 2,
                                "eval_batch_size": 3, "lr_scheduler": "cosine", "min_lr_ratio": 0.5,
                                "warmup_ratio": 0.0, "neftune_noise_alpha": 5.0, "adam_beta1": 0.8,
                                "adam_beta2": 0.95, "adam_epsilon": 1e-6, "extra": {"logging_nan_inf_filter": False}})
    run = train(recipe, callbacks=[seen])
    assert seen.betas == (0.8, 0.95) and seen.args.adam_epsilon == 1e-6
    assert seen.args.per_device_eval_batch_size == 3 and seen.args.logging_nan_inf_filter is False
    assert seen.noisy and seen.clean_in_eval
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "eval_loss" in m] == [2, 4]
    last_lr = [m["learning_rate"] for m in lines if "learning_rate" in m][-1]
    assert 0.5 * 1e-2 <= last_lr < 1e-2  # cosine down to half the peak, not to 0


@pytest.mark.parametrize("extra, message", [
    ({"learning_rate": 1.0}, "train.extra.learning_rate: qlora sets learning_rate from the recipe"),
    ({"torch_compil": True}, "train.extra.torch_compil is not an SFTConfig field; did you mean torch_compile?"),
])
def test_train_extra_takes_only_fields_the_recipe_does_not_own(make_recipe, extra, message):
    recipe = make_recipe(train={"extra": extra})
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        train(recipe)
    assert not Path(recipe.train.output_dir).exists()  # refused before anything was written


def test_tokens_per_second_leaves_out_checkpoint_saves_and_evals(tmp_path, monkeypatch):
    """Steps of 1 s each over 100 tokens, logged every 2 steps, with a 50 s eval of the base before step 1 and a
    30 s eval and save after step 2: every record says 100 tokens/s, where counting them made a dip that is not the
    training (and counting the eval twice, as it once did, a spike)."""
    from types import SimpleNamespace

    import qlora.train as t

    clock = [0.0]
    monkeypatch.setattr(t.time, "perf_counter", lambda: clock[0])
    callback = t.make_metrics_callback(tmp_path / "metrics.jsonl")
    state = SimpleNamespace(num_input_tokens_seen=0, global_step=0, epoch=0.0, is_world_process_zero=True)
    callback.on_train_begin(None, state, None)
    clock[0] += 50.0  # the base's eval_problems eval, before the first step
    for step in range(1, 7):
        callback.on_step_begin(None, state, None)
        clock[0] += 1.0
        state.num_input_tokens_seen += 100
        state.global_step = step
        callback.on_step_end(None, state, None)
        if step == 2:  # the eval_problems callback, after this one's on_step_end, logs its eval first
            clock[0] += 20.0
            callback.on_log(None, state, None, logs={"eval_pass@1": 0.5, "eval_passed": 1, "eval_samples": 2,
                                                     "eval_seconds": 20.0})
        if step % 2 == 0:
            callback.on_log(None, state, None, logs={"loss": 1.0})
        if step == 2:
            clock[0] += 10.0  # the checkpoint save
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("tokens_per_second")) for r in records] == [(2, None), (2, 100.0), (4, 100.0),
                                                                          (6, 100.0)]
