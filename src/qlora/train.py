"""train(recipe) -> run directory: 4-bit base + LoRA trained with TRL's SFTTrainer."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from qlora import distributed
from qlora.check import Preflight, memory_problem, preflight, worst_micro_batch
from qlora.collate import PackedCollator
from qlora.config import Recipe
from qlora.data import build_datasets
from qlora.errors import RunFailed, RunInterrupted, UserError
from qlora.evaluate import EVAL_SHARE, make_problems_callback
from qlora.files import publish_dir, tmp_sibling, write_json
from qlora.model import add_lora, load_quantized_base, save_tokenizer
from qlora.progress import console
from qlora.rundir import (ADAPTER_DIR, ADAPTER_FILES, BEST_FILE, CHECKPOINT_DIR, ENVIRONMENT_FILE, METRICS_FILE,
                          TENSORBOARD_DIR, RunPlan, apply_plan, best_checkpoint, checkpoint_step,
                          complete_checkpoints, early_stopped, evals_since_best, mark_complete, plan_run,
                          record_environment, record_recipe, run_lock)


@contextmanager
def write_failures(run: Path):
    """Turn a failed write under `run` (disk full, unwritable) into one RunFailed line."""
    from safetensors import SafetensorError  # how safetensors reports an I/O error

    try:
        yield
    except (OSError, SafetensorError) as exc:
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
    atomic, so that never leaves a half-written checkpoint looking complete. Under torchrun every rank gets
    the launcher's one signal, some after the ranks already agreed to stop on another's: that copy is not a
    second signal, or the rank would leave the others waiting for it in a collective.
    """

    def __init__(self):
        self.received: int | None = None  # the signal this process got
        self.signum: int | None = None  # the signal the run stops for (every rank's agreement)
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
        if self.received is not None or not (self.in_loop or self.signum is not None):
            console.print(f"{name}: exiting now")
            raise SystemExit(128 + signum)
        self.received = signum
        if self.signum is None:
            console.print(f"{name}: finishing this step and writing a checkpoint (send it again to exit at once)")


def make_metrics_callback(path: Path):
    """A TrainerCallback appending one JSON object per logging step to metrics.jsonl. Its tokens/s counts the time
    of training steps only: what runs between two steps (logging, eval, a checkpoint save) is left out, so a save
    is not a dip in the curve."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last_time, self.last_tokens = time.perf_counter(), state.num_input_tokens_seen
            # seconds spent between steps since the last record; what runs before the first step (the base's
            # eval_problems eval) counts as between too
            self.between, self.step_ended = 0.0, self.last_time

        def pause(self) -> None:
            if self.step_ended is not None:
                now = time.perf_counter()
                self.between += now - self.step_ended
                self.step_ended = now

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ended = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.pause()
            self.step_ended = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:  # every rank logs the same (reduced) figures
                return
            if logs and "eval_loss" in logs:
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "eval_loss": logs["eval_loss"]}) + "\n")
            if logs and "eval_pass@1" in logs:  # train.eval_problems (evaluate.make_problems_callback)
                record = {"step": state.global_step, **{k.removeprefix("eval_"): v for k, v in logs.items()
                                                        if k.startswith("eval_pass@")},
                          "passed": logs["eval_passed"], "samples": logs["eval_samples"],
                          "eval_seconds": logs["eval_seconds"]}
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            if not logs or "loss" not in logs:
                return
            self.pause()
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            stepping = now - self.last_time - self.between
            record = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_seen": tokens,
                "tokens_per_second": round((tokens - self.last_tokens) / max(stepping, 1e-9), 1),
                "time": round(time.time(), 3),  # wall clock, for the report's elapsed time
            }
            self.last_time, self.last_tokens, self.between = now, tokens, 0.0
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    return MetricsCallback()


def peak_memory() -> str:
    """The process's peak memory so far: allocated CUDA memory on a GPU, resident memory on CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return f"peak {torch.cuda.max_memory_allocated() / 1024**3:.1f} GiB"
    return f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.1f} GiB RSS"


