"""merge(run, out) -> a standalone model directory any standard tool loads, with verification.

`base="dequantized"` (default) folds the adapter into the NF4 round-trip of the base weights, i.e.
exactly the weights the adapter was trained against; `base="original"` folds it into the
full-precision base, which the adapter never saw (quantization error then shows up in --verify).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console

from qlora.config import dump_recipe, load_recipe
from qlora.data import Template, encode_prompt
from qlora.errors import UserError
from qlora.train import ADAPTER_DIR, RECIPE_FILE

console = Console(stderr=True)

BaseMode = Literal["dequantized", "original"]
# Not in the sample data: the verification looks at prompts the adapter was not trained on.
VERIFY_PROMPTS = (
    "Write a function that returns the median of a list of numbers.",
    "Write a Python function that checks whether a string is a valid IPv4 address.",
    "Implement binary search over a sorted list and return the index or -1.",
    "Write a generator that yields the Collatz sequence starting from n.",
    "Create a function that merges two dictionaries, summing values of shared keys.",
    "Write a function that converts a Roman numeral to an integer.",
)
# Top-1 agreement with the 4-bit model below which --verify fails. A dequantized merge equals the 4-bit
# model up to rounding, which flips the top token only where the two best logits nearly tie (measured:
# 100%); an original-base merge also carries the NF4 quantization error (measured: 93% on the tiny model).
# A lost, doubled or mis-scaled adapter changes most predictions of a trained model, far below either bar.
MIN_AGREEMENT = {"dequantized": 0.97, "original": 0.85}


def chat_template(template: Template, add_bos: bool) -> str:
    """A Jinja chat template rendering a user message X exactly as the training prompt for instruction X.

    Assistant turns end with EOS, as trained; system messages are ignored (the template has its own preamble).
    """
    prefix, suffix = template.prompt_no_input.split("{instruction}")
    return (
        ("{{- bos_token -}}" if add_bos else "")
        + "{%- for m in messages -%}"
        + "{%- if m['role'] == 'user' -%}"
        + "{{- " + json.dumps(prefix) + " + m['content'] -}}"
        + "{%- if not loop.last or add_generation_prompt -%}{{- " + json.dumps(suffix) + " -}}{%- endif -%}"
        + "{%- elif m['role'] == 'assistant' -%}{{- m['content'] + eos_token -}}"
        + "{%- endif -%}{%- endfor -%}"
    )


def _prepare_output(output: Path, overwrite: bool) -> Path:
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise UserError(f"--output {output} exists and is not empty; pass --overwrite or choose another directory")
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def load_merged_model(run: Path, recipe, base: BaseMode, dtype: str):
    """The base with the run's adapter folded in, as a plain (unquantized) transformers model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora.model import device_map, load_quantized_base, torch_dtype

    console.print(f"loading base {recipe.model.name_or_path} ({base})")
    if base == "dequantized" and recipe.quantization.load_in_4bit:
        # dequantize in the compute dtype: the very weights the 4-bit kernels used during training
        model = load_quantized_base(recipe).dequantize(dtype=torch_dtype(recipe.quantization.compute_dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(
            recipe.model.name_or_path, revision=recipe.model.revision, dtype=torch_dtype(dtype),
            trust_remote_code=recipe.model.trust_remote_code, device_map=device_map(),
        )
    console.print("folding in the adapter")
    merged = PeftModel.from_pretrained(model, run / ADAPTER_DIR).merge_and_unload()
    merged = merged.to(torch_dtype(dtype))
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, key):
            delattr(merged.config, key)
    merged.config.use_cache = True
    return merged


def merge(run: str | Path, output: str | Path, *, base: BaseMode = "dequantized", dtype: str | None = None,
          max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """Write the merged model, tokenizer (with chat template), generation config and model card to `output`."""
    from transformers import GenerationConfig

    from qlora.model import load_tokenizer

    run, output = Path(run), Path(output)
    if not (run / RECIPE_FILE).is_file() or not (run / ADAPTER_DIR / "adapter_config.json").is_file():
        raise UserError(f"{run}: not a finished qlora run (needs {RECIPE_FILE} and {ADAPTER_DIR}/)")
    tmp = _prepare_output(output, overwrite)
    try:
        recipe = load_recipe(run / RECIPE_FILE)
        dtype = dtype or recipe.quantization.compute_dtype
        model = load_merged_model(run, recipe, base, dtype)
        tokenizer = load_tokenizer(recipe.model, str(run / ADAPTER_DIR))
        template = Template.load(run / ADAPTER_DIR)
        add_bos = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        tokenizer.chat_template = chat_template(template, add_bos)

        g = recipe.generation
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, max_new_tokens=g.max_new_tokens, do_sample=g.temperature > 0,
            **({"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k} if g.temperature > 0 else {}),
            num_beams=g.num_beams, repetition_penalty=g.repetition_penalty,
        )
        model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        console.print(f"writing {dtype} safetensors shards to {output}")
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        template.save(tmp)
        (tmp / "README.md").write_text(model_card(recipe, base, dtype), encoding="utf-8")
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.print(f"[green]done:[/] merged model in {output}")
    return output


def model_card(recipe, base: BaseMode, dtype: str) -> str:
    return (
        f"---\nbase_model: {recipe.model.name_or_path}\nlibrary_name: transformers\ntags: [qlora, lora, merged]\n---\n\n"
        f"# Merged QLoRA fine-tune of {recipe.model.name_or_path}\n\n"
        f"LoRA adapter (r={recipe.lora.r}, alpha={recipe.lora.alpha}, targets {recipe.lora.target_modules}) trained "
        f"on `{recipe.data.path}` with the `{recipe.data.template}` prompt template, merged into the "
        f"{'NF4 round-trip of the' if base == 'dequantized' else 'full-precision'} base weights, saved in {dtype}.\n\n"
        "The tokenizer's chat template renders a user message as the training prompt, so "
        "`tokenizer.apply_chat_template([{'role': 'user', 'content': X}], add_generation_prompt=True)` "
        "is exactly what the model was trained to continue.\n\n"
        f"## Recipe\n\n```yaml\n{dump_recipe(recipe)}```\n"
    )


@dataclass
class VerifyReport:
    max_abs_logit_diff: float
    mean_kl: float
    top1_agreement: float
    positions: int

    def summary(self) -> str:
        return (f"max |logit diff| {self.max_abs_logit_diff:.4g}, mean KL {self.mean_kl:.3g}, "
                f"top-1 agreement {self.top1_agreement:.2%} over {self.positions} positions")


def verify(run: str | Path, merged_dir: str | Path, prompts=VERIFY_PROMPTS, new_tokens: int = 16) -> VerifyReport:
    """Compare the merged model with the 4-bit base + adapter on held-out prompts and their continuations."""
    import torch
    import torch.nn.functional as F

    from qlora.generate import load_run

    reference, merged = load_run(run), load_run(merged_dir)
    max_diff, kl_sum, agree, positions = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for prompt in prompts:
            ids = encode_prompt(reference.tokenizer, reference.template, prompt)
            full = reference.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens,
                                            do_sample=False, pad_token_id=reference.tokenizer.pad_token_id)
            start = len(ids) - 1  # logits that predict the continuation
            ref = reference.model(input_ids=full).logits[0, start:].float()
            got = merged.model(input_ids=full.to(merged.model.device)).logits[0, start:].float().to(ref.device)
            max_diff = max(max_diff, (ref - got).abs().max().item())
            kl_sum += F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum").item()
            agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
            positions += ref.shape[0]
    report = VerifyReport(max_diff, kl_sum / positions, agree / positions, positions)
    if not math.isfinite(report.max_abs_logit_diff):
        report.top1_agreement = 0.0
    return report
