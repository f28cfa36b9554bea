"""Side-by-side training throughput and memory: the seed notebooks' QLoRA setup vs qlora's own training step.

    python scripts/bench.py --shape gemma-2b --layers 2 --batch-size 4 --out benchmarks/results/gemma-2b-2l-b4-cpu.json

A random model with the shape's real dimensions (`--layers` decoder layers of it, or all) is saved once under
--workdir, loaded in 4-bit NF4 with double quantization and wrapped with LoRA r=16 on all linear layers, once per
variant. The variants train on the same batches of real code_alpaca lengths in ONE process, interleaved step by
step (the order alternating), warm-up steps excluded; each variant's peak memory is measured in a fresh process.
benchmarks/README.md explains every number (the FLOPs formula included).

- baseline: what the seed notebooks do with HF + PEFT + TRL defaults: peft's float32 upcast, every micro-batch
  padded to its longest row, the model's own loss over full logits, reentrant gradient checkpointing, AdamW,
  autocast to the compute dtype.
- qlora: what `qlora train` runs: qlora.model's loader and add_lora (embedding and head in bf16 with bf16 compute),
  micro-batches packed best-fit-decreasing into rows (qlora.collate), qlora.loss (the head only at trained positions, fused with its gradient),
  non-reentrant checkpointing, the recipe's optimizer (paged 8-bit AdamW, as the seed recipes), the same autocast.
- compiled: qlora with `train.compile: on` (qlora.compile: each decoder layer's attention and MLP blocks compiled).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import ctypes
import json
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
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
    # small enough to train at full depth on a CPU
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         tie_word_embeddings=True)),
    "smollm2-360m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=960, intermediate_size=2560,
                                         num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                                         tie_word_embeddings=True)),
    "tiny": None,  # qlora.tiny's Gemma: runs on CPU in seconds; claims no speed
}
VARIANTS = ("baseline", "qlora", "compiled")
MALLOC_MMAP_THRESHOLD = 65536  # bytes: a freed block at least this large goes back to the system at once


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, required=True)
    p.add_argument("--layers", type=int, help="decoder layers (default: all of the shape's)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "code_alpaca_2k.json",
                   help="Alpaca-style JSON list whose real lengths are used (default: the shared code_alpaca_2k; "
                        "falls back to our sample data when absent)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step, as a recipe's train.grad_accum (the seed recipes take 16 "
                        "sequences per optimizer step); a timed step is one micro-batch")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--trained-tokens", type=int, default=0,
                   help="qlora trains this many added special tokens' rows too (lora.trained_tokens)")
    p.add_argument("--steps", type=int, default=10, help="steps per variant, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    p.add_argument("--memory-steps", type=int, default=3, help="steps of each variant's fresh memory process")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--profile-ops", type=int, default=8,
                   help="after the timed steps, profile one more step of each variant and report its N most "
                        "time-consuming operators (0: none)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench"), help="where random weights are cached")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--memory-only", action="store_true",
                   help="measure each variant's memory (and qlora's by part against `qlora check`), not its speed")
    p.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # the fresh memory process
    args = p.parse_args()
    if args.grad_accum < 1 or (args.steps - args.warmup) % args.grad_accum:
        p.error(f"--steps minus --warmup ({args.steps} - {args.warmup}) must be a multiple of --grad-accum "
                f"({args.grad_accum}), so that the timed steps hold whole optimizer steps")
    return args


def build_examples(path: Path, max_length: int, vocab: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every valid row, tokenized by qlora's tiny Gemma tokenizer, ids folded into `vocab`."""
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


def recipe_for(model_dir: Path, args, **train):
    """qlora's defaults for the model, as `qlora train` resolves them on this machine, with what users run on a
    GPU: paged 8-bit AdamW and --compute-dtype (bf16 by default; auto would pick float32 on a CPU without
    AVX512-BF16, where emulated bf16 is slow)."""
    from qlora.config import validate_recipe
    from qlora.plan import resolve_recipe

    return resolve_recipe(validate_recipe({
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"compute_dtype": args.compute_dtype},
        "lora": {"trained_tokens": [f"<|bench_{i}|>" for i in range(args.trained_tokens)]},
        "data": {"path": "bench.json", "max_length": args.max_length},
        "train": {"output_dir": "bench", "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                  "optimizer": "paged_adamw_8bit", **train},
    }, "bench"))


