"""The library internals qlora overrides, checked when the module overriding them loads.

pyproject pins each library whose private methods qlora overrides to the minor version the tests ran on. A library
outside that range, where a hook is gone or takes other parameters, stops qlora with one line naming the hook and
the tested range, instead of the override silently never being called (the NaN guard vanishing with
`_get_grad_norm`, checkpoints written by the trainer's own pickling code).
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import warnings
from importlib.metadata import PackageNotFoundError, requires, version

from qlora.errors import RunFailed


def pinned_range(package: str) -> str:
    """The version range qlora's pyproject gives `package` (e.g. ">=5.25,<5.26"), or "" when qlora is not installed."""
    try:
        specs = requires("qlora") or []
    except PackageNotFoundError:
        return ""
    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    for spec in specs:
        name, versions = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", spec.split(";")[0].strip()).groups()
        if canonical(name) == canonical(package):
            return versions.replace(" ", "")
    return ""


def require_hooks(base: type, subclass: type, package: str) -> None:
    """Every private method `subclass` defines must exist on `base` with the same parameters; RunFailed otherwise."""
    for name, ours in vars(subclass).items():
        if not name.startswith("_") or name.startswith("__") or not inspect.isfunction(ours):
            continue
        theirs = getattr(base, name, None)
        if theirs is None:
            problem = "is gone"
        elif list(inspect.signature(theirs).parameters) != list(inspect.signature(ours).parameters):
            problem = f"takes {inspect.signature(theirs)}, not {inspect.signature(ours)}"
        else:
            continue
        raise RunFailed(f"{package} {version(package)}: {base.__name__}.{name} {problem}, and qlora overrides it; "
                        f"install the range qlora is tested with: pip install '{package}{pinned_range(package)}'")


@functools.cache  # filters and levels are process-wide: set once
def quiet_library_noise() -> None:
    """Silence the libraries' messages that are noise on every run (each said once, its reason beside it); called
    before a model loads and by the CLI."""
    # bitsandbytes, at import on CPUs with AVX512-BF16, fetches an optional kernel from the kernels hub and warns when
    # it cannot (kernels absent, hub offline, untrusted); it falls back to its own kernel, so that is noise on every
    # run, as is kernels' own warning that offline it skips that kernel's publisher check
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("kernels._internals.hf_hub").addFilter(
        lambda record: "kernels-community/quantization-bitsandbytes" not in record.getMessage())
    # bitsandbytes runs a paged optimizer unpaged on CPU, warning at its first step; `train` says so in its device
    # line
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)
    # peft still calls transformers' gradient_checkpointing_* names, renamed in transformers 5: noise on every run
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing.*` is deprecated",
                            category=FutureWarning)
