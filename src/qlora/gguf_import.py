"""`qlora import-gguf`: a GGUF model (what llama.cpp and Ollama run) as a Hugging Face model directory qlora trains.

transformers' GGUF loader reads the tokenizer (with its chat template) and dequantizes the weights. It refuses to
save the model it loaded (its GGUF quantizer is not serializable), so the weights are handed to a model built from
the same config without `quantization_config` (on the meta device: the tensors are shared, not copied) and that
model is saved as float32 safetensors: an ordinary model directory, loaded as any other.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from qlora.errors import UserError, one_line
from qlora.files import check_output_dir, publishing, sha256_file, write_marker

console = Console(stderr=True, highlight=False, soft_wrap=True)

MAGIC = b"GGUF"
# GGUF architectures transformers maps onto its own classes that are not causal language models
NOT_CAUSAL = {"general", "tokenizer", "t5", "umt5"}
# llama.cpp's names for architectures transformers spells otherwise (as its load_gguf_checkpoint renames them)
RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def gguf_architecture(path: Path) -> str:
    """The architecture a GGUF file declares, once it is known to be a GGUF file transformers can load as a causal
    language model with its tokenizer.

    Raises:
        UserError: missing, not a GGUF file, unreadable, no tokenizer, or an architecture transformers cannot load.
    """
    from gguf import GGUFReader
    from transformers import __version__ as transformers_version
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if not path.exists():
        raise UserError(f"FILE: {path} does not exist; give a .gguf model file")
    if not path.is_file():
        raise UserError(f"FILE: {path} is not a file; give a .gguf model file")
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise UserError(f"FILE: {path} is not a GGUF file (it does not start with {MAGIC.decode()}); give a model "
                            "file as llama.cpp writes it")
    try:
        fields = GGUFReader(path).fields
        architecture = fields["general.architecture"].contents()
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise UserError(f"FILE: {path} is not a readable GGUF file ({one_line(exc) or type(exc).__name__}); it may be "
                        "cut short: download it again") from None
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in NOT_CAUSAL]
    if RENAMED.get(architecture, architecture) not in supported:
        raise UserError(f"FILE: {path} holds a {architecture!r} model, which transformers {transformers_version} "
                        f"cannot load from GGUF as a causal language model; it loads {', '.join(supported)}")
    if "tokenizer.ggml.model" not in fields:
        raise UserError(f"FILE: {path} holds no tokenizer (no tokenizer.ggml.model); import a GGUF that carries one")
    return architecture


def import_gguf(path: str | Path, output: str | Path, *, overwrite: bool = False, command: str = "import-gguf",
                what: str = "OUT", **record) -> Path:
    """Write the GGUF model `path` to `output` as a Hugging Face model directory: tokenizer files (its chat template
    included) and float32 safetensors. `output` is published whole or not at all; its marker records what made it
    (the file, its sha256, qlora's and transformers' versions; `record` adds to or replaces these).

    Raises:
        UserError: a bad GGUF file (see gguf_architecture) or an output --overwrite may not replace.
    """
    from importlib.metadata import version

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, output = Path(path), Path(output)
    check_output_dir(output, overwrite, command, what)
    architecture = gguf_architecture(path)
    size = path.stat().st_size / 2**20
    with publishing(output.resolve(), command, what) as tmp:
        console.print(f"reading the tokenizer and chat template of {path.name} ({architecture}, {size:.0f} MB)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            console.print(f"dequantizing {path.name} to float32")
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except (ValueError, KeyError, NotImplementedError) as exc:  # a tensor type or tokenizer it cannot convert
            raise UserError(f"FILE: transformers {transformers.__version__} cannot import {path}: {one_line(exc)}") \
                from None
        config = loaded.config
        del config.quantization_config
        with torch.device("meta"):  # only to be saved: the loaded tensors are assigned, never copied
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
        model.tie_weights()
        model.generation_config = loaded.generation_config
        console.print(f"writing float32 safetensors to {output}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        made = {"source": str(path.resolve()), "source_sha256": sha256_file(path), "architecture": architecture,
                "qlora": version("qlora"), "transformers": transformers.__version__}
        write_marker(tmp, command, **{**made, **record})
    return output
