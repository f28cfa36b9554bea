"""Rewrite the training-benchmark tables in README.md and benchmarks/README.md from benchmarks/results/bench-*.json."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
GB = 1e9


def row(path: Path) -> str:
    r = json.loads(path.read_text(encoding="utf-8"))
    b, q, ratios, s = r["variants"]["baseline"], r["variants"]["qlora"], r["ratios"], r["settings"]
    depth = f"{r['layers']} layer{'s' if r['layers'] > 1 else ''}" if r["layers"] else "full depth"
    loss_gap = max(abs(x - y) / y for x, y in zip(q["losses"], b["losses"]))
    return (f"| [{r['shape']}, {depth}](benchmarks/results/{path.name}) | {s['batch_size']} | "
            f"{b['tokens_per_second']:.1f} / {q['tokens_per_second']:.1f} | **{ratios['tokens_per_second']:.2f}x** | "
            f"{ratios['step_time_median_paired']:.2f} | {b['peak_bytes'] / GB:.2f} / {q['peak_bytes'] / GB:.2f} GB | "
            f"**{ratios['peak_memory']:.2f}x** | {ratios['peak_memory_increase_in_steps']:.2f}x | "
            f"{b['mfu']:.0%} / {q['mfu']:.0%} | {loss_gap:.2%} |")


def table() -> str:
    paths = sorted((ROOT / "benchmarks" / "results").glob("bench-*-cpu.json"))
    return "\n".join([
        "| shape (random weights, real dimensions) | batch | tokens/s baseline / qlora | speed-up | paired step "
        "time ratio (median) | peak RSS baseline / qlora | memory ratio | ratio of what steps add | MFU baseline / "
        "qlora | largest loss gap |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *map(row, paths),
    ])


def main() -> None:
    block = f"{START}\n{table()}\n{END}"
    for readme, prefix in ((ROOT / "README.md", ""), (ROOT / "benchmarks" / "README.md", "../")):
        text = readme.read_text(encoding="utf-8")
        new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block.replace("](benchmarks/", f"]({prefix}benchmarks/"),
                     text, flags=re.S)
        readme.write_text(new, encoding="utf-8")
        print(f"updated {readme}")


if __name__ == "__main__":
    main()
