"""Checkpoints a run can trust: safetensors + JSON only, written atomically, resumed exactly.

HF Trainer pickles its checkpoint state (optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin),
writes checkpoint-N in place and trains on through a NaN. `QLoRATrainer` writes each checkpoint into a
temporary sibling that is renamed only when complete, keeps tensors in safetensors and the rest in JSON,
loads them back without pickle, and stops at the first non-finite loss or gradient norm. `StopAtSignal`
turns SIGINT / SIGTERM into: finish the step, write a checkpoint, stop.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from importlib.metadata import version
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from qlora import distributed
from qlora.compat import pinned_range, require_hooks
from qlora.errors import RunFailed
from qlora.files import publish_dir, tmp_sibling
from qlora.loss import Objective, add_trained_token_loss
from qlora.rundir import (OPTIMIZER_JSON, OPTIMIZER_TENSORS, RNG_JSON, RNG_TENSORS, SCALER_JSON, SCHEDULER_JSON,
                          TRAINER_STATE_JSON, checkpoint_step, complete_checkpoints)

MAX_OVERFLOWS = 20  # fp16 loss-scale overflows in a row that mean a diverged run (2^16 / 2^20 < 1)


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# a JSON object with one of these keys stands for what JSON has no word for (see save_state)
TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"


def save_state(state, tensors_file: Path, json_file: Path) -> None:
    """Write nested dicts / lists / tuples of tensors and JSON scalars pickle-free, so load_state returns an equal copy.

    Tensors go to `tensors_file` (safetensors: dtype and shape exact, 0-d too) under their path in `state`
    ("state.0.exp_avg"); a tensor met again (bitsandbytes shares one quantization map among parameters) is
    stored once. The rest goes to `json_file`; tuples and dicts with non-string keys (an optimizer's
    parameter indices) are tagged, so they come back as tuples and int keys.
    """
    tensors: dict[str, torch.Tensor] = {}
    paths: dict[int, str] = {}  # id(tensor) -> where it is stored

    def encode(value, path: str):
        if isinstance(value, torch.Tensor):
            if id(value) not in paths:
                path = path.removeprefix(".")
                if path in tensors:  # keys holding dots could make two paths equal
                    raise ValueError(f"two tensors at checkpoint path {path!r}")
                paths[id(value)], tensors[path] = path, value.detach().contiguous()
            return {TENSOR: paths[id(value)]}
        if isinstance(value, (list, tuple)):
            items = [encode(item, f"{path}.{i}") for i, item in enumerate(value)]
            return items if isinstance(value, list) else {TUPLE: items}
        if isinstance(value, dict):
            items = {key: encode(item, f"{path}.{key}") for key, item in value.items()}
            if all(isinstance(key, str) and key not in (TENSOR, TUPLE, ITEMS) for key in items):
                return items
            return {ITEMS: [[encode(key, path), item] for key, item in items.items()]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint {type(value).__name__} at {path!r}")

    rest = encode(state, "")
    save_file(tensors, tensors_file)
    write_json(json_file, rest)


def load_state(tensors_file: Path, json_file: Path):
    """What save_state wrote, read back without pickle."""
    tensors = load_file(tensors_file)

    def decode(obj: dict):  # json calls this innermost object first
        if obj.keys() == {TENSOR}:
            return tensors[obj[TENSOR]]
        if obj.keys() == {TUPLE}:
            return tuple(obj[TUPLE])
        if obj.keys() == {ITEMS}:
            return {key: item for key, item in obj[ITEMS]}
        return obj

    return json.loads(json_file.read_text(encoding="utf-8"), object_hook=decode)


def rng_files(checkpoint: Path, rank: int) -> tuple[Path, Path]:
    """Where a rank's RNG state goes in a checkpoint: rank 0's (and a single process's) under the plain names."""
    suffix = f"_{rank}" if rank else ""
    return (checkpoint / RNG_TENSORS.replace(".", f"{suffix}.", 1), checkpoint / RNG_JSON.replace(".", f"{suffix}.", 1))


def rng_state() -> dict:
    """Python, numpy, torch CPU (and CUDA) RNG states, for save_state."""
    kind, keys, *numpy_rest = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), *numpy_rest),
             "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *numpy_rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *numpy_rest))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.random.set_rng_state(state["cuda"])


