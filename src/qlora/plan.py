"""Recipe + machine -> what the libraries receive: every device decision, made in one place.

`make_plan` resolves a recipe for this machine (auto settings made concrete, what the machine cannot run refused)
and derives the arguments transformers, bitsandbytes, peft, accelerate and TRL are called with. `check` and `train`
read its one result; model.py loads with the arguments made here. Nothing here loads a model or writes a file.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora import distributed
from qlora.errors import UserError, one_line
from qlora.fetch import cache_root
from qlora.rundir import CHECKPOINT_DIR

if TYPE_CHECKING:
    from qlora.config import LoraSection, ModelSection, QuantizationSection, Recipe


@functools.cache  # read by every dtype resolution; the CPU does not change
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 matmuls beat float32 ones."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:  # not Linux: assume emulated bf16, which is slower than float32
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def resolve_compute_dtype(name: str) -> str:
    """quantization.compute_dtype made concrete for this machine; a dtype the device cannot train in is refused."""
    import torch

    if torch.cuda.is_available():
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if name == "auto":
            return "bfloat16" if native_bf16 else "float16"
        if name == "bfloat16" and not native_bf16:
            major, minor = torch.cuda.get_device_capability()
            raise UserError(f"quantization.compute_dtype: bfloat16 needs a CUDA GPU of compute capability 8.0 or "
                            f"newer; {torch.cuda.get_device_name()} is {major}.{minor}: use auto (float16 there) "
                            "or float32")
        return name
    if name == "float16":
        raise UserError("quantization.compute_dtype: float16 mixed precision needs a CUDA GPU; on CPU use auto, "
                        "bfloat16 or float32")
    if name == "auto":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    return name


def trained_compute_dtype(q: QuantizationSection) -> str:
    """The compute dtype a run trained in: train records it resolved; auto (a recipe.yaml train did not write) is
    taken as this machine resolves it."""
    return resolve_compute_dtype("auto") if q.compute_dtype == "auto" else q.compute_dtype


def inference_recipe(recipe: Recipe) -> Recipe:
    """A run's recipe as generate, merge, export and eval compute it on this machine.

    compute_dtype stays the one the run trained in where this device computes in it; else float32, which holds
    every bfloat16 and float16 value exactly, with one console line saying so. Training refuses instead
    (resolve_compute_dtype): it cannot train there, but a run trained elsewhere must still load here.
    """
    import torch

    q, trained = recipe.quantization, trained_compute_dtype(recipe.quantization)
    try:
        dtype = resolve_compute_dtype(trained)
    except UserError:
        from rich.console import Console

        device = f"GPU ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "CPU"
        Console(stderr=True).print(f"the run trained in {trained}; this {device} computes in float32 instead")
        dtype = "float32"
    return recipe.model_copy(update={"quantization": q.model_copy(update={"compute_dtype": dtype})})


def resolve_optimizer(name: str) -> str:
    """train.optimizer, with auto made concrete for this machine."""
    import torch

    if name != "auto":
        return name
    return "paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch"


def resolve_attention(model: ModelSection, compute_dtype: str) -> str:
    """model.attn_implementation, checked against what is installed and what the model class supports.

    sdpa on a class without it (Gemma-2: sdpa cannot soft-cap logits) falls back to eager, as transformers
    itself does when no kernel is named; flash_attention_2 needs CUDA GPUs of compute capability 8.0 or newer
    (flash-attn 2 has no kernels for Turing/Volta), computing in bfloat16 or float16, and the flash-attn package.
    """
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if model.attn_implementation == "flash_attention_2":
        if not torch.cuda.is_available():
            raise UserError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa")
        older = [(i, torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())
                 if torch.cuda.get_device_capability(i) < (8, 0)]
        if older:
            index, (major, minor) = older[0]
            raise UserError(f"model.attn_implementation: flash_attention_2 needs compute capability 8.0 or newer "
                            f"(Ampere); cuda:{index} ({torch.cuda.get_device_name(index)}) has {major}.{minor}: use "
                            "sdpa")
        if compute_dtype not in ("bfloat16", "float16"):
            raise UserError(f"model.attn_implementation: flash_attention_2 computes in bfloat16 or float16, not "
                            f"quantization.compute_dtype={compute_dtype}; set one of those or use sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError("model.attn_implementation: flash_attention_2, but the flash-attn package is not "
                            "installed: pip install flash-attn --no-build-isolation, or use sdpa")
        return model.attn_implementation
    if model.attn_implementation != "sdpa" or model.trust_remote_code:
        return model.attn_implementation
    try:
        config = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, KeyError, ValueError):  # unreadable or unknown: from_pretrained reports it in its own words
        return model.attn_implementation
    return "sdpa" if model_class._supports_sdpa else "eager"


TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                   "trackio": ("trackio",)}


def check_trackers(report_to: list[str]) -> None:
    """train.report_to: each tracker's package must be installed (transformers fails at the first log otherwise)."""
    for tracker in report_to:
        if not any(importlib.util.find_spec(module) for module in TRACKER_MODULES[tracker]):
            raise UserError(f"train.report_to: {tracker} is not installed: pip install {TRACKER_MODULES[tracker][0]}, "
                            "or remove it (metrics.jsonl is always written)")