def make_console_callback():
    """A TrainerCallback that shows training as one live line in a terminal (step/total, epoch, loss, learning
    rate, gradient norm, tokens/s, ETA, peak memory) and as one line per logging step elsewhere, in place of the
    trainer's tqdm bars and printed dicts."""
    from rich.progress import Progress, TextColumn, TimeRemainingColumn
    from transformers import TrainerCallback

    class ConsoleCallback(TrainerCallback):
        def __init__(self):
            self.progress, self.task, self.last, self.solved = None, None, {}, {}
            self.started = self.tokens = 0
            self.trained_since = None  # perf_counter() when the last eval_problems eval ended

        def figures(self, state) -> str:
            log = self.last
            parts = [f"step {state.global_step}/{state.max_steps}", f"ep {state.epoch or 0:.2f}"]
            if "loss" in log:
                parts += [f"loss {log['loss']:.4f}", f"lr {log.get('learning_rate') or 0:.2e}"]
                if log.get("grad_norm") is not None:
                    parts.append(f"gnorm {log['grad_norm']:.3f}")
            if self.solved:
                parts.append(f"pass@1 {self.solved['eval_pass@1']:.3f} (step {self.solved['step']})")
            seconds = time.perf_counter() - self.started
            if seconds > 0 and state.num_input_tokens_seen > self.tokens:
                parts.append(f"{(state.num_input_tokens_seen - self.tokens) / seconds:,.0f} tok/s")
            parts.append(peak_memory())
            return " · ".join(parts)

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.tokens = time.perf_counter(), state.num_input_tokens_seen
            if console.is_terminal and state.is_world_process_zero:
                self.progress = Progress(TextColumn("{task.description} · ETA"), TimeRemainingColumn(),
                                         console=console)
                self.task = self.progress.add_task(self.figures(state), total=state.max_steps,
                                                   completed=state.global_step)
                self.progress.start()

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step, description=self.figures(state))

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "eval_loss" in logs:
                console.print(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")
            if "eval_pass@1" in logs:
                self.solved = {**logs, "step": state.global_step}
                self.started += logs["eval_seconds"]  # tok/s is training's: the eval's time is left out
                console.print(self.eval_line(state, logs), highlight=False)
            if "loss" in logs:
                self.last = logs
                if self.progress is None:
                    console.print(self.figures(state), highlight=False)
            if "train_loss" in logs:  # the trainer's closing summary
                console.print(f"trained to step {state.global_step} in {logs['train_runtime']:.0f} s", highlight=False)

        def eval_line(self, state, logs) -> str:
            """pass@k of an eval_problems eval, its time, and its share of the time since the previous one."""
            scores = ", ".join(f"{k.removeprefix('eval_')} {v:.3f}" for k, v in logs.items()
                               if k.startswith("eval_pass@"))
            line = (f"step {state.global_step}{' (base)' if state.global_step == 0 else ''}: {scores} "
                    f"({logs['eval_passed']} of {logs['eval_samples']} answers passed) in {logs['eval_seconds']:.1f} s")
            now = time.perf_counter()
            if self.trained_since is not None:
                share = logs["eval_seconds"] / max(now - self.trained_since, 1e-9)
                line += f", {share:.0%} of the time since the previous eval"
                if share > EVAL_SHARE:
                    line += (f", more than {EVAL_SHARE:.0%}: raise train.eval_problems_every, or lower "
                             "train.eval_max_new_tokens or eval_samples")
            self.trained_since = now
            return line

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step, description=self.figures(state))
                self.progress.stop()
                self.progress = None

    return ConsoleCallback()


