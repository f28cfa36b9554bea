"""train(recipe) -> run directory: 4-bit base + LoRA trained with TRL's SFTTrainer."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from qlora.config import Recipe, dump_recipe, load_recipe
from qlora.data import TEMPLATES, build_datasets, load_rows
from qlora.errors import RunFailed, RunInterrupted, UserError
from qlora.files import write_atomic
from qlora.model import (add_lora, device_description, load_quantized_base, load_tokenizer, resolve_recipe,
                         save_tokenizer)

RECIPE_FILE = "recipe.yaml"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
ENVIRONMENT_FILE = "environment.json"
RUN_LENGTH = ("train.max_steps", "train.epochs")  # the only recipe keys a resumed run may change
# keys whose `auto` recipe.yaml records as this machine resolved it (see model.resolve_recipe)
RESOLVED_KEYS = ("quantization.compute_dtype", "train.optimizer", "model.attn_implementation")

console = Console(stderr=True, soft_wrap=True)  # no hard wraps: a path in a message stays one greppable line


def recipe_changes(old: Recipe, new: Recipe) -> list[str]:
    """`key (old -> new)` for every recipe key whose value differs, the run length aside."""
    before, after = ({f"{section}.{key}": value for section, values in r.model_dump(mode="json").items()
                      for key, value in values.items()} for r in (old, new))
    return [f"{key} ({json.dumps(before.get(key))} -> {json.dumps(after.get(key))})"
            for key in dict.fromkeys([*before, *after])
            if key not in RUN_LENGTH and before.get(key) != after.get(key)]


def remove_leftovers(run: Path) -> None:
    """Delete what interrupted writes left behind: `.NAME.tmp` siblings and incomplete checkpoints."""
    from qlora.checkpoint import complete_checkpoints

    complete = set(complete_checkpoints(run / CHECKPOINT_DIR))
    for path in [*run.glob(".*.tmp"), *(p for p in (run / CHECKPOINT_DIR).glob("*") if p not in complete)]:
        console.print(f"removing {path}, left by an interrupted write")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep the metrics.jsonl lines up to `step`, so a resumed run continues the file without repeats."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    write_atomic(path, "".join(kept))


def prepare_run_dir(run: Path, recipe: Recipe, overwrite: bool) -> Path | None:
    """Make `run` ready to train into; return the checkpoint to resume from (None: start at step 0).

    A missing or empty directory starts a run; so does a qlora run with `overwrite`, after clearing it.
    A qlora run whose recipe differs only in the run length is resumed from its newest complete
    checkpoint, after removing leftovers and the metrics logged past it. Anything else is refused untouched.
    """
    from qlora.checkpoint import checkpoint_step, complete_checkpoints

    if run.exists() and not run.is_dir():
        raise UserError(f"train.output_dir: {run} is a file, not a directory")
    if run.exists() and any(run.iterdir()):
        if not (run / RECIPE_FILE).is_file():
            raise UserError(f"train.output_dir: {run} is not empty and is not a qlora run; choose another directory")
        if not overwrite:
            changes = recipe_changes(load_recipe(run / RECIPE_FILE), recipe)
            if changes:
                resolved = [key for key in RESOLVED_KEYS if any(c.startswith(key + " ") for c in changes)]
                hint = (f" ({', '.join(resolved)} as this machine resolves them: set the run's values in the recipe "
                        "to continue it here)" if resolved else "")
                raise UserError(f"train.output_dir: {run} holds a run with another recipe: {', '.join(changes)}"
                                f"{hint}. Only {' and '.join(RUN_LENGTH)} may change when resuming; pass --overwrite "
                                "to start over or set another train.output_dir")
            checkpoints = complete_checkpoints(run / CHECKPOINT_DIR)
            resume = checkpoints[-1] if checkpoints else None
            step = checkpoint_step(resume) if resume else 0
            if recipe.train.max_steps and recipe.train.max_steps < step:
                raise UserError(f"train.max_steps={recipe.train.max_steps}: {run} is already at step {step}; "
                                "train longer, or pass --overwrite to start over")
            remove_leftovers(run)
            drop_metrics_after(run / METRICS_FILE, step)
            console.print(f"resuming from {resume} (step {step})" if resume
                          else f"{run} holds no complete checkpoint yet: training from step 0")
            return resume
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    return None


@contextmanager
def write_failures(run: Path):
    """Turn a failed write under `run` (disk full, unwritable) into one RunFailed line."""
    from safetensors import SafetensorError  # how safetensors reports an I/O error

    try:
        yield
    except (OSError, SafetensorError) as exc:
        from qlora.checkpoint import complete_checkpoints

        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        kept = complete_checkpoints(run / CHECKPOINT_DIR)
        intact = f"; {kept[-1]} and the checkpoints before it are intact" if kept else ""
        raise RunFailed(f"cannot write to {run}: {reason}{where}{intact}") from None


@contextmanager
def out_of_memory_hint(recipe: Recipe):
    """Turn a device out-of-memory error into one RunFailed line naming the knobs that lower memory."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        from qlora.checkpoint import complete_checkpoints

        t, d = recipe.train, recipe.data
        kept = complete_checkpoints(Path(t.output_dir) / CHECKPOINT_DIR)
        resume = f"; rerun resumes from {kept[-1]}" if kept else ""
        checkpointing = "" if t.gradient_checkpointing else ", train.gradient_checkpointing=true"
        raise RunFailed(f"out of GPU memory: lower train.batch_size={t.batch_size} (raise train.grad_accum="
                        f"{t.grad_accum} to keep the effective batch), data.max_length={d.max_length}, "
                        f"lora.r={recipe.lora.r}{checkpointing}; `qlora check` on the recipe estimates the "
                        f"peak{resume}") from None