def optimizer_for(recipe, params):
    """The recipe's optimizer, built by transformers' Trainer exactly as `qlora train` builds it."""
    from transformers import Trainer, TrainingArguments

    t = recipe.train
    args = TrainingArguments(output_dir="/tmp/qlora-bench-unused", optim=t.optimizer, learning_rate=t.learning_rate,
                             weight_decay=t.weight_decay, use_cpu=True, report_to="none")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return cls(params, **kwargs)


def load_variant(model_dir: Path, variant: str, args):
    """(model, step function, optimizer) of a variant; the step function takes a list of (input_ids, labels) and,
    optionally, `phase`: a context manager factory wrapped around the step's "forward", "backward" and "optimizer"
    phases, and `update`: whether this micro-batch ends an optimizer step (the loss is scaled by 1/grad_accum, as
    transformers' Trainer does)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, set_seed
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qlora.collate import PackedCollator
    from qlora.loss import add_trained_token_loss
    from qlora.model import add_lora, load_quantized_base
    from qlora.plan import device_map, get_lora_config, get_quantization_config, torch_dtype
    from qlora.tiny import build_tokenizer

    recipe = recipe_for(model_dir, args)
    compute = torch_dtype(recipe.quantization.compute_dtype)
    set_seed(recipe.train.seed)  # the same adapter initialisation in both variants
    if variant == "baseline":
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=get_quantization_config(recipe.quantization), dtype=compute,
            attn_implementation="sdpa", device_map=device_map())
        model.config.use_cache = False
        model = get_peft_model(prepare_model_for_kbit_training(model), get_lora_config(recipe.lora))  # reentrant
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=recipe.train.learning_rate)
        collate = DataCollatorForLanguageModeling(pad_token_id=0)

        def loss_of(batch):
            return model(**batch).loss
    else:
        model = add_lora(load_quantized_base(recipe), recipe, build_tokenizer("gemma"))  # the data's tokenizer
        model.enable_input_require_grads()  # as the trainer does for checkpointing
        if variant == "compiled":
            from qlora.compile import compile_blocks

            compile_blocks(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = optimizer_for(recipe, params)
        collate = PackedCollator(pad_token_id=0, capacity=args.max_length)
        add_trained_token_loss(model.get_base_model())

        def loss_of(batch):
            total, count = model(**batch, qlora_loss=True)
            return total / count

    device = next(model.parameters()).device
    model.train()

    def step(examples, phase=lambda name: contextlib.nullcontext(), update=True):
        batch = collate([{"input_ids": i, "labels": l} for i, l in examples])
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        with phase("forward"), torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
            loss = loss_of(batch)
        with phase("backward"):
            (loss / args.grad_accum).backward()
        if update:
            with phase("optimizer"):
                torch.nn.utils.clip_grad_norm_(params, recipe.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return loss.item(), sum(len(i) for i, _ in examples), batch["input_ids"].numel()

    return model, step, optimizer


class PhaseTimer:
    """A `phase` factory for the step function that adds up the seconds spent in each phase."""

    def __init__(self):
        self.seconds = collections.Counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        import torch

        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels run asynchronously: a phase ends when its kernels have
        self.seconds[name] += time.perf_counter() - start


def top_operators(step, batch, count: int) -> list[dict]:
    """The `count` operators that took the most time of one profiled training step (their own time, without the
    operators they call: on the GPU where there is one), with the step's total for scale."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        step(batch)
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    ops = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total = sum(own(e) for e in ops)
    return [{"operator": e.key, "calls": e.count, "ms": own(e) / 1e3, "share": own(e) / total}
            for e in sorted(ops, key=own, reverse=True)[:count]]


