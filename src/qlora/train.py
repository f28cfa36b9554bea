"""train(recipe) -> run directory: 4-bit base + LoRA trained with TRL's SFTTrainer."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from rich.console import Console

from qlora.config import Recipe, dump_recipe
from qlora.data import TEMPLATES, build_datasets, load_rows
from qlora.errors import UserError
from qlora.model import add_lora, load_quantized_base, load_tokenizer

RECIPE_FILE = "recipe.yaml"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"

console = Console(stderr=True)


def write_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling so a crash never leaves it half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_run_dir(run: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory; with overwrite, clear it only if it is a qlora run."""
    if run.exists() and not run.is_dir():
        raise UserError(f"train.output_dir: {run} is a file, not a directory")
    if run.exists() and any(run.iterdir()):
        if not (run / RECIPE_FILE).is_file():
            raise UserError(f"train.output_dir: {run} is not empty and is not a qlora run; choose another directory")
        if not overwrite:
            raise UserError(f"train.output_dir: {run} already holds a run; pass --overwrite to start over "
                            "or set another train.output_dir")
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)


def resolved_recipe(recipe: Recipe) -> Recipe:
    """The recipe with a local model path made absolute, so a run works from any working directory."""
    model_path = Path(recipe.model.name_or_path).expanduser()
    if not model_path.is_dir():
        return recipe
    model = recipe.model.model_copy(update={"name_or_path": str(model_path.resolve())})
    return recipe.model_copy(update={"model": model})


def make_metrics_callback(path: Path):
    """A TrainerCallback appending one JSON object per logging step to metrics.jsonl."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last_time, self.last_tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "eval_loss" in logs:
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "eval_loss": logs["eval_loss"]}) + "\n")
            if not logs or "loss" not in logs:
                return
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            record = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_seen": tokens,
                "tokens_per_second": round((tokens - self.last_tokens) / max(now - self.last_time, 1e-9), 1),
            }
            self.last_time, self.last_tokens = now, tokens
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    return MetricsCallback()


def sft_config(recipe: Recipe, run: Path):
    """SFTConfig from the recipe's train section (warmup_ratio becomes warmup_steps, a ratio when < 1)."""
    from trl import SFTConfig

    t, compute = recipe.train, recipe.quantization.compute_dtype
    return SFTConfig(
        output_dir=str(run / CHECKPOINT_DIR),
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        eval_strategy="steps" if recipe.data.eval_fraction or recipe.data.eval_path else "no",
        eval_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=list(t.report_to) or "none",
        bf16=compute == "bfloat16",
        fp16=compute == "float16",
        include_num_input_tokens_seen="non_padding",
        dataset_kwargs={"skip_prepare_dataset": True},  # rows arrive tokenized and masked by data.py
        max_length=recipe.data.max_length,
        dataloader_pin_memory=False,
    )


def train(recipe: Recipe, *, overwrite: bool = False, callbacks: list | None = None) -> Path:
    """Train the recipe's adapter and return the run directory.

    `callbacks` are extra transformers TrainerCallbacks (for scripts and tests).
    """
    from trl import SFTTrainer

    recipe = resolved_recipe(recipe)
    run = Path(recipe.train.output_dir)
    template = TEMPLATES[recipe.data.template]
    rows = load_rows(recipe.data)  # a missing data file is reported before any download
    tokenizer = load_tokenizer(recipe.model)
    dataset, eval_dataset, report = build_datasets(recipe, rows, tokenizer, template)
    console.print(f"data: {report.summary()}")

    prepare_run_dir(run, overwrite)
    write_atomic(run / RECIPE_FILE, dump_recipe(recipe))
    console.print(f"loading {recipe.model.name_or_path} "
                  f"({'4-bit ' + recipe.quantization.quant_type if recipe.quantization.load_in_4bit else 'full precision'})")
    model = add_lora(load_quantized_base(recipe), recipe)
    trainable, total = model.get_nb_trainable_parameters()
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")

    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, run),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[make_metrics_callback(run / METRICS_FILE), *(callbacks or [])],
    )
    trainer.train()

    tmp = run / f".{ADAPTER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    template.save(tmp)
    shutil.rmtree(run / ADAPTER_DIR, ignore_errors=True)
    tmp.rename(run / ADAPTER_DIR)
    console.print(f"[green]done:[/] adapter saved to {run / ADAPTER_DIR}")
    return run