def make_early_stopping_callback(recipe: Recipe):
    """A TrainerCallback ending the run at a checkpoint once train.early_stopping_patience evals of the keep_best metric
    in a row have not beaten the best. It counts from the trainer's state (the evals in its log history after its best
    step), which every checkpoint carries, so a resumed run counts on where it stopped; transformers'
    EarlyStoppingCallback keeps its count in itself, restored only by recreating every callback."""
    from transformers import TrainerCallback

    t = recipe.train

    class EarlyStopping(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            # called after the step's eval and the trainer's (or make_problems_callback's) update of the best
            best = state.best_global_step
            if early_stopped(recipe, state.log_history, best) and not control.should_training_stop:
                console.print(f"early stopping at step {state.global_step}: {t.keep_best} has not beaten "
                              f"{state.best_metric:.4f} (step {best}) in the "
                              f"{evals_since_best(recipe, state.log_history, best)} eval(s) since "
                              f"(train.early_stopping_patience: {t.early_stopping_patience})", highlight=False)
                control.should_training_stop = True

    return EarlyStopping()














def train(recipe: Recipe, *, overwrite: bool = False, callbacks: list | None = None) -> Path:
    """Train the recipe's adapter and return the run directory; a run already there is resumed, or finished
    from its last checkpoint, or left as it is when complete.

    `callbacks` are extra transformers TrainerCallbacks (for scripts and tests). Raises UserError before
    writing anything when `qlora check` would exit 2, RunFailed on a non-finite loss or a failed write,
    RunInterrupted after SIGINT / SIGTERM (once a checkpoint is written).
    """
    stop = SignalStop()  # before _train's imports, which take seconds in which a signal would be lost
    with stop.installed():
        try:
            run = _train(recipe, overwrite, callbacks or [], stop)
        except (UserError, RunInterrupted) as exc:  # every rank raised it: they leave together
            exc.__traceback__ = None  # its frames hold the trainer, which must go before the group (distributed.finish)
            distributed.finish()
            raise
        distributed.finish()
        return run


def write_adapter(run: Path, checkpoint: Path, pre: Preflight) -> None:
    """Publish adapter/ from a checkpoint's adapter, with the tokenizer and template: atomic and fsynced."""
    tmp = tmp_sibling(run / ADAPTER_DIR)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ADAPTER_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, tmp / name)
    save_tokenizer(pre.tokenizer, pre.recipe.model, tmp)
    pre.template.save(tmp)
    publish_dir(tmp, run / ADAPTER_DIR)


