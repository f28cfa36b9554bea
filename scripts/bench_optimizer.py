"""The optimizer step on CPU: bitsandbytes' 8-bit AdamW (paged_adamw_8bit, what GPU recipes name) against torch's
AdamW (adamw_torch, what `optimizer: auto` picks on CPU; foreach, and fused), on the real SmolLM2-135M-Instruct
adapter that `make demo` trains (configs/smollm2-code.yaml: LoRA r=16 on every linear layer).

    python scripts/bench_optimizer.py --out benchmarks/results/optimizer-smollm2-135m-cpu.json

Each optimizer gets its own copy of the adapter's parameters and is built by transformers' Trainer exactly as
`qlora train` builds it. The optimizers step in ONE process, interleaved step by step (the order rotating), on the
same random gradients, warm-up steps excluded. Beside them, the recipe's training step without the optimizer
(forward and backward of its 2 micro-batches of 4 rows of our sample tasks) is timed in the same loop, so each
optimizer's share of a step is measured on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, device_name, optimizer_for, versions, write_report  # noqa: E402

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "paged_adamw_8bit")
RECIPE = ROOT / "configs" / "smollm2-code.yaml"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="SmolLM2-135M-Instruct as `qlora fetch smollm2-135m DIR` writes it "
                                              "(default: fetched into ~/.cache/qlora/models)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each optimizer, warm-up included")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=4, help="training steps (forward + backward) timed beside")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args()


def real_model(directory: Path | None) -> Path:
    from qlora.fetch import cached_model_dir, fetch

    return fetch("smollm2-135m", directory or cached_model_dir("smollm2-135m"))


def state_bytes(optimizer) -> int:
    """Bytes of the optimizer's per-parameter state (moments, 8-bit quantization maps and scales)."""
    import torch

    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


def main() -> None:
    args = parse_args()
    from qlora.compat import quiet_library_noise

    quiet_library_noise()
    import torch
    from transformers import set_seed

    from qlora.config import load_recipe
    from qlora.data import TEMPLATES, build_datasets, load_rows
    from qlora.model import add_lora, load_quantized_base, load_tokenizer
    from qlora.plan import resolve_recipe

    model_dir = real_model(args.model)
    recipe = load_recipe(RECIPE, [f"model.name_or_path={model_dir}",
                                  f"data.path={ROOT / 'src/qlora/sample_data/python_tasks.json'}"])
    recipe = resolve_recipe(recipe)
    set_seed(recipe.train.seed)
    tokenizer = load_tokenizer(recipe.model)
    model = add_lora(load_quantized_base(recipe), recipe, tokenizer)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)

    rows = load_rows(recipe.data)
    train_set, _, _ = build_datasets(recipe, rows, None, tokenizer, TEMPLATES[recipe.data.template])
    t = recipe.train
    micro_batches = []
    for start in range(0, t.batch_size * t.grad_accum, t.batch_size):
        ids = train_set["input_ids"][start:start + t.batch_size]
        labels = train_set["labels"][start:start + t.batch_size]
        width = max(map(len, ids))
        micro_batches.append((
            torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids]),
            torch.tensor([row + [-100] * (width - len(row)) for row in labels])))

    def train_step():
        for input_ids, labels in micro_batches:
            (model(input_ids=input_ids, labels=labels).loss / t.grad_accum).backward()
        for p in params:
            p.grad = None

    generator = torch.Generator().manual_seed(0)
    gradients = [[torch.randn(p.shape, generator=generator) * 1e-3 for p in params] for _ in range(4)]
    copies = {name: [p.detach().clone().requires_grad_(True) for p in params] for name in OPTIMIZERS}
    optimizers = {name: optimizer_for(recipe.model_copy(update={"train": t.model_copy(update={"optimizer": name})}),
                                      copies[name]) for name in OPTIMIZERS}
    seconds = {name: [] for name in (*OPTIMIZERS, "forward+backward")}
    order = [*OPTIMIZERS, "forward+backward"]
    for step in range(args.steps):
        for name in order[step % len(order):] + order[:step % len(order)]:  # no one always goes first
            if name == "forward+backward":
                if step >= args.steps - args.train_steps:  # a few: a training step takes seconds
                    start = time.perf_counter()
                    train_step()
                    seconds[name].append(time.perf_counter() - start)
                continue
            for param, grad in zip(copies[name], gradients[step % len(gradients)]):
                param.grad = grad.clone()
            start = time.perf_counter()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step >= args.warmup:
                seconds[name].append(time.perf_counter() - start)

    train = statistics.median(seconds["forward+backward"])
    results = {}
    for name in OPTIMIZERS:
        step = statistics.median(seconds[name])
        results[name] = {"class": type(optimizers[name]).__name__, "step_ms_median": round(step * 1e3, 2),
                         "step_ms_all": [round(s * 1e3, 2) for s in seconds[name]],
                         "state_mib": round(state_bytes(optimizers[name]) / 2**20, 2),
                         "share_of_training_step": round(step / (step + train), 4)}
        print(f"{name:<18} {step * 1e3:8.1f} ms per step ({step / (step + train):.1%} of a step), state "
              f"{results[name]['state_mib']:.1f} MiB ({results[name]['class']})")
    print(f"forward+backward   {train * 1e3:8.1f} ms per step ({t.grad_accum} micro-batches of {t.batch_size} rows)")
    write_report({
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "what": "optimizer step on CPU, the real SmolLM2-135M-Instruct LoRA adapter of configs/smollm2-code.yaml",
        "model": str(model_dir), "trainable_parameters": trainable, "device": device_name(),
        "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "versions": versions(),
        "steps_timed": args.steps - args.warmup, "train_step_ms_median": round(train * 1e3, 1),
        "train_step_ms_all": [round(s * 1e3, 1) for s in seconds["forward+backward"]],
        "optimizers": results,
    }, args.out)


if __name__ == "__main__":
    main()
