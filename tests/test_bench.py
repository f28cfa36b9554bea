"""scripts/bench.py runs end to end on CPU with --shape tiny (it claims no speed there) and writes its contract."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tiny_writes_the_documented_report(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--shape", "tiny", "--steps", "5",
                    "--warmup", "1", "--grad-accum", "2", "--memory-steps", "1", "--batch-size", "4",
                    "--max-length", "512", "--workdir", str(tmp_path / "w"), "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert {"device", "shape", "versions", "command", "load_average", "variants", "ratios"} <= set(report)
    baseline, qlora = report["variants"]["baseline"], report["variants"]["qlora"]
    for v in (baseline, qlora):
        assert v["tokens_per_second"] > 0 and v["step_time_s"] > 0 and 0 < v["mfu"] < 1
        assert v["peak_bytes"] >= v["loaded_bytes"] > 0 and v["memory_kind"] == "cpu_rss"
        # where a step's time goes: its phases (the optimizer's only every 2nd micro-batch) and its top operators
        assert set(v["phase_time_s"]) == {"forward", "backward", "optimizer"}
        assert v["phase_time_s"]["optimizer"] < sum(v["phase_time_s"].values()) <= v["step_time_s"]
        ops = v["top_operators"]
        assert len(ops) == 8 and all(o["calls"] > 0 and 0 < o["share"] <= 1 for o in ops)
        assert [o["ms"] for o in ops] == sorted((o["ms"] for o in ops), reverse=True)
    # rows packed best-fit-decreasing into max_length (512 here) pad less than each batch padded to its longest row
    assert qlora["padding_fraction"] < baseline["padding_fraction"]
    # the same first batches (one optimizer step: 2 accumulated) from the same weights: the same losses, whichever
    # way they are computed
    assert all(abs(q - b) / b < 0.01 for q, b in zip(qlora["losses"][:2], baseline["losses"][:2]))
    assert report["settings"]["grad_accum"] == 2 and len(qlora["losses"]) == 5
    assert report["ratios"]["tokens_per_second"] == qlora["tokens_per_second"] / baseline["tokens_per_second"]
    assert report["qlora_check_estimate"]["total_bytes"] > 0 and report["settings"]["matmul_peak_flops"] > 0


def test_bench_upcast_tiny_compares_the_casts_and_checks_the_estimate(tmp_path):
    out = tmp_path / "upcast.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_upcast.py"), "--shape", "tiny", "--steps", "2",
                    "--warmup", "1", "--memory-steps", "1", "--variants", "upcast,norms-fp32",
                    "--workdir", str(tmp_path / "w"), "--out", str(out)], check=True, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    upcast, kept = report["variants"]["upcast"], report["variants"]["norms-fp32"]
    assert set(report["variants"]) == {"upcast", "norms-fp32", "control"}
    assert upcast["frozen_non_4bit_dtypes"] == ["float32"]
    assert set(kept["frozen_non_4bit_dtypes"]) == {"float32", report["settings"]["compute_dtype"]}
    # add_lora leaves what the norms-fp32 variant measures, and `qlora check` estimates exactly that
    assert report["add_lora"]["frozen_non_4bit_bytes"] == kept["frozen_non_4bit_bytes"] \
        == report["qlora_check_unquantized_weights_bytes"]
    for v in (upcast, kept):
        assert v["peak_rss_bytes"] >= v["rss_loaded_bytes"] > 0 and v["tokens_per_second"] > 0
        assert len(v["losses"]) == 2 and v["max_relative_loss_difference_to_reference"] < 0.01


def test_bench_quant_error_orders_the_quantizations(tmp_path):
    out = tmp_path / "q.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quant_error.py"), "--size", "256", "--out",
                    str(out)], check=True, capture_output=True, timeout=300)
    errors = json.loads(out.read_text())["relative_rms_error"]
    assert errors["bfloat16"] < errors["int8"] < errors["nf4_double_quant"] < errors["fp4"]


def test_bench_optimizer_steps_every_optimizer_on_the_real_adapter(tmp_path, smollm2):
    out = tmp_path / "o.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_optimizer.py"), "--model", str(smollm2), "--steps",
                    "3", "--warmup", "1", "--train-steps", "1", "--out", str(out)], check=True, capture_output=True,
                   timeout=600)
    report = json.loads(out.read_text())
    assert report["trainable_parameters"] == 4_884_480  # r=16 on SmolLM2-135M's 7 x 30 linear layers
    optimizers = report["optimizers"]
    assert set(optimizers) == {"adamw_torch", "adamw_torch_fused", "paged_adamw_8bit"}
    assert all(len(o["step_ms_all"]) == 2 for o in optimizers.values()) and len(report["train_step_ms_all"]) == 1
    # 8-bit moments with a float32 scale per 256-block (bitsandbytes' blockwise), against two float32 moments
    assert optimizers["paged_adamw_8bit"]["state_mib"] < optimizers["adamw_torch"]["state_mib"] / 3