def estimate_vs_measured(recipe, shape, measured: dict) -> dict:
    """`qlora check`'s estimate for the measured micro-batch's tokens next to the measured bytes, part by part."""
    from qlora.check import estimate_memory

    parts = estimate_memory(recipe, shape, measured["step_tokens"], measured["step_trained_tokens"])["parts"]
    weights = ("nf4_weights", "quantization_constants", "unquantized_weights")
    pairs = {
        "weights": (sum(parts[k] for k in weights), sum(measured[k] for k in weights)),
        **{k: (parts[k], measured[k]) for k in weights},
        "lora_weights_grads_optimizer": (parts["lora_weights_grads_optimizer"], measured["lora_weights"]
                                         + measured["lora_gradients"] + measured["lora_optimizer_state"]),
        # the whole embedding's gradient of lora.trained_tokens comes at the end of backward, among the activations
        "activations": (parts["activations"] + parts.get("trained_token_embedding_gradient", 0),
                        measured["activations"]),
        "lm_head_chunk": (parts["lm_head_chunk"], measured["lm_head_loss"]),
    }
    return {"tokens": measured["step_tokens"], "trained_tokens": measured["step_trained_tokens"],
            **{k: {"estimate": e, "measured": m, "ratio": e / m} for k, (e, m) in pairs.items()}}


def proc_status_bytes(field: str) -> int:
    """A VmRSS / VmHWM figure of this process, in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) * 1024


def reset_peak_rss() -> int:
    """Hand freed heap back to the system and reset VmHWM to the current RSS, which is returned."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_bytes("VmRSS")


def measure_memory(model_dir: Path, batches, args) -> dict:
    """Peak memory of a variant's first steps, in this fresh process: RSS on CPU (VmHWM, reset once the model is
    loaded, so loading does not count), allocated bytes on CUDA."""
    import torch

    model, step, optimizer = load_variant(model_dir, args.memory_of, args)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    else:
        loaded = reset_peak_rss()
    for index, batch in enumerate(batches[:args.memory_steps]):  # the last one updates, so optimizer state counts
        step(batch, update=(index + 1) % args.grad_accum == 0 or index + 1 == args.memory_steps)
    peak = torch.cuda.max_memory_allocated() if cuda else proc_status_bytes("VmHWM")
    memory = {"memory_kind": "cuda_allocated" if cuda else "cpu_rss", "loaded_bytes": loaded, "peak_bytes": peak,
              "peak_increase_in_steps_bytes": peak - loaded,
              "malloc_mmap_threshold": int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 0)) or None}
    if args.memory_of == "qlora":
        grads = {}
        optimizer.register_step_pre_hook(lambda *_: grads.update(
            lora_gradients=sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)))
        memory["parts"] = (tensor_bytes(model, optimizer)
                           | step_allocations(model, step, batches[args.memory_steps % len(batches)]) | grads)
    return memory


def tensor_bytes(model, optimizer) -> dict[str, int]:
    """What the loaded model and the optimizer hold, by the parts of `qlora check`'s estimate, summed over the
    tensors themselves (each storage once): NF4 weights, their quantization constants, the weights left
    unquantized, and the LoRA weights with their optimizer state."""
    import bitsandbytes as bnb

    seen, parts = set(), {"nf4_weights": 0, "quantization_constants": 0, "unquantized_weights": 0,
                          "lora_weights": 0, "lora_optimizer_state": 0}

    def add(part, tensor):
        if tensor is not None and tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            parts[part] += tensor.untyped_storage().nbytes()

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(tensor, bnb.nn.Params4bit):
            add("nf4_weights", tensor)
            state = tensor.quant_state
            for constant in (state.absmax, state.code, state.offset, *((state.state2.absmax, state.state2.code)
                                                                        if state.nested else ())):
                add("quantization_constants", constant)
        else:
            add("lora_weights" if "lora_" in name else "unquantized_weights", tensor)
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "untyped_storage"):
                add("lora_optimizer_state", value)
    return parts


