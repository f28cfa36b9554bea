"""scripts/bench.py runs end to end on CPU with --shape tiny (it claims no speed there) and writes its contract."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tiny_writes_the_documented_report(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--shape", "tiny", "--steps", "2",
                    "--warmup", "1", "--batch-size", "4", "--max-length", "512", "--workdir", str(tmp_path / "w"),
                    "--out", str(out)], check=True, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert {"device", "shape", "versions", "command", "variants", "ratios"} <= set(report)
    baseline, qlora = report["variants"]["baseline"], report["variants"]["qlora"]
    for v in (baseline, qlora):
        assert v["tokens_per_second"] > 0 and v["step_time_s"] > 0
    assert qlora["padding_fraction"] == 0 < baseline["padding_fraction"]
    assert abs(qlora["final_loss"] - baseline["final_loss"]) / baseline["final_loss"] < 0.01  # same data, same loss
    assert report["ratios"]["tokens_per_second"] == qlora["tokens_per_second"] / baseline["tokens_per_second"]
    assert qlora["memory_estimate_bytes"] > 0