def absolute_data_paths(data):
    """data.path and data.eval_path as absolute paths where local, so a resume works from any directory."""
    from qlora.data import is_local_path

    update = {key: str(Path(value).expanduser().resolve()) for key in ("path", "eval_path")
              if (value := getattr(data, key)) and is_local_path(value)}
    return data.model_copy(update=update)


def check_devices() -> None:
    """Several visible GPUs need one process each (the trainer would fall back to DataParallel, which 4-bit
    models do not support)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count > 1 and distributed.world_size() == 1:
        raise UserError(f"{count} CUDA devices are visible: train on all of them with `qlora train RECIPE "
                        f"--nproc-per-node {count}`, or on one with CUDA_VISIBLE_DEVICES=0")


def device_description() -> str:
    """The device training runs on, e.g. `cuda:0 (NVIDIA A100-SXM4-40GB, capability 8.0)` or `cpu (native bf16)`."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()}, capability {major}.{minor})"
    return f"cpu ({'native' if cpu_has_native_bf16() else 'emulated'} bf16)"


def device_memory() -> tuple[int, str]:
    """Bytes of memory of the device this process computes on, and its name: the GPU's, else the machine's RAM."""
    import os

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, \
            f"cuda:{torch.cuda.current_device()}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def resolve_recipe(recipe: Recipe) -> Recipe:
    """The recipe as this machine will run it: auto settings made concrete; local model and data paths and the
    output directory made absolute, so `qlora train RUN/recipe.yaml` resumes the run from any directory.

    `train` records the result in the run's recipe.yaml, so a resume on a machine that would choose
    differently is refused naming the key, and generate and merge use the dtype the adapter was trained in.
    Raises UserError where the machine cannot run the recipe (shared by `check` and `train`).
    """
    check_devices()
    check_trackers(recipe.train.report_to)
    model, q, t = recipe.model, recipe.quantization, recipe.train
    model_path = Path(model.name_or_path).expanduser()
    if model_path.exists() or model.name_or_path.startswith((".", "/", "~")):  # local, not a hub id
        if not (model_path / "config.json").is_file():
            problem = "does not exist" if not model_path.exists() else "is not a model directory (no config.json)"
            raise UserError(f"model.name_or_path: {model.name_or_path} {problem}; give a directory saved with "
                            "save_pretrained, or a hub id like google/gemma-2b")
        model = model.model_copy(update={"name_or_path": str(model_path.resolve())})
    quantization = q.model_copy(update={"compute_dtype": resolve_compute_dtype(q.compute_dtype)})
    model = model.model_copy(update={"attn_implementation": resolve_attention(model, quantization.compute_dtype)})
    if t.distributed == "fsdp":
        check_fsdp(quantization, t.optimizer)
    optimizer = "adamw_torch" if t.distributed == "fsdp" and t.optimizer == "auto" else resolve_optimizer(t.optimizer)
    train = t.model_copy(update={"optimizer": optimizer,
                                 "output_dir": str(Path(t.output_dir).expanduser().resolve())})
    return recipe.model_copy(update={"model": model, "quantization": quantization, "train": train,
                                     "data": absolute_data_paths(recipe.data)})