def _train(recipe: Recipe, overwrite: bool, callbacks: list, stop: SignalStop) -> Path:
    import torch
    from transformers import PrinterCallback, Trainer, set_seed
    from transformers.integrations import TensorBoardCallback
    from trl import SFTConfig

    from qlora.checkpoint import QLoRATrainer, ShardedQLoRATrainer, StopAtSignal
    from qlora.compile import compile_callbacks
    from qlora.generate import LoadedModel

    distributed.start(cpu=not torch.cuda.is_available())
    # every check `qlora check` runs, on every rank (each must see the model and data); nothing is written before
    # they all pass
    pre = distributed.on_every_rank(lambda: preflight(recipe, overwrite))
    recipe, run = pre.recipe, Path(pre.recipe.train.output_dir)
    if pre.run_plan.action == "complete":
        console.print(f"{run} is complete at step {pre.run_plan.step}: nothing to do (raise train.max_steps or "
                      "train.epochs to train on, or pass --overwrite to start over)")
        return run
    dataset, eval_dataset, report = build_datasets(recipe, pre.rows, pre.eval_rows, pre.tokenizer, pre.template)
    if problem := memory_problem(recipe, worst_micro_batch(recipe, pre.shape, report, distributed.world_size())):
        raise UserError(problem)
    console.print(f"data: {report.summary()}")

    with write_failures(run), run_lock(run) if distributed.is_main() else nullcontext():
        run_plan = distributed.from_main(lambda: prepare_run(recipe, run, overwrite, pre))
        if run_plan.action == "finish":
            console.print(f"[green]done:[/] adapter saved to {run / ADAPTER_DIR}")
            return run
        if run_plan.action == "resume":
            distributed.on_every_rank(lambda: readable_checkpoint(run_plan.checkpoint))
        q, t = recipe.quantization, recipe.train
        unpaged = " (unpaged on CPU)" if t.optimizer.startswith("paged_") and not torch.cuda.is_available() else ""
        console.print(f"device {pre.plan.device}: compute {q.compute_dtype}, optimizer {t.optimizer}{unpaged}, "
                      f"attention {recipe.model.attn_implementation}")
        world = distributed.world_size()
        if world > 1:
            console.print(f"{world} processes ({'FSDP' if pre.plan.sharded else 'DDP'}): effective batch "
                          f"{t.batch_size} x {t.grad_accum} x {world} = "
                          f"{t.batch_size * t.grad_accum * world} examples per optimizer step")
        width = f"4-bit {q.quant_type}" if q.load_in_4bit else "8-bit" if q.load_in_8bit else "full precision"
        console.print(f"loading {recipe.model.name_or_path} ({width})")
        set_seed(t.seed)  # the adapter's initial weights too, so a run can be repeated exactly
        model = add_lora(load_quantized_base(recipe), recipe, pre.tokenizer)
        trainable, total = model.get_nb_trainable_parameters()
        console.print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")

        # the eval_problems eval before StopAtSignal, so that a signal during an eval stops the run at this step's
        # checkpoint; it logs with transformers' own Trainer.log, as TRL's would fold its pending training metrics
        # into the eval's record
        evals = [make_problems_callback(LoadedModel(model, pre.tokenizer, pre.template, recipe), pre.problems, recipe,
                                        lambda logs: Trainer.log(trainer, logs))] if pre.problems else []
        stopping = [make_early_stopping_callback(recipe)] if t.early_stopping_patience else []
        trainer = (ShardedQLoRATrainer if pre.plan.sharded else QLoRATrainer)(
            model=model,
            args=SFTConfig(**pre.plan.sft_arguments),
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            processing_class=pre.tokenizer,
            data_collator=(PackedCollator(pre.tokenizer.pad_token_id, recipe.data.max_length) if pre.plan.packed
                           else None),
            callbacks=[make_metrics_callback(run / METRICS_FILE), make_console_callback(), *evals, StopAtSignal(stop),
                       *stopping, *compile_callbacks(pre.plan, model, console.print), *callbacks],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the raw log dicts
        for callback in trainer.callback_handler.callbacks:
            # beside metrics.jsonl rather than among the checkpoints; TENSORBOARD_LOGGING_DIR still wins
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = str(run / TENSORBOARD_DIR)
        with out_of_memory_hint(recipe):
            trainer.train(resume_from_checkpoint=str(run_plan.checkpoint) if run_plan.action == "resume" else None)
        if stop.signum is not None:
            step = trainer.state.global_step  # StopAtSignal saved a checkpoint at this step
            raise RunInterrupted(f"{signal.Signals(stop.signum).name} after step {step}: "
                                 f"{run / CHECKPOINT_DIR / f'checkpoint-{step}'} is complete; run the same command "
                                 "to resume", stop.signum)
        distributed.from_main(lambda: finish_run(run, pre))
    console.print(f"[green]done:[/] adapter saved to {run / ADAPTER_DIR}")
    return run


def prepare_run(recipe: Recipe, run: Path, overwrite: bool, pre: Preflight) -> RunPlan:
    """Rank 0, holding the run lock: plan again, then write adapter/ of a run that only lacks it, or clear the way
    and write recipe.yaml and environment.json for a start or a resume."""
    run_plan = plan_run(recipe, pre.fingerprint, overwrite, pre.keep)  # again, now that no other train can move it
    if run_plan.action != pre.run_plan.action:
        raise UserError(f"train.output_dir: {run} changed while this command prepared (another qlora train?); "
                        "run the command again")
    if run_plan.action == "finish":
        console.print(f"{run_plan.checkpoint} is the end of the run but adapter/ was not written: writing it")
        finish_run(run, pre, run_plan.checkpoint)
        return run_plan
    apply_plan(run, run_plan, pre.fingerprint)
    console.print(f"resuming from {run_plan.checkpoint} (step {run_plan.step})" if run_plan.action == "resume"
                  else f"starting {run}")
    record_recipe(run, recipe)
    record_environment(run / ENVIRONMENT_FILE, run_plan.step, pre.plan.device)
    return run_plan


def readable_checkpoint(checkpoint: Path) -> None:
    """A rank that resumes must read the checkpoint rank 0 chose."""
    if checkpoint not in complete_checkpoints(checkpoint.parent):
        raise UserError(f"train.output_dir: {checkpoint} is not readable on this machine; a run on several "
                        "machines needs its output_dir on a filesystem every machine sees")


def finish_run(run: Path, pre: Preflight, final: Path | None = None) -> None:
    """Rank 0: publish adapter/ from the last checkpoint (the trainer saves one at the last step), or with
    train.keep_best from the best one (recorded in best.json), and mark the run complete."""
    final = final or complete_checkpoints(run / CHECKPOINT_DIR)[-1]
    chosen = final
    if pre.recipe.train.keep_best != "none":
        best = best_checkpoint(final)
        chosen = best["checkpoint"]
        write_json(run / BEST_FILE, {"metric": pre.recipe.train.keep_best, "step": best["step"],
                                     "score": best["score"], "last_step": checkpoint_step(final)})
        console.print(f"best {pre.recipe.train.keep_best}: " + (
            f"{best['score']:.4f} at step {best['step']}, published as adapter/" if best["score"] is not None
            else "no eval ran, so adapter/ is the last checkpoint"))
    write_adapter(run, chosen, pre)
    mark_complete(run, pre.recipe, checkpoint_step(final))
