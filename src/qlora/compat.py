"""The library internals qlora overrides, checked when the module overriding them loads.

pyproject pins each library whose private methods qlora overrides to the minor version the tests ran on. A library
outside that range, where a hook is gone or takes other parameters, stops qlora with one line naming the hook and
the tested range, instead of the override silently never being called (the NaN guard vanishing with
`_get_grad_norm`, checkpoints written by the trainer's own pickling code).
"""

from __future__ import annotations

import inspect
import re
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