def check_fsdp(q: QuantizationSection, optimizer: str) -> None:
    """FSDP-QLoRA as peft documents it: GPUs, the 4-bit weights stored in the compute dtype, and not the 8-bit
    optimizers (their state fails to save under FSDP, peft's caveats say)."""
    import torch

    # accelerate 1.16 makes its FSDP plugin for accelerator devices only (AcceleratorState): on CPU ranks the
    # trainer would silently run DDP
    if not torch.cuda.is_available():
        raise UserError("train.distributed: fsdp shards the model across CUDA GPUs and this machine has none; "
                        "use ddp (the default), which also runs on CPU")
    if q.load_in_8bit:
        raise UserError("quantization.load_in_8bit with train.distributed: fsdp: FSDP shards 4-bit weights only "
                        "(peft's FSDP guide); use load_in_4bit or ddp")
    if q.load_in_4bit and q.quant_storage != q.compute_dtype:
        raise UserError(f"quantization.quant_storage: {q.quant_storage} with train.distributed: fsdp must be the "
                        f"compute dtype, {q.compute_dtype}")
    if optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        raise UserError(f"train.optimizer: {optimizer} fails to save its state under FSDP; use adamw_torch or "
                        "paged_adamw_32bit (auto chooses adamw_torch with fsdp)")


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def compute_torch_dtype(q: QuantizationSection):
    """The torch dtype of the recipe's compute_dtype on this machine (auto resolved)."""
    return torch_dtype(resolve_compute_dtype(q.compute_dtype))


def get_quantization_config(q: QuantizationSection):
    """The BitsAndBytesConfig for the recipe, or None when the base is loaded in full precision."""
    from transformers import BitsAndBytesConfig

    if q.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_torch_dtype(q),
        bnb_4bit_quant_storage=torch_dtype(q.quant_storage),
    )


def get_lora_config(lora: LoraSection, trainable_token_indices: dict[str, list[int]] | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=list(lora.modules_to_save) or None,
        trainable_token_indices=trainable_token_indices,
        task_type="CAUSAL_LM",
    )


def device_map():
    """Where the base goes: this rank's CUDA device (device 0 in a single process) when there is one, else the
    CPU."""
    import torch

    return {"": distributed.local_rank()} if torch.cuda.is_available() else {"": "cpu"}


def spread_device_map():
    """Where a full-precision model goes for merge and generate: accelerate's "auto", filling the visible GPUs in
    turn, then CPU memory, so a model larger than one GPU still loads; the CPU without CUDA."""
    import torch

    return "auto" if torch.cuda.is_available() else {"": "cpu"}


def sharded(recipe: Recipe) -> bool:
    """Whether training shards the model with FSDP (train.distributed: fsdp, under several processes)."""
    return recipe.train.distributed == "fsdp" and distributed.world_size() > 1


FSDP_CONFIG = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
               "cpu_ram_efficient_loading": True, "state_dict_type": "FULL_STATE_DICT"}


def fsdp_arguments(recipe: Recipe) -> dict:
    """SFTConfig's FSDP fields under train.distributed: fsdp with several processes: FSDP2 (`fully_shard`, the
    version transformers 5 defaults to, FSDP1 being deprecated) with only the keys FSDP2 reads: each decoder layer
    its own unit, resharded after forward, and the adapter saved whole, as peft's FSDP guide saves it.

    cpu_ram_efficient_loading makes accelerate broadcast a full-precision base from rank 0 to the others (put on
    meta); accelerate 1.16 skips that for a 4-bit base (fsdp2_prepare_model), so each rank loads the 4-bit base
    whole and keeps its shard. `load_quantized_base` sets it in the environment before the load, as accelerate's
    launcher would. Activation checkpointing stays the trainer's (transformers warns that FSDP's own saves an
    all-gather): accelerate's wraps each layer with preserve_rng_state=False, so LoRA dropout would draw other masks
    when backward recomputes the layer."""
    return {"fsdp": True, "fsdp_config": dict(FSDP_CONFIG)} if sharded(recipe) else {}


def inference_dtype():
    """dtype to load a full-precision model for inference: as saved on CUDA; float32 on CPU (fast and exact)."""
    import torch

    return "auto" if torch.cuda.is_available() else torch.float32


def use_liger(setting: str) -> bool:
    """Whether to patch the model with Liger kernels (train.liger)."""
    import torch

    installed = importlib.util.find_spec("liger_kernel") is not None
    if setting == "on" and not installed:
        raise UserError("train.liger: on, but liger-kernel is not installed: pip install 'qlora[liger]'")
    return setting == "on" or (setting == "auto" and installed and torch.cuda.is_available())


