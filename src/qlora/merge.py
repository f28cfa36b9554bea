"""merge(run, out) -> a standalone model directory any standard tool loads, with verification.

`base="dequantized"` (default) folds the adapter into the NF4 round-trip of the base weights, i.e.
exactly the weights the adapter was trained against; `base="original"` folds it into the
full-precision base, which the adapter never saw (quantization error then shows up in --verify).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console

from qlora.config import dump_recipe, load_recipe
from qlora.data import Template, adds_bos, encode_prompt, stop_token_ids, turn_end
from qlora.errors import UserError
from qlora.files import check_replaceable, publishing, refuse_working_directory, write_marker
from qlora.progress import heartbeat
from qlora.rundir import ADAPTER_DIR, RECIPE_FILE, check_run_adapter, read_eval_summary

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
# Top-1 agreement a merge must reach with its unmerged counterpart (same base, adapter applied on the fly).
# The two compute the same function up to rounding, which flips the top token only where the two best
# logits nearly tie (measured: 100% on the tiny models, both bases, bf16 and fp32); a lost, doubled or
# mis-scaled adapter changes most predictions of a trained model, far below this bar.
MIN_AGREEMENT = 0.97


def _jinja(fmt: str, **exprs: str) -> str:
    """A template format string as a Jinja expression: literals as JSON strings, placeholders as `exprs`."""
    parts = re.split(r"(\{(?:content|system|input)\})", fmt)
    pieces = [exprs.get(p[1:-1], "''") if re.fullmatch(r"\{\w+\}", p) else json.dumps(p) for p in parts if p]
    return " + ".join(pieces) or "''"


def chat_template(template: Template, add_bos: bool, eos_after_reply: bool) -> str:
    """A Jinja chat template that renders conversations exactly as `template` did in training.

    A user message X with add_generation_prompt renders the training prompt for instruction X;
    each assistant turn ends with reply_end, and EOS after it where the template has no turn end of its own.
    """
    first = template.first_user if "{system}" in template.first_user else "{system}" + template.first_user
    return (
        ("{{- bos_token -}}" if add_bos else "")
        + "{%- set ns = namespace(system='', first=true) -%}"
        + "{%- for m in messages if m['role'] == 'system' -%}"
        + "{%- set ns.system = ns.system + " + _jinja(template.system, content="m['content']") + " -%}"
        + "{%- endfor -%}"
        + "{%- for m in messages if m['role'] != 'system' -%}"
        + "{%- if m['role'] == 'user' -%}"
        + "{%- if ns.first -%}{{- " + _jinja(first, content="m['content']", system="ns.system") + " -}}"
        + "{%- else -%}{{- " + _jinja(template.user, content="m['content']") + " -}}{%- endif -%}"
        + "{%- set ns.first = false -%}"
        + "{%- if not loop.last or add_generation_prompt -%}{{- " + _jinja(template.reply_start) + " -}}{%- endif -%}"
        + "{%- elif m['role'] == 'assistant' -%}{{- m['content'] + " + _jinja(template.reply_end)
        + (" + eos_token" if eos_after_reply else "") + " -}}"
        + "{%- endif -%}{%- endfor -%}"
    )


def check_output(run: Path, output: Path, overwrite: bool, keep: list[Path], command: str = "merge") -> None:
    """--output must be new, an empty directory, or (with --overwrite) what an earlier `command` (merge, export)
    wrote; never the run, a directory holding it, or anything else."""
    if run.resolve().is_relative_to(output.resolve()):
        relation = "is" if run.resolve() == output.resolve() else "holds"
        raise UserError(f"--output {output} {relation} the run {run}; choose another directory, e.g. {run / 'merged'}")
    refuse_working_directory(output, "--output")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; name a directory for the {command}d model")
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    if not overwrite:
        raise UserError(f"--output {output} exists and is not empty; pass --overwrite to replace a model an earlier "
                        f"{command} wrote, or choose another directory")
    check_replaceable(output, command, "--output", keep)


def dequantized_base(recipe):
    """The 4- or 8-bit base dequantized in the compute dtype: the very weights its kernels used in training."""
    from qlora.model import load_quantized_base
    from qlora.plan import compute_torch_dtype

    return load_quantized_base(recipe).dequantize(dtype=compute_torch_dtype(recipe.quantization))


def unmerged_base(recipe, base: BaseMode, dtype):
    """The plain model an adapter folds into, in `dtype`: the dequantized base (its compute-dtype weights, cast
    before merging so that W + BA is rounded once, to the dtype written) or the original one."""
    from qlora.model import load_full_precision_base

    if base == "dequantized" and recipe.quantization.quantized:
        return dequantized_base(recipe).to(dtype)
    return load_full_precision_base(recipe, dtype)


def load_merged_model(run: Path, recipe, base: BaseMode, dtype: str, tokenizer):
    """The base with the run's adapter folded in, as a plain (unquantized) transformers model."""
    from qlora.model import load_adapter
    from qlora.plan import torch_dtype

    console.print(f"loading base {recipe.model.name_or_path} ({base})")
    with heartbeat(console, "loading the base"):
        model = unmerged_base(recipe, base, torch_dtype(dtype))
    console.print("folding in the adapter")
    with heartbeat(console, "folding in the adapter"):
        merged = load_adapter(model, run / ADAPTER_DIR, tokenizer).merge_and_unload()
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

    from qlora.model import load_tokenizer, save_tokenizer
    from qlora.plan import inference_recipe, trained_compute_dtype

    run, output = Path(run), Path(output)
    if not (run / RECIPE_FILE).is_file() or not (run / ADAPTER_DIR / "adapter_config.json").is_file():
        raise UserError(f"{run}: not a finished qlora run (needs {RECIPE_FILE} and {ADAPTER_DIR}/)")
    recipe = load_recipe(run / RECIPE_FILE)
    check_run_adapter(run)
    evaluation = read_eval_summary(run)  # for the model card; read before the work, as every run file
    base_dir = Path(recipe.model.name_or_path)
    check_output(run, output, overwrite, [run, *([base_dir] if base_dir.is_dir() else [])])
    with publishing(output, "merge", "--output") as tmp:
        # written in the dtype the run trained in, whichever machine merges it (a float16 run: float16 on a CPU too)
        dtype = dtype or trained_compute_dtype(recipe.quantization)
        tokenizer = load_tokenizer(recipe.model, str(run / ADAPTER_DIR))
        model = load_merged_model(run, inference_recipe(recipe), base, dtype, tokenizer)
        template = Template.load(run / ADAPTER_DIR)
        if template.name != "tokenizer":  # else the tokenizer's own chat template, as trained, is kept
            tokenizer.chat_template = chat_template(template, adds_bos(tokenizer),
                                                    turn_end(template, tokenizer) is None)

        g, stops = recipe.generation, stop_token_ids(tokenizer, template)
        model.generation_config = GenerationConfig(  # one id written as a number, several as a list, as hub models do
            bos_token_id=tokenizer.bos_token_id, eos_token_id=stops[0] if len(stops) == 1 else stops,
            pad_token_id=tokenizer.pad_token_id, max_new_tokens=g.max_new_tokens, do_sample=g.temperature > 0,
            **({"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k} if g.temperature > 0 else {}),
            num_beams=g.num_beams, repetition_penalty=g.repetition_penalty,
        )
        model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        console.print(f"writing {dtype} safetensors shards to {output}")
        with heartbeat(console, "writing shards"):
            model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        save_tokenizer(tokenizer, recipe.model, tmp)
        template.save(tmp)
        (tmp / "README.md").write_text(model_card(recipe, base, dtype, evaluation), encoding="utf-8")
        write_marker(tmp, "merge", run=str(run.resolve()))
    console.print(f"[green]done:[/] merged model in {output}")
    return output


def model_card(recipe, base: BaseMode, dtype: str, evaluation: dict | None = None) -> str:
    """The README.md of a merged model: hub metadata (base model, the dataset when it is a hub id), what was
    trained and merged, the eval summary when the run has one, and the recipe."""
    from qlora.data import is_local_path

    dataset = "" if is_local_path(recipe.data.path) else f"datasets: [{recipe.data.path}]\n"
    scores = ""
    if evaluation:
        rows = "".join(f"| {k} | {v:.3f} | {evaluation.get('base', {}).get(k, float('nan')):.3f} |\n"
                       for k, v in evaluation.items() if k.startswith("pass@"))
        scores = f"## Evaluation (`qlora eval`)\n\n| metric | fine-tuned | base |\n|---|---|---|\n{rows}\n"
    return (
        f"---\nbase_model: {recipe.model.name_or_path}\n{dataset}library_name: transformers\n"
        "tags: [qlora, lora, merged]\n---\n\n"
        f"# Merged QLoRA fine-tune of {recipe.model.name_or_path}\n\n"
        f"LoRA adapter (r={recipe.lora.r}, alpha={recipe.lora.alpha}, targets {recipe.lora.target_modules}) trained "
        f"on `{recipe.data.path}` with the `{recipe.data.template}` prompt template, merged into the "
        f"{'NF4 round-trip of the' if base == 'dequantized' else 'full-precision'} base weights, saved in {dtype}.\n\n"
        "The tokenizer's chat template renders a user message as the training prompt, so "
        "`tokenizer.apply_chat_template([{'role': 'user', 'content': X}], add_generation_prompt=True)` "
        "is exactly what the model was trained to continue.\n\n"
        f"{scores}## Recipe\n\n```yaml\n{dump_recipe(recipe)}```\n"
    )


@dataclass
class VerifyReport:
    """How closely the merged model follows the 4-bit base + adapter it came from."""

    max_abs_logit_diff: float  # these four: merged vs the 4-bit base + adapter, as trained
    mean_kl: float
    top1_agreement: float
    positions: int
    merge_agreement: float  # merged vs the same base + adapter unmerged: what the pass/fail bar checks
    required: float

    @property
    def passed(self) -> bool:
        return self.merge_agreement >= self.required

    def summary(self) -> str:
        return (f"vs the quantized model: max |logit diff| {self.max_abs_logit_diff:.4g}, mean KL {self.mean_kl:.3g}, "
                f"top-1 agreement {self.top1_agreement:.2%} over {self.positions} positions; "
                f"vs the unmerged adapter on the same base: {self.merge_agreement:.2%} (required {self.required:.0%})")


def _logits(model, sequences, start: list[int]):
    """Float32 logits of `model` at each sequence's continuation positions, on the CPU."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=seq.to(device)).logits[0, s:].float().cpu() for seq, s in zip(sequences, start)]


def _compare(ref, got) -> tuple[float, float, float, int]:
    """(max abs diff, mean KL(ref || got), top-1 agreement, positions) over lists of logit tensors."""
    import torch

    ref, got = torch.cat(ref), torch.cat(got)
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    agreement = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return (ref - got).abs().max().item(), kl.item(), agreement, ref.shape[0]


def _free() -> None:
    """Hand back the memory of the models the caller has just deleted."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def verify(run: str | Path, merged_dir: str | Path, base: BaseMode = "dequantized", prompts=VERIFY_PROMPTS,
           new_tokens: int = 16, min_agreement: float = MIN_AGREEMENT) -> VerifyReport:
    """Compare the merged model with the quantized base + adapter on held-out prompts and their continuations.

    The pass/fail bar compares the merge with its exact unmerged counterpart, computed in the dtype the merged
    model loads in (float32 on CPU, as saved on CUDA): the dequantized 4- or 8-bit base + adapter for a
    dequantized merge, the full-precision base + adapter for an original one. So it sees only what merging did
    (rounding W + BA to the saved dtype), not the 4-bit kernel's bf16 arithmetic, nor LLM.int8's 8-bit activations,
    nor an original merge's distance to the quantized model, which are reported but are no fault of the merge.
    Models are loaded one at a time and only logits kept, so verifying needs no more memory than merging.
    """
    import torch

    from qlora.generate import load_run
    from qlora.model import load_adapter

    reference = load_run(run)
    sequences, start = [], []
    with heartbeat(console, "verifying: the run's continuations"):
        for prompt in prompts:
            ids = encode_prompt(reference.tokenizer, reference.template, prompt)
            with torch.no_grad():
                sequences.append(reference.model.generate(
                    input_ids=torch.tensor([ids], device=next(reference.model.parameters()).device),
                    max_new_tokens=new_tokens, do_sample=False, pad_token_id=reference.tokenizer.pad_token_id).cpu())
            start.append(len(ids) - 1)  # the logits that predict the continuation
        trained = _logits(reference.model, sequences, start)
    recipe, tokenizer = reference.recipe, reference.tokenizer
    del reference
    _free()

    merged_model = load_run(merged_dir).model
    with heartbeat(console, "verifying: the merged model"):
        merged, dtype = _logits(merged_model, sequences, start), merged_model.dtype
    del merged_model
    _free()

    with heartbeat(console, "verifying: the unmerged counterpart"):
        unmerged = load_adapter(unmerged_base(recipe, base, dtype), Path(run) / ADAPTER_DIR, tokenizer)
        counterpart = _logits(unmerged, sequences, start)
    del unmerged
    _free()
    return VerifyReport(*_compare(trained, merged), merge_agreement=_compare(counterpart, merged)[2],
                        required=min_agreement)
