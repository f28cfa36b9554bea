"""llama.cpp's stock HF -> GGUF converter, run as shipped, and the reference vocabularies it ships.

The llama-cpp-python source distribution on PyPI vendors llama.cpp whole. We fetch it with pip (no build)
and keep only what the converter runs on (convert_hf_to_gguf.py, its `conversion` package, gguf-py) and the
real fixtures llama.cpp tests itself with: the vocabularies it tests its tokenizers against
(models/ggml-vocab-*.gguf) and real models' chat templates, cached per version outside any repo.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from rich.console import Console

from qlora.errors import RunFailed, UserError
from qlora.fetch import cache_root, last_line, pip_download
from qlora.progress import run_tool

console = Console(stderr=True)

# Pinned: the converter's architectures and its table of known BPE tokenizers change from release to release.
LLAMA_CPP_PYTHON = "0.3.36"
CONVERTER = "convert_hf_to_gguf.py"
# What the converter imports (relative to vendor/llama.cpp/), and llama.cpp's real test fixtures: every vocabulary
# with its reference tokenizations (models/ggml-vocab-*.gguf, .inp/.out), the chat templates of ~70 models
# (models/templates/*.jinja) and the older ones its template test holds inline (tests/test-chat-template.cpp).
# 80 MB is unpacked (it was 9.5 MB with two vocabularies): the 19 vocabularies are 78 MB; C++ sources are left out.
KEEP = (CONVERTER, "LICENSE", "conversion/", "gguf-py/gguf/", "gguf-py/LICENSE", "models/ggml-vocab-",
        "models/templates/", "tests/test-chat-template.cpp")


def default_cache() -> Path:
    """Where the converter is unpacked: qlora's cache (fetch.cache_root)/llama.cpp-<llama-cpp-python version>-<KEEP
    digest>, so a tree unpacked with other KEEP files is never taken for one holding these."""
    keep = hashlib.sha256("\n".join(KEEP).encode()).hexdigest()[:8]
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON}-{keep}"


def _unpack(sdist: Path, target: Path) -> None:
    """Copy the KEEP files of the sdist's vendor/llama.cpp into `target` (regular files only, no links)."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        for member in tar:
            name = member.name[len(prefix):] if member.name.startswith(prefix) else ""
            if not member.isfile() or not name.startswith(KEEP) or ".." in Path(name).parts:
                continue
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)


def llama_cpp_dir(cache: str | Path | None = None) -> Path:
    """A llama.cpp tree holding the stock converter and gguf-py: $LLAMA_CPP_DIR, or the pinned sdist, fetched once.

    Raises:
        UserError: LLAMA_CPP_DIR is set but holds no convert_hf_to_gguf.py.
        RunFailed: pip could not fetch the sdist (no registry reachable); the message ends with pip's error.
    """
    if os.environ.get("LLAMA_CPP_DIR"):
        path = Path(os.environ["LLAMA_CPP_DIR"]).expanduser()
        if not (path / CONVERTER).is_file():
            raise UserError(f"LLAMA_CPP_DIR={path} holds no {CONVERTER}: point it at a llama.cpp checkout or unset it")
        return path
    target = Path(cache) if cache else default_cache()
    if (target / CONVERTER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        console.print(f"Downloading llama-cpp-python {LLAMA_CPP_PYTHON} source from PyPI (~77 MB, no build) "
                      f"for llama.cpp's converter; unpacking into {target}")
        sdist = pip_download(f"llama-cpp-python=={LLAMA_CPP_PYTHON}", Path(tmp), sdist=True,
                             hint="set LLAMA_CPP_DIR to a llama.cpp checkout")
        unpacked = Path(tmp) / "llama.cpp"
        _unpack(sdist, unpacked)
        try:
            unpacked.rename(target)
        except OSError:  # another process unpacked it first: theirs is as good as ours
            if not (target / CONVERTER).is_file():
                raise
    return target


def convert(model_dir: str | Path, outfile: str | Path, outtype: str = "f16", llama_cpp: Path | None = None) -> Path:
    """Convert a Hugging Face model directory to GGUF with llama.cpp's stock converter, no other flags.

    The file is written to a temporary sibling and renamed, so `outfile` is either whole or absent.

    Raises:
        RunFailed: the converter refused the model; the message ends with its last error line.
    """
    llama_cpp = llama_cpp or llama_cpp_dir()
    outfile = Path(outfile)
    tmp = outfile.with_name(outfile.name + ".tmp")
    console.print(f"converting {model_dir} to {outtype} GGUF with llama.cpp's {CONVERTER}")
    # the converter puts its own gguf-py first on sys.path, ahead of any installed `gguf`
    result = run_tool(
        [sys.executable, str(llama_cpp / CONVERTER), str(model_dir), "--outfile", str(tmp), "--outtype", outtype],
        console, "converting")
    if result.returncode:
        tmp.unlink(missing_ok=True)
        raise RunFailed(f"llama.cpp's {CONVERTER} could not convert {model_dir}: {last_line(result.stderr)}")
    tmp.rename(outfile)
    return outfile


def gguf_reader(path: str | Path, llama_cpp: Path | None = None):
    """gguf-py's GGUFReader (the copy vendored with the converter) opened on `path`."""
    gguf_py = str((llama_cpp or llama_cpp_dir()) / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    from gguf import GGUFReader

    return GGUFReader(path)


def real_bpe_vocab(name: str, llama_cpp: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The regular vocabulary and merges of a real byte-level BPE tokenizer that llama.cpp ships for its tests.

    `name` picks models/ggml-vocab-<name>.gguf: "gpt-2" (GPT-2's, which Phi-2 extends with added whitespace
    tokens) or "qwen2" (Qwen1.5/2/2.5's). Added and control tokens (<|endoftext|>, ...) are left out: the caller
    adds its family's, after the regular vocabulary as the real tokenizer does. A BPE twin built from these
    passes the converter's check that it tokenizes a fixed text exactly like a known model, which a locally
    trained BPE never does. Read once (~12 s for qwen2's 151k tokens), then from a JSON copy next to the file.

    Raises:
        UserError: llama.cpp ships no vocabulary of that name.
    """
    models = (llama_cpp or llama_cpp_dir()) / "models"
    source, cached = models / f"ggml-vocab-{name}.gguf", models / f"ggml-vocab-{name}.bpe.json"
    if not cached.is_file():
        if not source.is_file():
            shipped = sorted(p.name[len("ggml-vocab-"):-len(".gguf")] for p in models.glob("ggml-vocab-*.gguf"))
            raise UserError(f"llama.cpp ships no vocabulary {name!r}: choose one of {', '.join(shipped)}")
        fields = gguf_reader(source, llama_cpp).fields
        if fields["tokenizer.ggml.model"].contents() != "gpt2":
            raise UserError(f"{source.name} is not a byte-level BPE vocabulary")
        # the regular vocabulary is the run of NORMAL (1) tokens from id 0; control, user-defined and padding
        # tokens follow it
        kinds = fields["tokenizer.ggml.token_type"].contents()
        size = next((i for i, kind in enumerate(kinds) if kind != 1), len(kinds))
        regular = fields["tokenizer.ggml.tokens"].contents(slice(0, size))
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"tokens": regular, "merges": fields["tokenizer.ggml.merges"].contents()}),
                       encoding="utf-8")
        tmp.rename(cached)
    data = json.loads(cached.read_text(encoding="utf-8"))
    return {t: i for i, t in enumerate(data["tokens"])}, [tuple(m.split(" ")) for m in data["merges"]]
