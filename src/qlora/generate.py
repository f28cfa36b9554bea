"""generate(run, prompts, sampling) -> texts, with the run's own template and tokenizer.

Prompts are encoded by data.encode_prompt, the function training used, so the model sees
token-for-token the prefix it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora.config import GenerationSection, Recipe, load_recipe
from qlora.data import TEMPLATE_FILE, Template, encode_prompt
from qlora.errors import UserError
from qlora.train import ADAPTER_DIR, RECIPE_FILE


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer and template it was trained with."""

    model: Any
    tokenizer: Any
    template: Template
    recipe: Recipe | None  # None for a merged directory


def load_run(path: str | Path) -> LoadedModel:
    """Load a run directory (4-bit base + adapter, as trained) or a merged model directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora.model import device_map, load_quantized_base, load_tokenizer

    path = Path(path)
    if (path / RECIPE_FILE).is_file():
        recipe = load_recipe(path / RECIPE_FILE)
        adapter = path / ADAPTER_DIR
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{path}: the run has no finished adapter/ (was training interrupted?)")
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_quantized_base(recipe), adapter)
        tokenizer = load_tokenizer(recipe.model, str(adapter))
        template = Template.load(adapter)
    elif (path / "config.json").is_file() and (path / TEMPLATE_FILE).is_file():
        recipe = None
        # CPU kernels are fastest and exact in float32; on CUDA keep the saved dtype
        dtype = "auto" if torch.cuda.is_available() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map())
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        template = Template.load(path)
    else:
        raise UserError(f"{path}: not a qlora run directory (no {RECIPE_FILE}) nor a merged model (no config.json "
                        f"and {TEMPLATE_FILE})")
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, template, recipe)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def generate(loaded: LoadedModel, prompts: list[tuple[str, str]], sampling: GenerationSection,
             batch_size: int = 8, on_batch=None) -> list[str]:
    """Generated responses for (instruction, input) prompts, batched with left padding."""
    import torch

    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    texts = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tok, loaded.template, ins, inp) for ins, inp in prompts[start:start + batch_size]]
        width = max(map(len, encoded))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        sample = sampling.temperature > 0
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sample,
                temperature=sampling.temperature if sample else None,
                top_p=sampling.top_p if sample else None,
                top_k=sampling.top_k if sample else None,
                num_beams=sampling.num_beams,
                repetition_penalty=sampling.repetition_penalty,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        for row in out[:, width:]:
            texts.append(cut_at_stop(tok.decode(row, skip_special_tokens=True), sampling.stop))
        if on_batch:
            on_batch(len(encoded))
    return texts