def sft_arguments(recipe: Recipe) -> dict:
    """SFTConfig's fields from the resolved recipe (warmup_ratio becomes warmup_steps, a ratio when < 1)."""
    import torch

    t, compute = recipe.train, recipe.quantization.compute_dtype
    return dict(
        output_dir=str(Path(t.output_dir) / CHECKPOINT_DIR),
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type="cosine_with_min_lr" if t.min_lr_ratio else t.lr_scheduler,
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio} if t.min_lr_ratio else {},
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        neftune_noise_alpha=t.neftune_noise_alpha,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        eval_strategy="steps" if recipe.data.eval_fraction or recipe.data.eval_path else "no",
        eval_steps=t.eval_steps or t.save_steps,
        save_total_limit=t.save_total_limit,
        # train.keep_best: the trainer tracks the best eval in its state; qlora keeps and publishes that checkpoint
        # (checkpoint.QLoRATrainer, write_adapter), so the trainer loads nothing at the end
        metric_for_best_model="eval_loss" if t.keep_best == "eval_loss" else None,
        greater_is_better=False if t.keep_best == "eval_loss" else None,
        load_best_model_at_end=False,
        report_to=list(t.report_to) or "none",
        bf16=compute == "bfloat16",
        fp16=compute == "float16",
        use_cpu=not torch.cuda.is_available(),  # the trainer's CPU mode: bf16 autocast on CPU
        include_num_input_tokens_seen="non_padding",
        dataset_kwargs={"skip_prepare_dataset": True},  # rows arrive tokenized and masked by data.py
        max_length=None,  # data.py already applied data.max_length and data.too_long
        # flash-attention's varlen kernel knows document boundaries: TRL's one-row padding-free batches suit it;
        # elsewhere qlora's PackedCollator packs the micro-batches into rows (Plan.packed)
        padding_free=t.padding_free and recipe.model.attn_implementation == "flash_attention_2",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        use_liger_kernel=use_liger(t.liger),
        # page-locked batches copy to a GPU asynchronously; on a CPU there is no copy (and torch warns it has no
        # accelerator to pin for)
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,  # make_console_callback draws the progress
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient at every step
        **fsdp_arguments(recipe),
    )


# SFTConfig fields that would break how a run saves or resumes: adapter/ is published from the checkpoint the trainer
# writes at the last step, and a resume continues from the newest checkpoint exactly where the run stopped
BREAKS_SAVING = {
    "save_strategy": "qlora writes a checkpoint every train.save_steps steps and at the last step, which adapter/ is "
                     "published from and a resume continues from; set train.save_steps",
    "save_only_model": "a checkpoint without the optimizer, scheduler and RNG states cannot be resumed exactly",
    "ignore_data_skip": "a resumed run would train again on the batches it already trained on",
    "resume_from_checkpoint": "qlora resumes from the newest complete checkpoint in train.output_dir by itself",
    "save_on_each_node": "the run directory, which every machine must see, is written by one process only",
}


def check_extra(recipe: Recipe) -> None:
    """train.extra may name only SFTConfig fields that no recipe key sets, each with a value of the field's type
    that SFTConfig's own checks accept."""
    import dataclasses
    import difflib
    import typing

    from pydantic import TypeAdapter, ValidationError
    from trl import SFTConfig

    fields = sorted(f.name for f in dataclasses.fields(SFTConfig))
    types = typing.get_type_hints(SFTConfig)
    owned = set(sft_arguments(recipe)) | {"fsdp", "fsdp_config"}
    for key, value in recipe.train.extra.items():
        if key in BREAKS_SAVING:
            raise UserError(f"train.extra.{key}: remove it: {BREAKS_SAVING[key]}")
        if key in owned:
            instead = ("train.keep_best" if key in ("metric_for_best_model", "greater_is_better",
                                                    "load_best_model_at_end") else "the recipe's own key")
            raise UserError(f"train.extra.{key}: qlora sets {key} from the recipe; use {instead} (docs/reference.md)")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]}?" if close else "see transformers' TrainingArguments and TRL's SFTConfig"
            raise UserError(f"train.extra.{key} is not an SFTConfig field; {hint}")
        # typed first: SFTConfig itself takes any value, and some wrongly (a number for a path is opened as a file
        # descriptor)
        try:
            TypeAdapter(types[key]).validate_python(value, strict=True)
        except ValidationError:
            raise UserError(f"train.extra.{key}: {value!r} is not of SFTConfig's type for it, "
                            f"{getattr(types[key], '__name__', types[key])}") from None
    if recipe.train.extra:
        try:
            SFTConfig(**sft_arguments(recipe), **recipe.train.extra)
        except (TypeError, ValueError) as exc:
            raise UserError(f"train.extra: SFTConfig refuses {recipe.train.extra}: {one_line(exc)}") from None


