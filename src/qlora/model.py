"""Recipe -> library objects: BitsAndBytesConfig, LoraConfig, tokenizer, 4-bit base, LoRA-wrapped model."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from qlora import distributed
from qlora.errors import UserError

# bitsandbytes, at import on CPUs with AVX512-BF16, fetches an optional kernel from the kernels hub and warns when
# it cannot (kernels absent, hub offline, untrusted); it falls back to its own kernel, so that is noise on every run,
# as is kernels' own warning that offline it skips that kernel's publisher check
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: "kernels-community/quantization-bitsandbytes" not in record.getMessage())
# peft still calls transformers' gradient_checkpointing_* names, renamed in transformers 5: noise on every run
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing.*` is deprecated", category=FutureWarning)

SENTENCEPIECE_FILE = "tokenizer.model"

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
    """FSDP-QLoRA as peft documents it: CUDA GPUs, the 4-bit weights stored in the compute dtype, and not the 8-bit
    optimizers (their state fails to save under FSDP, peft's caveats say)."""
    import torch

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


def warn_remote_code(model: ModelSection) -> None:
    if model.trust_remote_code:
        from rich.console import Console

        Console(stderr=True).print(
            f"[yellow]warning:[/] model.trust_remote_code is true: code from {model.name_or_path} will run here"
        )


def load_tokenizer(model: ModelSection, source: str | None = None):
    """The base model's tokenizer (or the one saved in `source`), padding on the right.

    A tokenizer without a pad token pads with EOS; labels never depend on the pad id, so the
    final EOS is still trained.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source or model.name_or_path,
            revision=None if source else model.revision,
            trust_remote_code=model.trust_remote_code,
        )
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from {source or model.name_or_path!r} "
                        f"(revision {model.revision}): {exc}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"model.name_or_path: the tokenizer of {model.name_or_path} has no EOS token; "
                        "training could never teach the model to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def add_trained_tokens(tokenizer, tokens: list[str]) -> None:
    """Make each of lora.trained_tokens one special token of `tokenizer`, matched verbatim anywhere in the text and
    never split, adding those it lacks (they take the ids after its last one)."""
    from transformers import AddedToken

    if tokens:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)


def fit_vocabulary(model, tokenizer) -> None:
    """Grow the embeddings (and an untied LM head) to hold every token of `tokenizer`, when lora.trained_tokens
    added some beyond them; the new rows start at the mean of the old ones and training replaces them."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def trainable_token_indices(model, lora: LoraSection, tokenizer) -> dict[str, list[int]] | None:
    """peft's trainable_token_indices for lora.trained_tokens: their rows of the input embedding and of the LM head
    (peft keeps one copy when the two are tied), except in a module lora.modules_to_save trains in full."""
    if not lora.trained_tokens:
        return None
    ids = tokenizer.convert_tokens_to_ids(lora.trained_tokens)
    indices = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        name = next((n for n, m in model.named_modules() if m is module), None)
        if name is not None and name.rsplit(".", 1)[-1] not in lora.modules_to_save:
            indices[name] = ids
    return indices or None


def load_adapter(model, adapter: Path, tokenizer):
    """`model` with a run's adapter, its embeddings first grown to the run's tokenizer (lora.trained_tokens)."""
    from peft import PeftModel

    fit_vocabulary(model, tokenizer)
    return PeftModel.from_pretrained(model, adapter)


def save_tokenizer(tokenizer, model: ModelSection, directory: Path) -> None:
    """Save the tokenizer into `directory`, with the base's SentencePiece `tokenizer.model` when it has one.

    transformers 5's save_pretrained does not write tokenizer.model, and llama.cpp's converter needs it
    (Gemma) or scores the pieces wrongly without it (Llama, Mistral).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    tokenizer.save_pretrained(directory)
    # transformers 5 computes added_tokens_decoder and then drops it from tokenizer_config.json (tokenization_utils_base
    # save_pretrained, "tokenizers backend don't need"); llama.cpp's converter reads it to keep special and
    # user-defined tokens of a SentencePiece vocabulary (Gemma's <start_of_turn>) whole instead of plain text
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {str(i): t.__getstate__() for i, t in tokenizer.added_tokens_decoder.items()}
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    source = Path(model.name_or_path) / SENTENCEPIECE_FILE
    if not Path(model.name_or_path).is_dir():
        try:
            source = Path(hf_hub_download(model.name_or_path, SENTENCEPIECE_FILE, revision=model.revision))
        except LocalEntryNotFoundError:  # offline and not cached: the repo may still have one
            from rich.console import Console

            Console(stderr=True).print(f"[yellow]warning:[/] {SENTENCEPIECE_FILE} of {model.name_or_path} is not in "
                                       "the local hub cache (offline): not copied; llama.cpp's converter may need it")
            return
        except EntryNotFoundError:  # byte-level BPE families ship none
            return
    if source.is_file():
        shutil.copyfile(source, Path(directory) / SENTENCEPIECE_FILE)


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


def load_quantized_base(recipe: Recipe):
    """The frozen base model, in 4-bit NF4 (double-quantized) when the recipe says so."""
    from transformers import AutoModelForCausalLM

    warn_remote_code(recipe.model)
    q = recipe.quantization
    try:
        model = AutoModelForCausalLM.from_pretrained(
            recipe.model.name_or_path,
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
            quantization_config=get_quantization_config(q),
            # FSDP flattens every weight of a unit into one tensor: all in the storage dtype (peft's FSDP-QLoRA guide)
            dtype=torch_dtype(q.quant_storage) if sharded(recipe) else compute_torch_dtype(q),
            attn_implementation=recipe.model.attn_implementation,
            device_map=device_map(),
        )
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot load {recipe.model.name_or_path!r} "
                        f"(revision {recipe.model.revision}): {exc}") from None
    model.config.use_cache = False  # the KV cache is useless in training and breaks gradient checkpointing
    return model


def inference_dtype():
    """dtype to load a full-precision model for inference: as saved on CUDA; float32 on CPU (fast and exact)."""
    import torch

    return "auto" if torch.cuda.is_available() else torch.float32


def load_full_precision_base(recipe: Recipe, dtype):
    """The recipe's base model, unquantized, in `dtype` (a torch dtype or "auto")."""
    from transformers import AutoModelForCausalLM

    warn_remote_code(recipe.model)
    try:
        return AutoModelForCausalLM.from_pretrained(
            recipe.model.name_or_path, revision=recipe.model.revision, dtype=dtype,
            trust_remote_code=recipe.model.trust_remote_code, device_map=spread_device_map(),
        )
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot load {recipe.model.name_or_path!r} "
                        f"(revision {recipe.model.revision}): {exc}") from None


