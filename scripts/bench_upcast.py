"""Is peft's fp32 upcast of the frozen non-4-bit weights worth its memory? Memory, speed and loss, side by side.

    python scripts/bench_upcast.py --shape gemma-2b --layers 2 --variants upcast,norms-fp32 \
        --out benchmarks/results/upcast-gemma-2b-cpu.json
    python scripts/bench_upcast.py --shape llama-2-7b --layers 1 --out benchmarks/results/upcast-llama-2-7b-cpu.json

prepare_model_for_kbit_training casts every frozen weight that is not 4-bit to float32: the embedding, an untied
LM head and the norms. A random model with the shape's real dimensions (fewer layers: the embedding and head,
which the upcast is about, keep their full size) is loaded through qlora's own loader (NF4, double quantization,
compute dtype auto, LoRA on all linear layers, float32 adapters); then the frozen non-4-bit weights are cast:

- upcast: every one in float32 (peft's prepare_model_for_kbit_training);
- norms-fp32: the embedding and LM head in the compute dtype, the norms in float32;
- no-upcast: every one in the compute dtype, as the checkpoint ships them.

Per variant, a fresh process measures the peak RSS of its first training steps (VmHWM, reset through
/proc/self/clear_refs once the model is loaded, so loading does not count). Then one process trains every
variant from the same adapter initialisation on the same batches with the same dropout masks, interleaved step by
step (the order rotates each step), and reports tokens/s, the loss curves and how far each variant's adapter
update is from the first variant's. A control run, the first variant with other dropout masks, gives the noise
floor of those differences: a variant whose gaps stay below the control's trains as well as the reference. A step
is what qlora's trainer runs: autocast to the compute dtype, TRL's fused LM head, padding-free micro-batches,
non-reentrant gradient checkpointing, gradient clipping, the recipe's optimizer (paged_adamw_8bit, as the seed
recipes). The report also holds what add_lora itself leaves and `qlora check`'s estimate of it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (ROOT, SAMPLE_DATA, SHAPES, batches_for, memory_in_fresh_process, optimizer_for,  # noqa: E402
                   proc_status_bytes, reset_peak_rss, save_random_model, versions, write_report)

VARIANTS = ("upcast", "norms-fp32", "no-upcast")
CONTROL = "control"  # the first variant again, with other dropout masks
CONTROL_SEED_OFFSET = 1_000_003


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, required=True, help="tiny: qlora's tiny Gemma, for a test")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the embedding and head keep full size); "
                                                         "tiny keeps its own")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "code_alpaca_2k.json",
                   help="Alpaca-style JSON list whose real rows are trained on (default: the shared "
                        "code_alpaca_2k; falls back to our sample data when absent)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=30, help="training steps of the loss comparison")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--memory-steps", type=int, default=2, help="steps measured in each fresh process")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="the seed recipes' learning rate")
    p.add_argument("--optimizer", default="paged_adamw_8bit")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench"), help="where random weights are cached")
    p.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # the fresh process of one variant
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args()


def recipe_for(model_dir: Path, args):
    from qlora.config import validate_recipe
    from qlora.plan import resolve_recipe

    return resolve_recipe(validate_recipe({
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": "bench.json", "max_length": args.max_length},
        "train": {"output_dir": "bench", "batch_size": args.batch_size, "grad_accum": 1,
                  "learning_rate": args.learning_rate, "optimizer": args.optimizer},
    }, "bench"))


def frozen_float_params(model):
    """The frozen weights that are not 4-bit (Params4bit are uint8), each once (a tied head is the embedding)."""
    return [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]


def cast_frozen(model, variant: str, compute) -> None:
    """Cast the frozen non-4-bit weights as `variant` says; the adapters stay as add_lora left them."""
    import torch

    big = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    for param in frozen_float_params(model):
        upcast = variant == "upcast" or (variant == "norms-fp32" and id(param) not in big)
        param.data = param.data.to(torch.float32 if upcast else compute)


def load_variant(model_dir: Path, variant: str, args):
    """(model, step function, add_lora's own parameter bytes) of a variant.

    The step function takes a list of (input_ids, labels) and a dropout seed.
    """
    import torch
    from transformers import set_seed
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    from qlora.model import add_lora, load_quantized_base
    from qlora.plan import torch_dtype
    from qlora.tiny import build_tokenizer

    recipe = recipe_for(model_dir, args)
    compute = torch_dtype(recipe.quantization.compute_dtype)
    set_seed(recipe.train.seed)  # as train does: every variant starts from the same adapter weights
    model = add_lora(load_quantized_base(recipe), recipe, build_tokenizer("gemma"))
    as_add_lora_leaves_it = parameter_bytes(model)
    cast_frozen(model, variant, compute)
    # what SFTTrainer adds: input gradients for checkpointing, the fused LM head
    model.enable_input_require_grads()
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_for(recipe, params)
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    model.train()

    def step(examples, seed):
        batch = collate([{"input_ids": i, "labels": l} for i, l in examples])
        torch.manual_seed(seed)  # the same dropout masks in every variant
        with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32):  # the trainer's CPU mode
            loss = model(**batch, fused_lm_head=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), sum(len(i) for i, _ in examples)

    return model, step, as_add_lora_leaves_it


def parameter_bytes(model) -> dict[str, int]:
    frozen = frozen_float_params(model)
    return {"frozen_non_4bit_bytes": sum(p.numel() * p.element_size() for p in frozen),
            "frozen_non_4bit_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in frozen}),
            "adapter_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)}


def adapter_vector(model):
    """Every trainable weight, flattened into one float32 vector (a copy)."""
    import torch

    return torch.cat([p.detach().flatten().float() for p in model.parameters() if p.requires_grad])


def measure_memory(model_dir: Path, batches, args) -> dict:
    """Peak RSS of a variant's first training steps; run in a fresh process (--memory-of)."""
    model, step, add_lora_bytes = load_variant(model_dir, args.memory_of, args)
    loaded = reset_peak_rss()  # loading's freed heap handed back: RSS starts from what stays
    for index, batch in enumerate(batches[:args.memory_steps]):
        step(batch, seed=index)
    peak = proc_status_bytes("VmHWM")
    return {**parameter_bytes(model), "rss_loaded_bytes": loaded, "peak_rss_bytes": peak,
            "peak_rss_increase_in_steps_bytes": peak - loaded, "add_lora": add_lora_bytes}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = save_random_model(args.shape, args.workdir, None if args.shape == "tiny" else args.layers)
    batches = batches_for(model_dir, args)
    if args.memory_of:
        print(json.dumps(measure_memory(model_dir, batches, args)))
        return

    import torch

    from qlora.check import estimate_memory, model_shape

    names = args.variants.split(",")
    memory = {}
    for name in names:
        memory[name] = memory_in_fresh_process(name, __file__)
        print(f"{name}: {memory[name]}", file=sys.stderr)
    add_lora_bytes = [memory[name].pop("add_lora") for name in names][0]  # the same in every process
    reference = names[0]
    runs = {name: load_variant(model_dir, name, args)[:2] for name in names}
    runs[CONTROL] = load_variant(model_dir, reference, args)[:2]
    initial = {name: adapter_vector(model) for name, (model, _) in runs.items()}
    losses = {name: [] for name in runs}
    times = {name: [] for name in runs}
    tokens = 0
    for index, batch in enumerate(batches[:args.steps]):
        turn = index % len(runs)
        order = [*runs][turn:] + [*runs][:turn]  # no run always goes first
        for name in order:
            start = time.perf_counter()
            loss, real = runs[name][1](batch, seed=index + (CONTROL_SEED_OFFSET if name == CONTROL else 0))
            elapsed = time.perf_counter() - start
            losses[name].append(loss)
            if index >= args.warmup:
                times[name].append(elapsed)
        if index >= args.warmup:
            tokens += real
        print(f"step {index + 1}/{args.steps}: " + ", ".join(f"{n} {losses[n][-1]:.4f}" for n in runs),
              file=sys.stderr)

    update = {name: adapter_vector(model) - initial[name] for name, (model, _) in runs.items()}
    recipe = recipe_for(model_dir, args)
    longest = max(len(i) for b in batches for i, _ in b)
    results = {}
    for name in runs:
        ref = losses[reference]
        results[name] = {
            **memory.get(name, {}),
            "tokens_per_second": tokens / sum(times[name]),
            "step_time_s": statistics.mean(times[name]),
            "step_time_s_stdev": statistics.pstdev(times[name]),
            "step_time_ratio_to_reference_median": statistics.median(
                t / r for t, r in zip(times[name], times[reference])),
            "losses": losses[name],
            "max_relative_loss_difference_to_reference": max(abs(x - r) / r for x, r in zip(losses[name], ref)),
            "mean_relative_loss_difference_to_reference": statistics.mean(
                abs(x - r) / r for x, r in zip(losses[name], ref)),
            # |update - reference update| / |reference update|, over all adapter weights after the last step
            "adapter_update_difference_to_reference": float(
                (update[name] - update[reference]).norm() / update[reference].norm()),
        }
    report = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "shape": args.shape,
        "layers": args.layers,
        "versions": versions(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "settings": {"batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps,
                     "warmup": args.warmup, "memory_steps": args.memory_steps, "learning_rate": args.learning_rate,
                     "optimizer": args.optimizer, "compute_dtype": recipe.quantization.compute_dtype,
                     "data": str(args.data if args.data.is_file() else SAMPLE_DATA),
                     "tokens_per_step_mean": tokens / max(1, args.steps - args.warmup),
                     "reference": reference, "control": f"{reference} with other dropout masks",
                     "torch_threads": torch.get_num_threads()},
        # what add_lora itself leaves (every variant starts from it), against `qlora check`'s estimate of it
        "add_lora": add_lora_bytes,
        "qlora_check_unquantized_weights_bytes": estimate_memory(recipe, model_shape(recipe), longest)["parts"][
            "unquantized_weights"],
        "variants": results,
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