def four_bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@contextmanager
def inference_layout(model):
    """Generate with bitsandbytes' fast CPU kernel inside training: each 4-bit layer may repack its weight (a copy
    of its quantization state is repacked, as repacking rewrites it and its inverse is lossy: the scales go through
    bfloat16), and gets back afterwards exactly the weight and state it trains with. Where the CPU lacks
    AVX512-BF16, or on a GPU, nothing is repacked."""
    from bitsandbytes.functional import has_avx512bf16

    layers = four_bit_layers(model)
    kept = [(layer.weight.data, layer.weight.quant_state) for layer in layers]
    for layer in layers:
        layer.weight.quant_state = copy.copy(layer.weight.quant_state)
        layer.support_avx512bf16_for_cpu = has_avx512bf16()
    try:
        yield
    finally:
        for layer, (data, state) in zip(layers, kept):
            layer.weight.data, layer.weight.quant_state = data, state
            layer.support_avx512bf16_for_cpu = False


class QLoRATrainer(SFTTrainer):
    """SFTTrainer with atomic, pickle-free checkpoints and a stop at the first non-finite loss or gradient."""

    def __init__(self, *args, model, **kwargs):
        # SFTTrainer casts a quantized model's adapter to bf16, while resuming loads it as add_lora made it, so the
        # two runs would diverge (and under FSDP a float16 base would get a bf16 adapter): add_lora's dtypes stay
        dtypes = {name: param.dtype for name, param in model.named_parameters() if param.requires_grad}
        super().__init__(*args, model=model, **kwargs)
        for name, param in self.model.named_parameters():
            if name in dtypes:
                param.data = param.data.to(dtypes[name])
        self.overflows = 0  # fp16 loss-scale overflows in a row
        self.keep_4bit_layout()
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if hasattr(base, "router_aux_loss_coef"):  # SFTTrainer set the config's; the forward reads its own copy
            base.router_aux_loss_coef = self.router_aux_loss_coef

    def keep_4bit_layout(self):
        """bitsandbytes repacks a 4-bit weight in place for its AVX512-BF16 CPU kernel the first time its layer runs in
        eval mode without gradients (the trainer's eval loss), and that kernel has no backward: from then on no
        gradient would flow down through the layer (tiny twin, an eval loss at step 2: loss 0.85 at step 4 instead of
        0.32). While training, evals use the layout the backward needs (inference_layout lends the fast one)."""
        for layer in four_bit_layers(self.model):
            layer.support_avx512bf16_for_cpu = False

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N into `.checkpoint-N.tmp`, rename it when complete, then apply save_total_limit.

        With several ranks, rank 0 writes the adapter, optimizer, scheduler and trainer state, every rank its own
        RNG state, and rank 0 publishes the directory once all have written."""
        parent = Path(self.args.output_dir)
        final = parent / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        tmp = tmp_sibling(final)
        main = self.args.should_save
        adapter = self.gathered_adapter()
        weights = adapter or {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        non_finite = [name for name, weight in weights.items() if not weight.isfinite().all()]
        if non_finite:
            self.stop_non_finite(self.state.global_step, f"weight {non_finite[0]} is not finite, so it was not saved")
        self.store_flos()
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        try:
            self._save_optimizer_and_scheduler(tmp)  # every rank: a sharded optimizer state is gathered
            if main:
                # lora.trained_tokens' rows are saved as peft's trainable-token deltas; with a grown vocabulary peft
                # would also save both embedding matrices whole by default (gigabytes for a 150k vocabulary)
                self.model.save_pretrained(tmp, state_dict=adapter, safe_serialization=True,
                                           save_embedding_layers=False)
                self._save_scaler(tmp)
                self.state.save_to_json(str(tmp / TRAINER_STATE_JSON))
            self._save_rng_state(tmp)
            distributed.barrier()
            if main:
                publish_dir(tmp, final)
        except BaseException:  # a full disk, an error, a second signal: nothing half-written is left behind
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if main and self.args.save_total_limit:  # the newest (just written) is last, so it is never removed
            # train.keep_best: the best step is in the trainer's state. Not as state.best_model_checkpoint: with
            # save_total_limit 1 the trainer would delete every other checkpoint at the end, the last one too
            for old in complete_checkpoints(parent)[: -self.args.save_total_limit]:
                if checkpoint_step(old) != self.state.best_global_step:
                    shutil.rmtree(old)
        distributed.barrier()  # every rank sees the published checkpoint before training on

    def gathered_adapter(self) -> dict | None:
        """The trainable weights whole on every rank where the model shards them (ShardedQLoRATrainer); None where
        each rank holds them whole."""
        return None

    def optimizer_state(self) -> dict:
        """The optimizer state rank 0 writes; every rank calls it (ShardedQLoRATrainer gathers the shards)."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def _save_optimizer_and_scheduler(self, output_dir):
        state = self.optimizer_state()
        if self.args.should_save:
            save_state(state, Path(output_dir) / OPTIMIZER_TENSORS, Path(output_dir) / OPTIMIZER_JSON)
            write_json(Path(output_dir) / SCHEDULER_JSON, self.lr_scheduler.state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        checkpoint = Path(checkpoint)
        self.load_optimizer_state(load_state(checkpoint / OPTIMIZER_TENSORS, checkpoint / OPTIMIZER_JSON))
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
        save_state(rng_state(), *rng_files(Path(output_dir), self.args.process_index))

    def _load_rng_state(self, checkpoint):
        """This rank's RNG state; rank 0's when the checkpoint comes from fewer ranks."""
        if checkpoint is None:
            return
        files = rng_files(Path(checkpoint), self.args.process_index)
        set_rng_state(load_state(*(files if files[0].is_file() else rng_files(Path(checkpoint), 0))))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss SFTTrainer defines (loss_type, label_smoothing_factor, the router's auxiliary loss), computed by
        qlora.loss: scored only at trained positions where that is proven equal to the model's own loss, by the model's
        own forward with labels otherwise; TRL's wherever the caller wants the model's outputs."""
        if return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)  # from under DDP
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        add_trained_token_loss(base)
        objective = Objective(dft=self.args.loss_type == "dft", label_smoothing=self.args.label_smoothing_factor)
        total, count = model(**inputs, qlora_loss=objective)
        if num_items_in_batch is None:
            return total / count.clamp(min=1)
        # like the trainer's own loss: summed over the micro-batch, divided by the trained tokens of the whole
        # accumulated batch on every rank, times the ranks (DDP averages the ranks' gradients)
        scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return total / num_items_in_batch * scale

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
            if self.loss_scale_overflow():
                return norm
            self.stop_non_finite(self.state.global_step + 1,
                                 f"the gradient norm is {float(norm)}, so the weights were not updated")
        self.overflows = 0
        return norm

    def loss_scale_overflow(self) -> bool:
        """Whether a non-finite gradient is fp16 loss scaling at work rather than a diverged run.

        With fp16 the GradScaler skips the optimizer step on an overflow and halves its scale: that is
        normal. Only MAX_OVERFLOWS overflows in a row (the scale fallen from 2^16 below 1) mean the
        gradients themselves are not finite.
        """
        if getattr(self.accelerator, "scaler", None) is None:
            return False
        self.overflows += 1
        return self.overflows < MAX_OVERFLOWS

    def stop_non_finite(self, step: int, what: str):
        checkpoints = complete_checkpoints(Path(self.args.output_dir))
        last = f"last good checkpoint: {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
        raise RunFailed(f"step {step}: {what}; {last}")


require_hooks(SFTTrainer, QLoRATrainer, "transformers")


class ShardedQLoRATrainer(QLoRATrainer):
    """train.distributed: fsdp: the adapter and its optimizer state are sharded across the ranks. A checkpoint
    gathers them whole (an adapter is small) with torch's distributed state-dict API, so it is the same pickle-free
    checkpoint one process writes; a resume hands each rank its shard back. The loss is TRL's (peft's FSDP-QLoRA
    guide)."""

    compute_loss = SFTTrainer.compute_loss

    def gathered_adapter(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         ignore_frozen_params=True))

    def optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # keyed by parameter name, whole, on rank 0 (which writes it)
        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The checkpoint's adapter into the sharded model: peft names the gathered weights as it saved them, they
        take the saved values, and each rank keeps its shard of them."""
        from peft import get_peft_model_state_dict
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        weights = self.gathered_adapter()
        as_saved = get_peft_model_state_dict(self.model, state_dict=weights, save_embedding_layers=False)
        saved = load_file(Path(resume_from_checkpoint) / "adapter_model.safetensors")
        gathered = {tensor.data_ptr() for tensor in weights.values()}
        if saved.keys() != as_saved.keys() or any(t.data_ptr() not in gathered for t in as_saved.values()):
            raise RunFailed(f"{resume_from_checkpoint}: its adapter does not map onto the sharded model with peft "
                            f"{version('peft')} (tested: {pinned_range('peft')}); install that range")
        for name, tensor in as_saved.items():
            tensor.copy_(saved[name])
        set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


require_hooks(SFTTrainer, ShardedQLoRATrainer, "transformers")


class StopAtSignal(TrainerCallback):
    """Ends the training loop with a checkpoint after the step during which a SignalStop got its signal."""

    def __init__(self, stop):
        self.stop = stop

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.in_loop = True

    def on_step_end(self, args, state, control, **kwargs):
        # every rank stops after the same step, whichever ranks got the signal
        signum = distributed.largest(self.stop.received or 0, args.device)
        if signum:
            self.stop.signum = signum
            control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.stop.in_loop = False
