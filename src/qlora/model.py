"""Recipe -> library objects: BitsAndBytesConfig, LoraConfig, tokenizer, 4-bit base, LoRA-wrapped model."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

from qlora.errors import UserError

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional kernels-hub package is absent;
# it falls back to its own kernel, so the warning is noise on every run
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft still calls transformers' gradient_checkpointing_* names, renamed in transformers 5: noise on every run
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing.*` is deprecated", category=FutureWarning)

if TYPE_CHECKING:
    from qlora.config import LoraSection, ModelSection, QuantizationSection, Recipe


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def get_quantization_config(q: QuantizationSection):
    """The BitsAndBytesConfig for the recipe, or None when the base is not loaded in 4 bits."""
    from transformers import BitsAndBytesConfig

    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(q.quant_storage),
    )


def get_lora_config(lora: LoraSection):
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


def device_map():
    """Where the base goes: the current CUDA device when there is one, else the CPU."""
    import torch

    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}


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
            dtype=torch_dtype(q.compute_dtype),
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
            trust_remote_code=recipe.model.trust_remote_code, device_map=device_map(),
        )
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot load {recipe.model.name_or_path!r} "
                        f"(revision {recipe.model.revision}): {exc}") from None


def add_lora(model, recipe: Recipe):
    """Prepare the (quantized) base for training and wrap it with trainable LoRA adapters.

    Adapter weights are kept in float32 whatever the compute dtype (bf16 is for the matmuls only):
    a bf16 adapter is cast differently by a fresh run and a resumed one, so they would diverge.
    """
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    if recipe.quantization.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif recipe.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, get_lora_config(recipe.lora))
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
    return peft_model