def add_lora(model, recipe: Recipe, tokenizer):
    """Prepare the (quantized) base for training and wrap it with trainable LoRA adapters (and the rows of
    lora.trained_tokens, the embeddings grown to `tokenizer` first).

    Adapter weights are kept in float32 whatever the compute dtype (bf16 is for the matmuls only):
    a bf16 adapter is cast differently by a fresh run and a resumed one, so they would diverge.
    peft's k-bit preparation upcasts every frozen weight that is not 4-bit to float32. With bf16 compute the
    embedding and LM head go back to bf16, as the QLoRA reference code does (the norms stay float32): Gemma-2B's
    embedding takes 0.98 GiB instead of 1.95, steps run faster and the loss stays within the noise of dropout
    (README, "Embedding and LM head in bf16").
    """
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    fit_vocabulary(model, tokenizer)
    lora_config = get_lora_config(recipe.lora, trainable_token_indices(model, recipe.lora, tokenizer))
    if sharded(recipe):
        # FSDP needs one dtype per unit, so no float32 upcast (TRL skips it for sharded QLoRA too); the trainer
        # turns gradient checkpointing on
        model.enable_input_require_grads()
        return get_peft_model(model, lora_config)
    if recipe.quantization.quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        # bf16 has float32's range, so only precision is at stake, and the measured loss did not move; float16
        # (largest value 65504) keeps the float32 residual stream that an upcast embedding gives
        if compute_torch_dtype(recipe.quantization) == torch.bfloat16:
            for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
                if embedding is not None:  # a tied head shares the embedding's weight: cast once, tie kept
                    embedding.weight.data = embedding.weight.data.to(torch.bfloat16)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # hand back the float32 copies, as peft does after its own casts
    elif recipe.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
    return peft_model
