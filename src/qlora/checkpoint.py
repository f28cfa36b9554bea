"""Checkpoints a run can trust: safetensors + JSON only, written atomically, resumed exactly.

HF Trainer pickles its checkpoint state (optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin),
writes checkpoint-N in place and trains on through a NaN. `QLoRATrainer` writes each checkpoint into a
temporary sibling that is renamed only when complete, keeps tensors in safetensors and the rest in JSON,
loads them back without pickle, and stops at the first non-finite loss or gradient norm. `StopAtSignal`
turns SIGINT / SIGTERM into: finish the step, write a checkpoint, stop.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from qlora.errors import RunFailed

OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
RNG_TENSORS, RNG_JSON = "rng_state.safetensors", "rng_state.json"
SCHEDULER_JSON, SCALER_JSON, TRAINER_STATE_JSON = "scheduler.json", "scaler.json", "trainer_state.json"
# present in every complete checkpoint (scaler.json only with fp16)
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", OPTIMIZER_TENSORS, OPTIMIZER_JSON,
                    SCHEDULER_JSON, RNG_TENSORS, RNG_JSON, TRAINER_STATE_JSON)
CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(path.name).group(1))


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoint-N directories in `directory`, oldest step first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if CHECKPOINT_NAME.fullmatch(p.name) and all((p / name).is_file() for name in CHECKPOINT_FILES)]
    return sorted(found, key=checkpoint_step)


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def fsync(path: Path) -> None:
    """Flush a file or directory to disk, so a rename never publishes data still in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (tensors for safetensors, the rest for JSON).

    0-d tensors (Adam's step count) go to JSON as numbers with their dtype, so they load back exactly.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            elif isinstance(value, torch.Tensor):
                scalars.setdefault(str(index), {})[key] = {"value": value.item(),
                                                           "dtype": str(value.dtype).removeprefix("torch.")}
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of split_optimizer_state."""
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in rest["state"].items():
        for key, value in values.items():
            if isinstance(value, dict) and set(value) == {"value", "dtype"}:
                value = torch.tensor(value["value"], dtype=getattr(torch, value["dtype"]))
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Python, numpy, torch CPU (and CUDA) RNG states as (tensors for safetensors, the rest for JSON)."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {
        "python": torch.tensor(internal, dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.random.get_rng_state()
    rest = {"python": [version, gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(cached_gaussian)]}
    return tensors, rest


def set_rng_state(tensors: dict[str, torch.Tensor], rest: dict) -> None:
    version, gauss_next = rest["python"]
    random.setstate((version, tuple(tensors["python"].tolist()), gauss_next))
    kind, pos, has_gauss, cached_gaussian = rest["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.random.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.random.set_rng_state(tensors["cuda"])


class QLoRATrainer(SFTTrainer):
    """SFTTrainer with atomic, pickle-free checkpoints and a stop at the first non-finite loss or gradient."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SFTTrainer casts a quantized model's adapter to bf16, while resuming loads it as float32, so the two
        # runs would diverge; float32 adapters (bf16 stays for compute) train identically fresh and resumed
        for param in self.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.float32)

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N into `.checkpoint-N.tmp`, rename it when complete, then apply save_total_limit."""
        parent = Path(self.args.output_dir)
        final = parent / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        tmp = parent / f".{final.name}.tmp"
        non_finite = [n for n, p in self.model.named_parameters() if p.requires_grad and not p.isfinite().all()]
        if non_finite:
            self.stop_non_finite(self.state.global_step, f"weight {non_finite[0]} is not finite, so it was not saved")
        self.store_flos()
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self._save_optimizer_and_scheduler(tmp)
            self._save_scaler(tmp)
            self._save_rng_state(tmp)
            self.state.save_to_json(str(tmp / TRAINER_STATE_JSON))
            for path in tmp.iterdir():
                fsync(path)
            fsync(tmp)
            tmp.rename(final)
            fsync(parent)
        except BaseException:  # a full disk, an error, a second signal: nothing half-written is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.args.save_total_limit:  # the newest (just written) is last, so it is never removed
            for old in complete_checkpoints(parent)[: -self.args.save_total_limit]:
                shutil.rmtree(old)

    def _save_optimizer_and_scheduler(self, output_dir):
        tensors, rest = split_optimizer_state(self.optimizer.state_dict())
        save_file(tensors, Path(output_dir) / OPTIMIZER_TENSORS)
        write_json(Path(output_dir) / OPTIMIZER_JSON, rest)
        write_json(Path(output_dir) / SCHEDULER_JSON, self.lr_scheduler.state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        checkpoint = Path(checkpoint)
        tensors = load_file(checkpoint / OPTIMIZER_TENSORS)
        self.optimizer.load_state_dict(join_optimizer_state(tensors, read_json(checkpoint / OPTIMIZER_JSON)))
        self.lr_scheduler.load_state_dict(read_json(checkpoint / SCHEDULER_JSON))

    def _save_scaler(self, output_dir):
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            write_json(Path(output_dir) / SCALER_JSON, scaler.state_dict())

    def _load_scaler(self, checkpoint):
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and (Path(checkpoint) / SCALER_JSON).is_file():
            scaler.load_state_dict(read_json(Path(checkpoint) / SCALER_JSON))

    def _save_rng_state(self, output_dir):
        tensors, rest = rng_state()
        save_file(tensors, Path(output_dir) / RNG_TENSORS)
        write_json(Path(output_dir) / RNG_JSON, rest)

    def _load_rng_state(self, checkpoint):
        if checkpoint is not None:
            set_rng_state(load_file(Path(checkpoint) / RNG_TENSORS), read_json(Path(checkpoint) / RNG_JSON))

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if not torch.isfinite(loss):  # checked after backward, before the optimizer step
            self.stop_non_finite(self.state.global_step + 1,
                                 f"the loss is {loss.item()}, so the weights were not updated")
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # called after clipping and before the optimizer step, so a non-finite norm never reaches the weights
        norm = super()._get_grad_norm(model, grad_norm)
        if norm is not None and not math.isfinite(float(norm)):
            self.stop_non_finite(self.state.global_step + 1,
                                 f"the gradient norm is {float(norm)}, so the weights were not updated")
        return norm

    def stop_non_finite(self, step: int, what: str):
        checkpoints = complete_checkpoints(Path(self.args.output_dir))
        last = f"last good checkpoint: {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
        raise RunFailed(f"step {step}: {what}; {last}")


class StopAtSignal(TrainerCallback):
    """Ends the training loop with a checkpoint after the step during which a SignalStop got its signal."""

    def __init__(self, stop):
        self.stop = stop

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.in_loop = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.signum is not None:
            control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.stop.in_loop = False
