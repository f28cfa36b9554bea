"""`qlora export RUN --output DIR`: the run as one GGUF file for llama.cpp and an Ollama Modelfile next to it.

The adapter is merged into the dequantized base (what `merge` does by default: the weights it was trained against),
converted by llama.cpp's own converter (qlora.llamacpp), read back with gguf-py, and described to Ollama by a
Modelfile whose TEMPLATE renders exactly the prompt the model was trained on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qlora.config import load_recipe
from qlora.data import Template, segments_for, turn_end
from qlora.errors import RunFailed, UserError
from qlora.files import publishing, write_atomic, write_marker
from qlora.llamacpp import convert, gguf_reader
from qlora.merge import check_output, merge
from qlora.rundir import ADAPTER_DIR, RECIPE_FILE

OUTTYPES = ("f16", "bf16", "q8_0", "f32")
PROMPT = "{{ .Prompt }}"  # where Ollama puts the user's message


def ollama_template(template: Template, tokenizer) -> str:
    """The training prompt for one instruction, the instruction replaced by Ollama's {{ .Prompt }}; BOS is left to
    the GGUF's add_bos_token, as llama.cpp adds it."""
    marker = "\x00qlora-prompt\x00"
    text = "".join(t for t, _ in segments_for(template, tokenizer, [{"role": "user", "content": marker}], "", True))
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    # a "{{" in the literal text would open a Go template action: print it as a string instead
    return text.replace("{{", '{{ "{{" }}').replace(marker, PROMPT)


def modelfile(gguf_name: str, template: Template, tokenizer, generation) -> str:
    """An Ollama Modelfile: the GGUF, the training prompt as TEMPLATE, the end tokens as stops, the recipe's
    sampling defaults."""
    stops = [s for s in dict.fromkeys([tokenizer.eos_token, turn_end(template, tokenizer)]) if s]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{ollama_template(template, tokenizer)}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER temperature {generation.temperature}", f"PARAMETER num_predict {generation.max_new_tokens}",
              f"PARAMETER repeat_penalty {generation.repetition_penalty}"]
    if generation.temperature > 0:
        lines += [f"PARAMETER top_p {generation.top_p}", f"PARAMETER top_k {generation.top_k}"]
    if generation.seed is not None:
        lines.append(f"PARAMETER seed {generation.seed}")
    return "\n".join(lines) + "\n"


def check_gguf(path: Path, tokenizer, llama_cpp: Path | None) -> None:
    """The converted file as llama.cpp will read it: the merged model's vocabulary in id order and its EOS."""
    reader = gguf_reader(path, llama_cpp)
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in fields else []
    n = len(tokenizer)
    if tokens[:n] != tokenizer.convert_ids_to_tokens(list(range(n))):
        raise RunFailed(f"{path}: its vocabulary differs from the merged tokenizer's; do not ship it")
    eos = fields["tokenizer.ggml.eos_token_id"].contents() if "tokenizer.ggml.eos_token_id" in fields else None
    if eos != tokenizer.eos_token_id:
        raise RunFailed(f"{path}: its EOS id is {eos}, the tokenizer's {tokenizer.eos_token_id}; do not ship it")


def export(run: str | Path, output: str | Path, outtype: str = "f16", llama_cpp: Path | None = None,
           overwrite: bool = False) -> tuple[Path, Path]:
    """Write output/<run name>-<outtype>.gguf and output/Modelfile; returns their paths. Everything is written
    in a temporary sibling and renamed at the end, so `output` is whole or untouched."""
    from transformers import AutoTokenizer

    run, output = Path(run), Path(output)
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r}: choose {', '.join(OUTTYPES)}")
    if not (run / RECIPE_FILE).is_file() or not (run / ADAPTER_DIR / "adapter_config.json").is_file():
        raise UserError(f"{run}: not a finished qlora run (needs {RECIPE_FILE} and {ADAPTER_DIR}/)")
    recipe = load_recipe(run / RECIPE_FILE)
    base_dir = Path(recipe.model.name_or_path)
    check_output(run, output, overwrite, [run, *([base_dir] if base_dir.is_dir() else [])], command="export")
    with publishing(output, "export", "--output") as tmp:
        merged = merge(run, tmp / "merged")
        name = f"{run.resolve().name}-{outtype}.gguf"
        convert(merged, tmp / name, outtype, llama_cpp)
        tokenizer = AutoTokenizer.from_pretrained(merged)
        check_gguf(tmp / name, tokenizer, llama_cpp)
        write_atomic(tmp / "Modelfile", modelfile(name, Template.load(run / ADAPTER_DIR), tokenizer,
                                                  recipe.generation))
        shutil.move(merged / "README.md", tmp / "README.md")  # the model card: base, data, eval, recipe
        shutil.rmtree(merged)
        write_marker(tmp, "export")
    return output / name, output / "Modelfile"