# auto: the first step of each mode is not timed (eager: allocator warm-up; compiled: the compile itself)
EAGER_STEPS = 3
COMPILED_STEPS = 3
# auto compiles only when the eager rest of the run, cut by EXPECTED_GAIN, would repay COMPILE_SECONDS: at batch 1 the
# compiling step took 10-22 s more than an eager one with inductor's cache (SmolLM2-360M, Qwen2.5-0.5B), up to 40 s
# without, and compiled steps ran 1.02-1.12x eager's tokens/s (docs/performance.md, train.compile)
COMPILE_SECONDS = 60
EXPECTED_GAIN = 0.1

def inductor_cache() -> str:
    """Where inductor keeps its compiled code between runs: TORCHINDUCTOR_CACHE_DIR when the user set it, else
    qlora's cache (~/.cache/qlora/inductor) rather than torch's default under /tmp, which a reboot empties."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its default into the variable once anything asked for the cache (bitsandbytes' import does)
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return chosen if chosen not in (None, default_cache_dir()) else str(cache_root() / "inductor")


def compile_problem(recipe) -> str | None:
    """Why compile cannot run for this recipe here, or None."""
    import torch

    if sharded(recipe):
        return "FSDP wraps the layers after they would be compiled"
    if not torch.cuda.is_available() and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++")):
        return "inductor needs a C++ compiler on CPU: apt-get install g++"
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is None:
        return "inductor needs triton on CUDA: pip install triton"
    return None


def compile_plan(recipe) -> str:
    """What train.compile will do, as `qlora check` says it; UserError when it is on and cannot run here."""
    setting, problem = recipe.train.compile, compile_problem(recipe)
    if setting == "on" and problem:
        raise UserError(f"train.compile: on, but {problem}; or set it to auto or off")
    if setting == "off":
        return "eager"
    if problem:
        return f"eager ({problem})"
    cache = inductor_cache()
    if setting == "on":
        return f"compiled at the first step (inductor's cache: {cache})"
    return (f"auto: {EAGER_STEPS} optimizer steps eager; if the rest of the run would take over "
            f"{COMPILE_SECONDS / EXPECTED_GAIN:.0f} s eager, {COMPILED_STEPS} compiled (inductor's cache: {cache}), and "
            "the faster per token is kept")


def base_arguments(recipe: Recipe) -> dict:
    """AutoModelForCausalLM.from_pretrained's arguments for the base a run trains on: 4-bit NF4 (double-quantized)
    or 8-bit where the recipe says so, in the compute dtype, on this rank's device."""
    model, q = recipe.model, recipe.quantization
    return dict(
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        quantization_config=get_quantization_config(q),
        # FSDP flattens every weight of a unit into one tensor: all in the storage dtype (peft's FSDP-QLoRA guide)
        dtype=torch_dtype(q.quant_storage) if sharded(recipe) else compute_torch_dtype(q),
        attn_implementation=model.attn_implementation,
        # sharding: no device_map, as the FSDP-QLoRA guides load (bitsandbytes then puts the base on this rank's
        # device, accelerate on rank 0's for a full-precision one)
        **({} if sharded(recipe) else {"device_map": device_map()}),
    )


def full_precision_arguments(recipe: Recipe, dtype) -> dict:
    """from_pretrained's arguments for the unquantized base that merge and generate load, in `dtype` (a torch dtype or
    "auto")."""
    model = recipe.model
    return dict(revision=model.revision, dtype=dtype, trust_remote_code=model.trust_remote_code,
                device_map=spread_device_map())


@dataclass(frozen=True)
class Plan:
    """A recipe as this machine runs it, and what the libraries receive for it."""

    recipe: Recipe  # auto settings concrete, local paths absolute (resolve_recipe)
    device: str  # the device line, e.g. `cuda:0 (NVIDIA A100-SXM4-40GB, capability 8.0)`
    sharded: bool  # FSDP across this launch's processes
    sft_arguments: dict  # SFTConfig's fields, train.extra included
    packed: bool  # qlora's PackedCollator packs the micro-batches (else TRL pads or flash-attention's one row)
    compile: str  # what train.compile does here (compile_plan), as `check` prints it


def make_plan(recipe: Recipe) -> Plan:
    """Resolve `recipe` for this machine and derive the library arguments; UserError where it cannot run here."""
    recipe = resolve_recipe(recipe)
    check_extra(recipe)
    return Plan(recipe=recipe, device=device_description(), sharded=sharded(recipe),
                sft_arguments=sft_arguments(recipe) | recipe.train.extra,
                packed=recipe.train.padding_free and recipe.model.attn_implementation != "flash_attention_2",
                compile=compile_plan(recipe))
