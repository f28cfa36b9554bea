"""Rewrite the benchmark tables in docs/performance.md and benchmarks/README.md from benchmarks/results/: training speed and
memory (bench-*.json) and `qlora check`'s memory estimate against the measured parts (memory-*.json)."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GB = 1e9
MIB = 2**20
PARTS = ("weights", "lora_weights_grads_optimizer", "activations", "lm_head_chunk")


def depth(report: dict) -> str:
    """The model's depth, and what differs from the defaults: trained tokens, float32 compute, one thread
    (scripts/bench.py)."""
    layers, command = report["layers"], report["command"]
    tokens = re.search(r"--trained-tokens (\d+)", command)
    return (f"{layers} layer{'s' if layers > 1 else ''}" if layers else "full depth") + \
        (f", {tokens.group(1)} trained tokens" if tokens and tokens.group(1) != "0" else "") + \
        (", float32 compute" if "--compute-dtype float32" in command else "") + \
        (", 1 thread" if report.get("settings", {}).get("torch_threads") == 1 else "")


def cpu(device: str) -> str:
    """The CPU's model without trademarks and core count: 'CPU (Intel(R) Xeon(R) Processor, 2 cores)' -> 'Intel Xeon'."""
    name = re.search(r"\((.*), \d+ cores\)", device).group(1)
    return re.sub(r"\s+", " ", name.replace("(R)", "").replace("Processor", "")).strip()


def speed_row(path: Path) -> str:
    r = json.loads(path.read_text(encoding="utf-8"))
    b, q, ratios, s = r["variants"]["baseline"], r["variants"]["qlora"], r["ratios"], r["settings"]
    loss_gap = max(abs(x - y) / y for x, y in zip(q["losses"], b["losses"]))
    # rows measured before the memory processes fixed glibc's mmap threshold have no such key
    returned = ", freed heap returned" if b.get("malloc_mmap_threshold") else ""
    accumulated = f" (x{s['grad_accum']} accumulated)" if s.get("grad_accum", 1) > 1 else ""  # none: before --grad-accum
    return (f"| [{r['shape']}, {depth(r)}{returned}](benchmarks/results/{path.name}) | {cpu(r['device'])} | "
            f"{s['batch_size']}{accumulated} | "
            f"{b['tokens_per_second']:.1f} / {q['tokens_per_second']:.1f} | **{ratios['tokens_per_second']:.2f}x** | "
            f"{ratios['step_time_median_paired']:.2f} | {b['peak_bytes'] / GB:.2f} / {q['peak_bytes'] / GB:.2f} GB | "
            f"**{ratios['peak_memory']:.2f}x** | {ratios['peak_memory_increase_in_steps']:.2f}x | "
            f"{b['mfu']:.0%} / {q['mfu']:.0%} | {loss_gap:.2%} |")


def compile_row(path: Path) -> str:
    """train.compile against eager qlora and the baseline: the compiling step's extra seconds (the first warm-up step
    of each) and the steps that repay them."""
    r = json.loads(path.read_text(encoding="utf-8"))
    b, q, c, s = r["variants"]["baseline"], r["variants"]["qlora"], r["variants"]["compiled"], r["settings"]
    cost = c["warmup_step_time_s"][0] - q["warmup_step_time_s"][0]
    saved = q["step_time_s"] - c["step_time_s"]
    repaid = f"{cost / saved:.0f}" if saved > 0 else "never"
    loss_gap = max(abs(x - y) / y for x, y in zip(c["losses"], q["losses"]))
    # the first run had only each variant's paired ratio to the baseline
    paired = r["ratios"].get("compiled_to_qlora_step_time_median_paired") or \
        c["step_time_ratio_to_reference_median"] / q["step_time_ratio_to_reference_median"]
    return (f"| [{r['shape']}, {depth(r)}](benchmarks/results/{path.name}) | {cpu(r['device'])} | "
            f"{s['batch_size']} | {b['tokens_per_second']:.1f} / {q['tokens_per_second']:.1f} / "
            f"{c['tokens_per_second']:.1f} | **{c['tokens_per_second'] / b['tokens_per_second']:.2f}x** | "
            f"{c['tokens_per_second'] / q['tokens_per_second']:.2f}x | "
            f"{paired:.2f} | "
            f"{cost:.0f} s | {repaid} | {q['peak_bytes'] / GB:.2f} / {c['peak_bytes'] / GB:.2f} GB | {loss_gap:.2%} | "
            f"{r['load_average'][1]:.1f} |")


def memory_row(path: Path) -> str:
    r = json.loads(path.read_text(encoding="utf-8"))
    m = r["estimate_vs_measured"]
    batch = re.search(r"--batch-size (\d+)", r["command"]).group(1)
    cells = [f"{m[p]['measured'] / MIB:.0f} / {m[p]['estimate'] / MIB:.0f} ({m[p]['ratio'] - 1:+.0%})" for p in PARTS]
    return f"| [{r['shape']}, {depth(r)}](benchmarks/results/{path.name}) | {batch} | {m['tokens']} | " + \
        " | ".join(cells) + " |"


TABLES = {
    "bench-table": lambda: "\n".join([
        "| shape (random weights, real dimensions) | CPU | batch | tokens/s baseline / qlora | speed-up | paired step "
        "time ratio (median) | peak RSS baseline / qlora | memory ratio | ratio of what steps add | MFU baseline / "
        "qlora | largest loss gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *map(speed_row, sorted(RESULTS.glob("bench-*-cpu.json"))),
    ]),
    "compile-table": lambda: "\n".join([
        "| shape (random weights, real dimensions) | CPU | batch | tokens/s baseline / qlora / compiled | compiled vs "
        "baseline | compiled vs qlora | paired step time ratio compiled / qlora (median) | compiling step's extra "
        "time | steps to repay it | peak RSS qlora / compiled | largest loss gap to qlora | load (5 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *map(compile_row, sorted(p for p in RESULTS.glob("bench-*-cpu.json")
                                 if "compiled" in json.loads(p.read_text(encoding="utf-8"))["variants"])),
    ]),
    "memory-table": lambda: "\n".join([
        "| shape (random weights, real dimensions) | batch | tokens in the step | weights MiB measured / estimated "
        "(error) | LoRA weights, gradients, optimizer | activations | LM head and loss |",
        "|---|---|---|---|---|---|---|",
        *map(memory_row, sorted(RESULTS.glob("memory-*-cpu.json"))),
    ]),
}


def main() -> None:
    for readme, prefix in ((ROOT / "docs" / "performance.md", "../"), (ROOT / "benchmarks" / "README.md", "../")):
        text = readme.read_text(encoding="utf-8")
        for name, table in TABLES.items():
            start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
            block = f"{start}\n{table()}\n{end}".replace("](benchmarks/", f"]({prefix}benchmarks/")
            text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
        readme.write_text(text, encoding="utf-8")
        print(f"updated {readme}")


if __name__ == "__main__":
    main()
