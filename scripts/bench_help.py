"""Time `qlora --help` against `trl sft --help`, interleaved, and write the result as JSON.

    python scripts/bench_help.py --runs 10 --out benchmarks/results/cli-help-cpu.json
"""

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {"qlora": ["qlora", "--help"], "trl": ["trl", "sft", "--help"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    times = {name: [] for name in COMMANDS}
    for _ in range(args.runs):  # interleaved, so drift in machine load hits both alike
        for name, command in COMMANDS.items():
            executable = shutil.which(command[0], path=str(bin_dir)) or command[0]
            start = time.perf_counter()
            subprocess.run([executable, *command[1:]], check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    report = {
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "versions": {n: importlib.metadata.version(n) for n in ("qlora", "trl", "typer", "transformers")},
        "median_seconds": medians,
        "all_seconds": times,
        "ratio_qlora_to_trl": medians["qlora"] / medians["trl"],
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
