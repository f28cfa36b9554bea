"""How far each base quantization moves the weights: relative RMS error of NF4 (with and without double
quantization), FP4 and LLM.int8 on the same Gaussian matrix, with bitsandbytes' own (de)quantization functions.

    python scripts/bench_quant_error.py --out benchmarks/results/quant-error-cpu.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import device_name, versions, write_report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096, help="the matrix is size x size")
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of the weights (an LLM's init scale)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import bitsandbytes.functional as F
    import torch

    torch.manual_seed(0)
    w = torch.randn(args.size, args.size) * args.std

    def relative(d):
        return ((d.float() - w).norm() / w.norm()).item()

    errors = {}
    for name, quant_type, nested in (("nf4_double_quant", "nf4", True), ("nf4", "nf4", False), ("fp4", "fp4", True)):
        q, state = F.quantize_4bit(w.to(torch.bfloat16), quant_type=quant_type, compress_statistics=nested)
        errors[name] = relative(F.dequantize_4bit(q, state))
    int8, scales, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    errors["int8"] = relative(F.int8_vectorwise_dequant(int8, scales))
    errors["bfloat16"] = relative(w.to(torch.bfloat16))
    write_report({
        "device": device_name(), "versions": versions(), "load_average": os.getloadavg(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "settings": {"size": args.size, "std": args.std, "seed": 0},
        "relative_rms_error": errors,
    }, args.out)


if __name__ == "__main__":
    main()
