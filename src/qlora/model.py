"""Loading: the tokenizer, the (4-bit) base and a run's adapter, and wrapping the base with LoRA adapters, each
with the arguments plan.py makes for this machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.compat import quiet_library_noise
from qlora.errors import UserError
from qlora.plan import (FSDP_CONFIG, base_arguments, compute_torch_dtype, full_precision_arguments, get_lora_config,
                        sharded, torch_dtype)

SENTENCEPIECE_FILE = "tokenizer.model"

if TYPE_CHECKING:
    from qlora.config import LoraSection, ModelSection, Recipe


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


def load_quantized_base(recipe: Recipe):
    """The frozen base model, in 4-bit NF4 (double-quantized) when the recipe says so."""
    from transformers import AutoModelForCausalLM

    warn_remote_code(recipe.model)
    quiet_library_noise()
    if sharded(recipe) and FSDP_CONFIG["cpu_ram_efficient_loading"]:
        from accelerate.utils import enable_fsdp_ram_efficient_loading

        enable_fsdp_ram_efficient_loading()  # read by from_pretrained (transformers' is_fsdp_enabled)
    try:
        model = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, **base_arguments(recipe))
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot load {recipe.model.name_or_path!r} "
                        f"(revision {recipe.model.revision}): {exc}") from None
    model.config.use_cache = False  # the KV cache is useless in training and breaks gradient checkpointing
    return model


def load_full_precision_base(recipe: Recipe, dtype):
    """The recipe's base model, unquantized, in `dtype` (a torch dtype or "auto")."""
    from transformers import AutoModelForCausalLM

    warn_remote_code(recipe.model)
    quiet_library_noise()
    try:
        return AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path,
                                                    **full_precision_arguments(recipe, dtype))
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
    (docs/devices.md, "Embedding and LM head in bf16").
    """
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    fit_vocabulary(model, tokenizer)
    lora_config = get_lora_config(recipe.lora, trainable_token_indices(model, recipe.lora, tokenizer))
    if sharded(recipe):
        # FSDP needs one dtype per unit: the adapter in the storage dtype like the base, not float32 (peft's FSDP-QLoRA
        # guide; accelerate keeps a 4-bit model's dtypes); the trainer turns gradient checkpointing on
        model.enable_input_require_grads()
        peft_model = get_peft_model(model, lora_config)
        for param in peft_model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch_dtype(recipe.quantization.quant_storage))
        return peft_model
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
