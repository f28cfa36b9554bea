"""The GPU paths, for a user with a CUDA GPU to check a machine: `make test-gpu`.

Every test here is skipped without CUDA, so they have never run on the machines this project is built on (CPU
only). They are written from the libraries' documented behaviour: fp16 with a real GradScaler and bf16 training
and resuming, paged 8-bit AdamW resuming, train.compile's Triton kernels resuming, flash-attention against sdpa, two-GPU DDP and FSDP-QLoRA against one GPU,
merge and --verify on the GPU (a full-precision base spread with device_map="auto"), and `qlora check`'s memory estimate against the
peak the CUDA allocator reserved.
"""

import json
import os
from importlib.util import find_spec

import pytest
import torch

from conftest import recipe_for
from qlora.check import check
from qlora.errors import RunInterrupted
from qlora.merge import merge, verify
from qlora.train import train
from test_distributed import finish, free_port, qlora_train, write_recipe
from test_reliability import ROWS, SignalAt, adapter, metrics

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
CAPABILITY = torch.cuda.get_device_capability(0) if GPUS else (0, 0)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPUS, reason="needs a CUDA GPU: run `make test-gpu` on one")]
needs_ampere = pytest.mark.skipif(CAPABILITY < (8, 0), reason="needs compute capability 8.0 or newer (bf16)")
needs_two = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")


@pytest.fixture(autouse=True)
def one_visible_gpu(monkeypatch):
    """One process trains on one GPU (qlora refuses several visible GPUs in one process): the first."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    if GPUS > 1:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def interrupted_and_resumed(tmp_path, model_dir, train_section=None, **sections):
    """(uninterrupted run, the same run stopped by SIGINT at step 4 and resumed) of 8 steps."""
    def recipe(name):
        (tmp_path / name).mkdir(exist_ok=True)
        return recipe_for(tmp_path / name, model_dir, ROWS, **sections,
                          train={"max_steps": 8, "save_steps": 2, "logging_steps": 1, **(train_section or {})})

    full = train(recipe("full"))
    with pytest.raises(RunInterrupted, match="SIGINT after step 4"):
        train(recipe("resumed"), callbacks=[SignalAt(4)])
    return full, train(recipe("resumed"))


def assert_same_adapter(a_run, b_run, tolerance):
    a, b = adapter(a_run / "adapter"), adapter(b_run / "adapter")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= tolerance


def test_fp16_trains_with_a_real_grad_scaler_and_resumes_exactly(tmp_path, tiny_model):
    full, resumed = interrupted_and_resumed(tmp_path, tiny_model("llama"), quantization={"compute_dtype": "float16"})
    assert (resumed / "checkpoints/checkpoint-8/scaler.json").is_file()  # the GradScaler's state is checkpointed
    assert metrics(full)[-1]["loss"] < metrics(full)[0]["loss"]
    assert_same_adapter(full, resumed, 1e-6)


@needs_ampere
def test_bf16_trains_and_resumes_exactly(tmp_path, tiny_model):
    full, resumed = interrupted_and_resumed(tmp_path, tiny_model("llama"), quantization={"compute_dtype": "bfloat16"})
    assert metrics(full)[-1]["loss"] < metrics(full)[0]["loss"]
    assert_same_adapter(full, resumed, 1e-6)


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizers_train_and_resume_exactly(tmp_path, tiny_model, optimizer):
    full, resumed = interrupted_and_resumed(tmp_path, tiny_model("llama"), {"optimizer": optimizer})
    assert_same_adapter(full, resumed, 1e-6)


@pytest.mark.skipif(find_spec("triton") is None, reason="needs triton (CUDA builds of PyTorch install it)")
def test_compiled_training_on_cuda_resumes_exactly_and_trains_as_eager(tmp_path, tiny_model):
    """train.compile: on with inductor's Triton kernels and its own dropout masks (tests/test_compile.py on CPU)."""
    full, resumed = interrupted_and_resumed(tmp_path, tiny_model("llama"), {"compile": "on"}, lora={"dropout": 0.1})
    assert_same_adapter(full, resumed, 1e-6)
    runs = {}
    for setting in ("off", "on"):  # without dropout: other masks would send the tiny twin's few steps elsewhere
        (tmp_path / setting).mkdir()
        runs[setting] = train(recipe_for(tmp_path / setting, tiny_model("llama"), ROWS, lora={"dropout": 0},
                                         train={"compile": setting, "max_steps": 4, "logging_steps": 1}))
    assert losses_of(runs["on"]) == pytest.approx(losses_of(runs["off"]), rel=0.01)


@needs_ampere
@pytest.mark.skipif(find_spec("flash_attn") is None, reason="needs the flash-attn package")
def test_flash_attention_trains_as_sdpa_does(tmp_path, tiny_model):
    runs = {}
    for kernel in ("sdpa", "flash_attention_2"):
        (tmp_path / kernel).mkdir()
        runs[kernel] = train(recipe_for(tmp_path / kernel, tiny_model("llama"), ROWS,
                                        model={"attn_implementation": kernel},
                                        quantization={"compute_dtype": "bfloat16"},
                                        train={"max_steps": 4, "logging_steps": 1}))
    losses = {k: [m["loss"] for m in metrics(run) if "loss" in m] for k, run in runs.items()}
    assert losses["flash_attention_2"] == pytest.approx(losses["sdpa"], rel=0.02)


def losses_of(run):
    return [m["loss"] for m in metrics(run) if "loss" in m]


@needs_two
@pytest.mark.parametrize("distributed, storage", [("ddp", "uint8"), ("fsdp", "bfloat16")], ids=["ddp", "fsdp-qlora"])
def test_two_gpus_train_as_one_accumulating_the_same_rows(tmp_path, tiny_model, distributed, storage):
    dtype = "bfloat16" if CAPABILITY >= (8, 0) else "float16"
    quantization = f"--set quantization.compute_dtype={dtype} --set quantization.quant_storage={storage}".split()
    one = write_recipe(tmp_path / "one", tiny_model("llama"), max_steps=4, grad_accum=2, save_steps=2,
                       distributed=distributed)
    two = write_recipe(tmp_path / "two", tiny_model("llama"), max_steps=4, grad_accum=1, save_steps=2,
                       distributed=distributed)
    code, err = finish(qlora_train(one, *quantization))  # CUDA_VISIBLE_DEVICES: the first GPU
    assert code == 0, err[-3000:]
    two_gpus = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
    code, err = finish(qlora_train(two, *quantization, "--nproc-per-node", "2", "--master-port", str(free_port()),
                                   env=two_gpus))
    assert code == 0, err[-3000:]
    assert losses_of(tmp_path / "two/run") == pytest.approx(losses_of(tmp_path / "one/run"), rel=0.01)


def test_merge_spreads_the_base_over_the_devices_and_verifies(tmp_path, memorised_run):
    merged = merge(memorised_run, tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    report = verify(memorised_run, merged)
    assert report.passed, report.summary()


def test_the_memory_estimate_is_within_15_percent_of_the_peak_reserved(tmp_path, tiny_model):
    recipe = recipe_for(tmp_path, tiny_model("llama"), ROWS, train={"max_steps": 2, "logging_steps": 1})
    estimate = check(recipe).memory["total"]
    torch.cuda.reset_peak_memory_stats()
    train(recipe)
    peak = torch.cuda.max_memory_reserved()
    assert abs(estimate - peak) <= 0.15 * peak, (estimate, peak)
