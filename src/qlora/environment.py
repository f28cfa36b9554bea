"""`qlora env`: what this machine runs, paste-ready for a bug report."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("qlora", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "tokenizers",
            "safetensors", "sentencepiece", "liger-kernel", "flash-attn")


def package_versions() -> dict[str, str]:
    """Installed version of each package qlora uses ("not installed" for the optional ones)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def devices() -> list[str]:
    """Each CUDA device with its capability, memory and bf16 support, or the CPU's bf16 support."""
    import torch

    from qlora.plan import cpu_has_native_bf16

    if not torch.cuda.is_available():
        return [f"cpu: {platform.processor() or platform.machine()}, {'native' if cpu_has_native_bf16() else 'emulated'}"
                f" bf16, {torch.get_num_threads()} threads (no CUDA device)"]
    found = []
    for index in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(index)
        bf16 = "bf16" if p.major >= 8 else "no bf16 (fp16 with a loss scaler)"
        found.append(f"cuda:{index}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 1024**3:.1f} GiB, "
                     f"{bf16}")
    return found


def bitsandbytes_backend() -> str:
    import torch

    from qlora.compat import quiet_library_noise

    quiet_library_noise()  # first: bitsandbytes' harmless CPU-kernel warning comes at its import
    import bitsandbytes

    backend = "CUDA" if torch.cuda.is_available() else "CPU"
    return f"{backend} (bitsandbytes {bitsandbytes.__version__})"


def report() -> str:
    """The whole report as plain text lines."""
    import torch

    lines = [f"python: {platform.python_version()} ({platform.platform()})"]
    lines += [f"{name}: {value}" for name, value in package_versions().items()]
    lines.append(f"torch build: CUDA {torch.version.cuda or 'none'}")
    lines.append(f"bitsandbytes backend: {bitsandbytes_backend()}")
    lines += [f"device {line}" for line in devices()]
    return "\n".join(lines)
