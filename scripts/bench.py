"""Side-by-side training throughput and memory: the seed notebooks' QLoRA setup vs qlora's defaults.

    python scripts/bench.py --shape gemma-2b --data ../shared/data/code_alpaca_2k.json --out benchmarks/results/x.json

A random model with exactly the shape's dimensions is saved once under --workdir and loaded in 4-bit NF4 with
double quantization, then wrapped with LoRA r=16 on all linear layers, once per variant. The variants train
on the same batches in ONE process, interleaved step by step; warm-up steps are excluded. benchmarks/README.md
explains every number (the FLOPs formula included).

- baseline: what the seed notebooks do with HF + PEFT + TRL defaults: every micro-batch padded to its longest
  row, the model's standard loss over full logits, reentrant gradient checkpointing, AdamW.
- qlora: our defaults: padding-free micro-batches, TRL's fused tiled LM head on trained tokens only,
  non-reentrant checkpointing, float32 adapters, optimizer auto (paged 8-bit AdamW on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "src" / "qlora" / "sample_data" / "python_tasks.json"
# Real dimensions from each model's config.json on the hub.
SHAPES = {
    "gemma-2b": ("GemmaConfig", dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                                     num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256)),
    "llama-2-7b": ("LlamaConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)),
    "mistral-7b": ("MistralConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)),
    "phi-2": ("PhiConfig", dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.4)),
    "tiny": None,  # qlora.tiny's Gemma: runs on CPU in seconds; claims no speed
}
# Dense bf16 peak FLOP/s by device name, for MFU.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, required=True)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "code_alpaca_2k.json",
                   help="Alpaca-style JSON list whose real lengths are used (default: the shared code_alpaca_2k; "
                        "falls back to our sample data when absent)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per variant first")
    p.add_argument("--variants", default="baseline,qlora")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench"), help="where random weights are cached")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args()


def build_examples(path: Path, max_length: int, vocab: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every valid row, tokenized by qlora's tiny BPE tokenizer, ids folded into `vocab`."""
    from qlora.config import DataSection
    from qlora.data import TEMPLATES, load_rows, tokenize_rows
    from qlora.tiny import build_tokenizer

    path = path if path.is_file() else SAMPLE_DATA
    data = DataSection(path=str(path), max_length=max_length, skip_invalid=True, max_invalid_fraction=1.0)
    ids, labels, _ = tokenize_rows(load_rows(data), build_tokenizer("gemma"), TEMPLATES["alpaca"], data, str(path))

    def fold(seq):
        return [t % vocab if t >= 0 else t for t in seq]  # -100 labels stay

    return [(fold(i), fold(l)) for i, l in zip(ids, labels)]


def save_random_model(shape: str, workdir: Path, layers: int | None = None) -> Path:
    """A random model with the shape's exact dimensions (`layers` of them if given), saved once (bf16 on CUDA,
    float32 on CPU)."""
    import torch
    import transformers

    target = workdir / (shape if layers is None else f"{shape}-{layers}-layers")
    if (target / "config.json").is_file():
        return target
    if shape == "tiny":
        from qlora.tiny import build_tiny_model

        return build_tiny_model("gemma", target)
    name, dims = SHAPES[shape]
    config = getattr(transformers, name)(**dims | ({} if layers is None else {"num_hidden_layers": layers}))
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="5GB")
    tmp.rename(target)
    del model
    if cuda:
        torch.cuda.empty_cache()  # the bf16 copy must not count in the variants' memory
    return target


def load_variant(model_dir: Path, variant: str):
    """(model, optimizer, step function) for a variant; the step function takes a list of examples."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    cuda = torch.cuda.is_available()
    compute = torch.bfloat16 if cuda else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=compute,
                                                 attn_implementation="sdpa",
                                                 device_map={"": 0 if cuda else "cpu"})
    model.config.use_cache = False
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    if variant == "baseline":
        model = get_peft_model(prepare_model_for_kbit_training(model), lora)  # peft's default: reentrant
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        collate = DataCollatorForLanguageModeling(pad_token_id=0)

        def loss_of(batch):
            return model(**batch).loss
    else:
        from trl.trainer.utils import add_fused_lm_head

        model = prepare_model_for_kbit_training(
            model, gradient_checkpointing_kwargs={"use_reentrant": False})
        add_fused_lm_head(model)
        model = get_peft_model(model, lora)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        params = [p for p in model.parameters() if p.requires_grad]
        if cuda:
            import bitsandbytes as bnb

            optimizer = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
        else:
            optimizer = torch.optim.AdamW(params, lr=2e-4)
        collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)

        def loss_of(batch):
            return model(**batch, fused_lm_head=True).loss

    device = next(model.parameters()).device

    def step(examples):
        batch = collate([{"input_ids": i, "labels": l} for i, l in examples])
        real = sum(len(i) for i, _ in examples)
        total = batch["input_ids"].numel()
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), real, total

    model.train()
    return model, optimizer, step


def flops_per_sequence(shape_dims: dict, linear_params: int, length: int) -> float:
    """Model FLOPs to train on one sequence with a frozen base (formula in benchmarks/README.md)."""
    d_attn = shape_dims["heads"] * shape_dims["head_dim"]
    return 4 * linear_params * length + 6 * shape_dims["layers"] * length**2 * d_attn


def model_dims(model_dir: Path) -> tuple[dict, int]:
    """Attention dimensions and the parameter count of every linear layer (LM head included), from the config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"heads": config.num_attention_heads, "head_dim": head_dim, "layers": config.num_hidden_layers}, linear


def versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "qlora")
    return {n: md.version(n) for n in names} | {"python": platform.python_version()}


def write_report(report: dict, out: Path | None) -> None:
    """Print the report as JSON, and write it to `out` when given."""
    text = json.dumps(report, indent=1)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from qlora.check import estimate_memory, model_shape
    from qlora.config import validate_recipe
    from qlora.model import resolve_recipe

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                        f"{os.cpu_count()} cores)"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device), None) if cuda else None
    model_dir = save_random_model(args.shape, args.workdir)
    dims, linear_params = model_dims(model_dir)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    examples = build_examples(args.data, args.max_length, vocab)
    random.Random(0).shuffle(examples)
    total_steps = args.warmup + args.steps
    n, size = len(examples), args.batch_size
    batches = [[examples[(i * size + j) % n] for j in range(size)] for i in range(total_steps)]

    names = args.variants.split(",")
    variants = {}
    for name in names:
        before = torch.cuda.memory_allocated() if cuda else 0
        model, optimizer, step = load_variant(model_dir, name)
        variants[name] = {"step": step, "model_bytes": (torch.cuda.memory_allocated() - before) if cuda else None,
                          "optimizer": optimizer, "times": [], "real": 0, "total": 0, "step_peaks": [],
                          "losses": []}

    reserved = 0
    for index, batch in enumerate(batches):  # interleaved: every variant takes each step in turn
        for name in names:
            v = variants[name]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                at_start = torch.cuda.memory_allocated()
            start = time.perf_counter()
            loss, real, total = v["step"](batch)
            if cuda:
                torch.cuda.synchronize()
                v["step_peaks"].append(torch.cuda.max_memory_allocated() - at_start)
                reserved = max(reserved, torch.cuda.max_memory_reserved())
            elapsed = time.perf_counter() - start
            v["losses"].append(loss)
            if index >= args.warmup:
                v["times"].append(elapsed)
                v["real"] += real
                v["total"] += total
        print(f"step {index + 1}/{total_steps} done", file=sys.stderr)

    flops = sum(flops_per_sequence(dims, linear_params, len(i)) for b in batches[args.warmup:] for i, _ in b)
    results = {}
    for name in names:
        v = variants[name]
        seconds = sum(v["times"])
        optimizer_bytes = sum(t.numel() * t.element_size() for s in v["optimizer"].state.values()
                              for t in s.values() if torch.is_tensor(t))
        peak_allocated = (v["model_bytes"] + optimizer_bytes + max(v["step_peaks"])) if cuda else None
        results[name] = {
            "tokens_per_second": v["real"] / seconds,
            "step_time_s": statistics.mean(v["times"]),
            "step_time_s_stdev": statistics.pstdev(v["times"]),
            "padding_fraction": 1 - v["real"] / v["total"],
            "peak_memory_allocated_bytes": peak_allocated,
            "mfu": flops / seconds / peak if peak else None,
            "final_loss": v["losses"][-1],
        }
    recipe = resolve_recipe(validate_recipe({
        "model": {"name_or_path": str(model_dir)}, "data": {"path": "bench.json", "max_length": args.max_length},
        "train": {"output_dir": "bench", "batch_size": args.batch_size, "grad_accum": 1},
    }, "bench"))
    longest = max(len(i) for b in batches for i, _ in b)
    estimate = estimate_memory(recipe, model_shape(recipe), longest)
    if "qlora" in results:
        results["qlora"]["memory_estimate_bytes"] = estimate["total"]
    report = {
        "device": device,
        "shape": args.shape,
        "versions": versions(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "settings": {"batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps,
                     "warmup": args.warmup, "data": str(args.data if args.data.is_file() else SAMPLE_DATA),
                     "peak_reserved_bytes_process": reserved if cuda else None},
        "variants": results,
    }
    if {"baseline", "qlora"} <= set(results):
        b, q = results["baseline"], results["qlora"]
        report["ratios"] = {
            "tokens_per_second": q["tokens_per_second"] / b["tokens_per_second"],
            "peak_memory": (q["peak_memory_allocated_bytes"] / b["peak_memory_allocated_bytes"]) if cuda else None,
        }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
