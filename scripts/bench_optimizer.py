"""One optimizer step's time on the LoRA adapter of a real model (r=16 on every linear layer), per optimizer,
interleaved in one process (the order rotating), as transformers' Trainer builds each for `qlora train`.

    python scripts/bench_optimizer.py --out benchmarks/results/optimizer-smollm2-135m-1thread-cpu.json
"""

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model directory (default: the SmolLM2-135M that `qlora fetch` caches)")
    p.add_argument("--optimizers", default="paged_adamw_8bit,adamw_torch,adamw_torch_fused")
    p.add_argument("--steps", type=int, default=30, help="steps per optimizer, the first 3 not counted")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    from bench import device_name, versions, write_report  # this directory's: the script's own is first on the path
    from qlora.fetch import cache_root

    model_dir = args.model or str(next((cache_root() / "models").glob("smollm2-135m-*")))
    config = AutoConfig.from_pretrained(model_dir)
    names = args.optimizers.split(",")
    optimizers, times = {}, {n: [] for n in names}
    for name in names:
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_config(config),
                               LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        params = [p for p in model.parameters() if p.requires_grad]
        for param in params:
            param.grad = torch.randn_like(param) * 1e-3
        targs = TrainingArguments(output_dir="/tmp/qlora-bench-unused", optim=name, learning_rate=2e-4,
                                  weight_decay=0.0, use_cpu=True, report_to="none")
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(targs)
        optimizers[name] = (cls(params, **kwargs), f"{cls.__module__}.{cls.__name__}", kwargs, params)
    for index in range(args.steps):
        for name in names[index % len(names):] + names[:index % len(names)]:
            start = time.perf_counter()
            optimizers[name][0].step()
            times[name].append(time.perf_counter() - start)
    params = optimizers[names[0]][3]
    report = {"command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
              "device": device_name(), "versions": versions(), "model": model_dir, "lora_parameters": sum(p.numel() for p in params), "lora_tensors": len(params),
              "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(), "optimizers": {}}
    for name, (optimizer, cls, kwargs, _) in optimizers.items():
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v))
        report["optimizers"][name] = {
            "class": cls, "kwargs": {k: str(v) for k, v in kwargs.items()}, "state_bytes": state,
            "step_ms_median": statistics.median(times[name][3:]) * 1e3, "step_ms_min": min(times[name][3:]) * 1e3,
            f"step_time_ratio_to_{names[0]}_median_paired": statistics.median(
                t / r for t, r in zip(times[name][3:], times[names[0]][3:]))}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