class SignalStop:
    """SIGINT / SIGTERM during `qlora train`: the first one in the training loop stops it after the
    current step with a checkpoint (see checkpoint.StopAtSignal).

    A second signal, or one before the loop starts or after it ends, exits at once: every write is
    atomic, so that never leaves a half-written checkpoint looking complete.
    """

    def __init__(self):
        self.signum: int | None = None
        self.in_loop = False

    @contextmanager
    def installed(self):
        """Handle SIGINT and SIGTERM here, then restore the previous handlers.

        Installed explicitly: a job that a non-interactive shell starts in the background inherits
        SIGINT as ignored, so KeyboardInterrupt cannot be relied on.
        """
        if threading.current_thread() is not threading.main_thread():  # only the main thread may
            yield
            return
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None or not self.in_loop:
            console.print(f"{name}: exiting now")
            raise SystemExit(128 + signum)
        self.signum = signum
        console.print(f"{name}: finishing this step and writing a checkpoint (send it again to exit at once)")


def record_environment(path: Path, resume: Path | None) -> None:
    """Append where and with what this (re)start of the run trains to environment.json; say if the device moved."""
    from importlib.metadata import version

    from qlora.checkpoint import checkpoint_step

    starts = json.loads(path.read_text(encoding="utf-8")) if resume and path.is_file() else []
    entry = {"step": checkpoint_step(resume) if resume else 0, "device": device_description(),
             **{name: version(name) for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")}}
    if starts and starts[-1]["device"] != entry["device"]:
        console.print(f"note: the run trained on {starts[-1]['device']} and continues on {entry['device']}")
    write_atomic(path, json.dumps([*starts, entry], indent=1) + "\n")


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


def use_liger(setting: str) -> bool:
    """Whether to patch the model with Liger kernels (train.liger)."""
    import importlib.util

    import torch

    installed = importlib.util.find_spec("liger_kernel") is not None
    if setting == "on" and not installed:
        raise UserError("train.liger: on, but liger-kernel is not installed: pip install 'qlora[liger]'")
    return setting == "on" or (setting == "auto" and installed and torch.cuda.is_available())


def sft_config(recipe: Recipe, run: Path):
    """SFTConfig from the recipe's train section (warmup_ratio becomes warmup_steps, a ratio when < 1)."""
    from trl import SFTConfig

    import torch

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
        use_cpu=not torch.cuda.is_available(),  # the trainer's CPU mode: bf16 autocast on CPU
        include_num_input_tokens_seen="non_padding",
        dataset_kwargs={"skip_prepare_dataset": True},  # rows arrive tokenized and masked by data.py
        max_length=None,  # data.py already applied data.max_length and data.too_long
        padding_free=t.padding_free,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        use_liger_kernel=use_liger(t.liger),
        dataloader_pin_memory=False,
    )


def train(recipe: Recipe, *, overwrite: bool = False, callbacks: list | None = None) -> Path:
    """Train the recipe's adapter and return the run directory; a run already there is resumed.

    `callbacks` are extra transformers TrainerCallbacks (for scripts and tests). Raises RunFailed on a
    non-finite loss or a failed write, RunInterrupted after SIGINT / SIGTERM (once a checkpoint is written).
    """
    stop = SignalStop()  # before _train's imports, which take seconds in which a signal would be lost
    with stop.installed():
        return _train(recipe, overwrite, callbacks or [], stop)


def _train(recipe: Recipe, overwrite: bool, callbacks: list, stop: SignalStop) -> Path:
    from transformers import set_seed

    from qlora.checkpoint import QLoRATrainer, StopAtSignal, complete_checkpoints

    recipe = resolve_recipe(recipe)
    run = Path(recipe.train.output_dir)
    template = TEMPLATES[recipe.data.template]
    rows = load_rows(recipe.data)  # a missing data file is reported before any download
    tokenizer = load_tokenizer(recipe.model)
    dataset, eval_dataset, report = build_datasets(recipe, rows, tokenizer, template)
    console.print(f"data: {report.summary()}")

    with write_failures(run):
        resume = prepare_run_dir(run, recipe, overwrite)
        write_atomic(run / RECIPE_FILE, dump_recipe(recipe))
        record_environment(run / ENVIRONMENT_FILE, resume)
    q = recipe.quantization
    console.print(f"device {device_description()}: compute {q.compute_dtype}, optimizer {recipe.train.optimizer}, "
                  f"attention {recipe.model.attn_implementation}")
    console.print(f"loading {recipe.model.name_or_path} "
                  f"({'4-bit ' + recipe.quantization.quant_type if recipe.quantization.load_in_4bit else 'full precision'})")
    set_seed(recipe.train.seed)  # the adapter's initial weights too, so a run can be repeated exactly
    model = add_lora(load_quantized_base(recipe), recipe)
    trainable, total = model.get_nb_trainable_parameters()
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")

    trainer = QLoRATrainer(
        model=model,
        args=sft_config(recipe, run),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[make_metrics_callback(run / METRICS_FILE), StopAtSignal(stop), *callbacks],
    )
    with write_failures(run), out_of_memory_hint(recipe):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.signum is not None:
        raise RunInterrupted(f"{signal.Signals(stop.signum).name} after step {trainer.state.global_step}: "
                             f"{complete_checkpoints(run / CHECKPOINT_DIR)[-1]} is complete; "
                             "run the same command to resume", stop.signum)

    with write_failures(run):
        tmp = run / f".{ADAPTER_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, recipe.model, tmp)
        template.save(tmp)
        shutil.rmtree(run / ADAPTER_DIR, ignore_errors=True)
        tmp.rename(run / ADAPTER_DIR)
    console.print(f"[green]done:[/] adapter saved to {run / ADAPTER_DIR}")
    return run
