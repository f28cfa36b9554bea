"""Tiny random models of real architectures, with a locally trained tokenizer, for the demo and tests.

They are saved with save_pretrained and loaded back through the same from_pretrained path as a real
model, so everything downstream (4-bit quantization, LoRA, training, merge) runs for real, offline.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from qlora.errors import UserError
from qlora.data import TEMPLATES

SAMPLE_DATA = Path(__file__).parent / "sample_data" / "python_tasks.json"
VOCAB_SIZE = 1024


@dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens laid out as the real model family's tokenizer does."""

    specials: tuple[str, ...]  # ids 0.. in this order
    bos: str
    eos: str
    pad: str | None  # None: the family ships no pad token (the loader then pads with EOS)
    unk: str
    adds_bos: bool  # whether encoding a text prepends BOS


SPECS = {
    "gemma": TokenizerSpec(("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
                           bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", adds_bos=True),
    "llama": TokenizerSpec(("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", pad=None, unk="<unk>", adds_bos=True),
    "mistral": TokenizerSpec(("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", pad=None, unk="<unk>", adds_bos=True),
    "phi": TokenizerSpec(("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>", pad=None,
                         unk="<|endoftext|>", adds_bos=False),
}
ARCHITECTURES = tuple(SPECS)


def _corpus() -> list[str]:
    """Text to train the tokenizer on: our prompt templates, the sample data and a little prose."""
    texts = [t.render("x", "y") + t.render("x") + t.reply_end for t in TEMPLATES.values()]
    if SAMPLE_DATA.is_file():
        for row in json.loads(SAMPLE_DATA.read_text(encoding="utf-8")):
            texts.extend(row.values())
    texts.append("The quick brown fox jumps over the lazy dog. Write a function that returns the answer.")
    return texts


def build_tokenizer(arch: str):
    """A byte-level BPE tokenizer trained here, with the family's special tokens and BOS behaviour."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = SPECS[arch]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if spec.adds_bos:
        bos_id = spec.specials.index(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A $B", special_tokens=[(spec.bos, bos_id)]
        )
    extra = [t for t in spec.specials if t not in {spec.bos, spec.eos, spec.pad, spec.unk}]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        additional_special_tokens=extra,
        model_max_length=1024,
    )


def build_config(arch: str, tokenizer, initializer_range: float = 0.15):
    """A config with the family's layer layout at toy size (every projection a multiple of 32)."""
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, PhiConfig

    ids = dict(
        vocab_size=VOCAB_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=1024,
        initializer_range=initializer_range,
        num_hidden_layers=2,
        hidden_size=128,
        num_attention_heads=4,
    )
    if arch == "gemma":
        return GemmaConfig(**ids, intermediate_size=256, num_key_value_heads=2, head_dim=32)
    if arch == "llama":
        return LlamaConfig(**ids, intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "mistral":
        return MistralConfig(**ids, intermediate_size=256, num_key_value_heads=2, sliding_window=512)
    return PhiConfig(**ids, intermediate_size=256, num_key_value_heads=4)


def build_tiny_model(arch: str, output: str | Path, *, overwrite: bool = False, seed: int = 0,
                     initializer_range: float = 0.15) -> Path:
    """Save a random tiny `arch` model and its tokenizer to `output`; returns the directory.

    initializer_range defaults to 0.15: with the usual 0.02 a tiny Gemma cannot memorise even one
    example (its frozen final norm and tied head cap the logits' confidence).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in SPECS:
        raise UserError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"{output} exists and is not empty: pass --overwrite or choose another directory")
    tokenizer = build_tokenizer(arch)
    config = build_config(arch, tokenizer, initializer_range)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return output