def step_allocations(model, step, batch) -> dict[str, int]:
    """Bytes the torch allocator hands out during one training step, by part, from the profiler's allocation
    events: `activations`, what the backbone keeps from its forward pass for backward plus the most that backward's
    recomputation adds on top; `lm_head_loss`, the loss's peak above what the backbone returned (qlora.loss's chunk
    of logits, the gathered hidden states and their gradient); `step_peak`, the peak over the whole step; each
    relative to the step's start."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = torch.cuda.is_available()
    device_type = torch._C._autograd.DeviceType.CUDA if cuda else torch._C._autograd.DeviceType.CPU
    base = model.get_base_model()
    backbone = getattr(base, base.base_model_prefix)
    body = record_function("backbone")
    hooks = [backbone.register_forward_pre_hook(lambda *_: body.__enter__() and None),
             backbone.register_forward_hook(lambda *_: body.__exit__(None, None, None))]
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities, profile_memory=True) as prof:
        _, _, tokens = step(batch, phase=record_function)
    for hook in hooks:
        hook.remove()
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    ranges = {e.name(): (e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
              if e.name() in ("forward", "backbone", "backward", "optimizer")}
    times, levels, live = [], [], 0
    for e in events:
        if e.name() == "[memory]" and e.device_type() == device_type:
            live += e.nbytes()
            times.append(e.start_ns())
            levels.append(live)

    def level_at(t):
        index = bisect.bisect_right(times, t)
        return levels[index - 1] if index else 0

    def peak_in(start, end):
        return max(levels[bisect.bisect_left(times, start):bisect.bisect_right(times, end)], default=level_at(start))

    forward, backbone_range, backward = ranges["forward"], ranges["backbone"], ranges["backward"]
    kept = level_at(backbone_range[1])
    head_kept = max(0, level_at(forward[1]) - kept)  # the loss's saved input gradient, freed early in backward
    in_backward = peak_in(*backward) - head_kept
    return {
        "activations": max(kept, in_backward),
        "activations_after_forward": kept,
        "activations_in_backward": in_backward,
        "lm_head_loss": peak_in(backbone_range[1], forward[1]) - kept,
        "step_peak": max(levels),
        "step_tokens": tokens,  # padding included: the tokens every layer computes
        "step_trained_tokens": sum(sum(label != -100 for label in labels[1:]) for _, labels in batch),
    }


def memory_in_fresh_process(name: str, script: str = __file__) -> dict:
    """`script` run again with this command's arguments and `--memory-of name`: its last stdout line, as JSON."""
    argv = sys.argv[1:]
    if "--out" in argv:
        del argv[argv.index("--out"):argv.index("--out") + 2]
    # by default, once a block glibc mapped is freed, it serves later blocks up to that size (at most 32 MiB) from a
    # heap that keeps them when freed, and the peak RSS counts gigabytes no tensor holds (SmolLM2 dims, float32)
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD)}
    result = subprocess.run([sys.executable, script, *argv, "--memory-of", name], capture_output=True, text=True,
                            env=env)
    if result.returncode:
        sys.exit(f"the memory process of {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def matmul_peak_flops(compute_dtype: str) -> tuple[float, str]:
    """This device's measured dense matmul throughput in the run's compute dtype (the best of twenty 2048^3
    products): the denominator of MFU, since a CPU has no published bf16 peak. Twenty, not a few: an Intel CPU's AMX
    units reach their throughput only after several products (measured: 0.5 then 1.5-3.2 TFLOPs)."""
    import torch

    from qlora.plan import torch_dtype

    dtype = torch_dtype(compute_dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(2048, 2048, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(20):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best, str(dtype).removeprefix("torch.")


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


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return f"CPU ({model.group(1) if model else platform.machine()}, {os.cpu_count()} cores)"


def write_report(report: dict, out: Path | None) -> None:
    """Print the report as JSON, and write it to `out` when given."""
    text = json.dumps(report, indent=1)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


def batches_for(model_dir: Path, args):
    from transformers import AutoConfig

    examples = build_examples(args.data, args.max_length, AutoConfig.from_pretrained(model_dir).vocab_size)
    random.Random(0).shuffle(examples)
    n, size = len(examples), args.batch_size
    return [[examples[(i * size + j) % n] for j in range(size)] for i in range(max(args.steps, args.memory_steps))]


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = save_random_model(args.shape, args.workdir, args.layers)
    batches = batches_for(model_dir, args)
    if args.memory_of:
        print(json.dumps(measure_memory(model_dir, batches, args)))
        return

    import torch

    from qlora.check import estimate_memory, model_shape

    names = args.variants.split(",")
    memory = {}
    for name in names:
        memory[name] = memory_in_fresh_process(name)
        print(f"{name}: {memory[name]}", file=sys.stderr)
    recipe = recipe_for(model_dir, args)
    shape = model_shape(recipe)
    longest = max(len(i) for b in batches[:args.memory_steps] for i, _ in b)
    estimate = estimate_memory(recipe, shape, args.batch_size * longest)
    report = {
        "device": device_name(),
        "shape": args.shape,
        "layers": args.layers,
        "versions": versions(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "qlora_check_estimate": {"total_bytes": estimate["total"], "parts": estimate["parts"],
                                 "longest_example": longest},
    }
    if "parts" in memory.get("qlora", {}):
        report["estimate_vs_measured"] = estimate_vs_measured(recipe, shape, memory["qlora"]["parts"])
    if args.memory_only:
        write_report(report | {"load_average": os.getloadavg(), "variants": memory}, args.out)
        return
    steps = {name: load_variant(model_dir, name, args)[1] for name in names}
    times = {name: [] for name in names}
    warmup_times = {name: [] for name in names}
    losses = {name: [] for name in names}
    padded = {name: 0 for name in names}
    phases = {name: PhaseTimer() for name in names}
    real_tokens = 0
    for index, batch in enumerate(batches[:args.steps]):
        for name in names[index % len(names):] + names[:index % len(names)]:  # no variant always goes first
            timed = {"phase": phases[name]} if index >= args.warmup else {}
            start = time.perf_counter()
            loss, real, total = steps[name](batch, update=(index + 1) % args.grad_accum == 0, **timed)
            elapsed = time.perf_counter() - start
            losses[name].append(loss)
            if index >= args.warmup:
                times[name].append(elapsed)
                padded[name] += total
            else:
                warmup_times[name].append(elapsed)
        if index >= args.warmup:
            real_tokens += real
        print(f"step {index + 1}/{args.steps}: " + ", ".join(
            f"{n} {(times[n] if index >= args.warmup else warmup_times[n])[-1]:.2f}s" for n in names), file=sys.stderr)

    profiles = {name: top_operators(steps[name], batches[args.warmup], args.profile_ops)
                for name in names if args.profile_ops}
    dims, linear_params = model_dims(model_dir)
    peak_flops, peak_dtype = matmul_peak_flops(recipe.quantization.compute_dtype)
    flops = sum(flops_per_sequence(dims, linear_params, len(i)) for b in batches[args.warmup:args.steps] for i, _ in b)
    reference = names[0]
    results = {}
    for name in names:
        seconds = sum(times[name])
        results[name] = {
            **memory[name],
            "tokens_per_second": real_tokens / seconds,
            "step_time_s": statistics.mean(times[name]),
            "step_time_s_stdev": statistics.pstdev(times[name]),
            "warmup_step_time_s": warmup_times[name],
            "step_times_s": times[name],
            "phase_time_s": {phase: seconds / len(times[name]) for phase, seconds in phases[name].seconds.items()},
            "step_time_ratio_to_reference_median": statistics.median(
                t / r for t, r in zip(times[name], times[reference])),
            "padding_fraction": 1 - real_tokens / padded[name],
            "mfu": flops / seconds / peak_flops,
            "losses": losses[name],
            **({"top_operators": profiles[name]} if name in profiles else {}),
        }
    report |= {
        "load_average": os.getloadavg(),
        "settings": {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_length": args.max_length,
                     "steps": args.steps,
                     "warmup": args.warmup, "memory_steps": args.memory_steps,
                     "compute_dtype": recipe.quantization.compute_dtype, "torch_threads": torch.get_num_threads(),
                     "data": str(args.data if args.data.is_file() else SAMPLE_DATA),
                     "tokens_per_step_mean": real_tokens / max(1, args.steps - args.warmup),
                     "matmul_peak_flops": peak_flops, "matmul_peak_dtype": peak_dtype},
        "variants": results,
    }
    if {"baseline", "qlora"} <= set(results):
        b, q = results["baseline"], results["qlora"]
        report["ratios"] = {
            "tokens_per_second": q["tokens_per_second"] / b["tokens_per_second"],
            "step_time_median_paired": q["step_time_ratio_to_reference_median"] if reference == "baseline" else None,
            "peak_memory_increase_in_steps": q["peak_increase_in_steps_bytes"] / b["peak_increase_in_steps_bytes"],
            "peak_memory": q["peak_bytes"] / b["peak_bytes"],
        }
    if {"qlora", "compiled"} <= set(results):
        report.setdefault("ratios", {})["compiled_to_qlora_step_time_median_paired"] = statistics.median(
            c / q for c, q in zip(times["compiled"], times["qlora"]))
    write_report(report, args.out)


if __name__ == "__main__":
    main()
