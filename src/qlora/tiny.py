"""Tiny random twins of real model families, for the demo and tests, built offline in seconds.

A twin keeps what decides how the real model behaves downstream: its tokenizer's type and quirks
(SentencePiece BPE with byte fallback and a `▁` dummy prefix for Llama/Mistral, without the prefix for Gemma;
GPT-2-style byte-level BPE for Phi and Qwen), the special tokens at the family's ids, whether BOS is added and
what pads, and the layer proportions (attention heads per KV head, MLP width, tied embeddings, partial
rotary, attention biases) at toy size. Files are laid out as in the hub repository (SentencePiece families
ship tokenizer.model next to tokenizer.json) and load through the same from_pretrained path as a real model.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qlora.data import TEMPLATES
from qlora.errors import UserError
from qlora.files import check_output_dir, publishing, write_marker

SAMPLE_DATA = Path(__file__).parent / "sample_data" / "python_tasks.json"
SP_VOCAB_SIZE = 1024  # SentencePiece twins: specials + 256 byte pieces + learned pieces

# Qwen2.5's added tokens, in its order after the regular vocabulary (special=False: kept by decode)
QWEN_ADDED = (
    [(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                         "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                         "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")]
    + [(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                            "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")]
)
# Phi-2 (CodeGen's tokenizer): GPT-2's <|endoftext|> after the regular vocabulary, then runs of spaces and tabs
PHI_ADDED = [("<|endoftext|>", True), *((" " * n, False) for n in range(31, 1, -1)),
             *(("\t" * n, False) for n in range(9, 1, -1))]
# Qwen2.5's chat template (its tool-calling branches left out): a default system turn, then ChatML
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Twin:
    """How to build the twin of one real model family."""

    tokenizer: str  # "sentencepiece" or "byte_level"
    tokenizer_config: dict  # keys of the real repo's tokenizer_config.json (what transformers reads back)
    config: dict  # the model config at toy size
    sentencepiece: dict = field(default_factory=dict)  # SentencePieceTrainer options beyond the shared ones
    split_lines: bool = False  # train SentencePiece on lines: "\n" is then only a byte piece, as in Llama
    bpe_vocab: str = ""  # byte-level BPE: the family's real vocabulary and merges, from llama.cpp (qlora.llamacpp)
    added: list = field(default_factory=list)  # byte-level BPE: (token, special) after the regular vocabulary


# bitsandbytes' packed 4-bit CPU kernel (avx512-bf16 CPUs, no-grad forwards: generate, verify) needs each linear's
# outputs in multiples of 32 and its inputs in multiples of its block size, 64; real models are. The ratios are the real
# ones: Llama-2-7B MLP 11008/4096 = 43/16 -> 2752/1024 (the smallest with 64-multiples), 32 heads of 128, MHA -> 8 of
# 128; Mistral-7B 14336/4096 = 7/2 -> 896/256 with 32:8 heads -> 8:2; Gemma-2B 16384/2048 = 8 -> 1024/128, one KV head
# (MQA) and heads x head_dim = hidden (4 x 32; at 256 wide it no longer memorises one row at lr 1e-2); Phi-2 10240/2560 = 4 -> 1280/320 with head_dim 80 as Phi-2's, so 0.4 of it
# rotates (32 dims, as Phi-2); Qwen2.5-Coder-7B 18944/3584 = 37/7 -> 2368/448 with 28:4 heads -> 7:1 and untied
# embeddings (the 7B's; the 0.5B-3B tie theirs). initializer_range is set in build_config.
TWINS = {
    "gemma": Twin(  # google/gemma-2b
        tokenizer="sentencepiece",
        tokenizer_config={"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                          "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                          "extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
                          "spaces_between_special_tokens": False},
        # user-defined pieces take the ids after the four specials, as in Gemma's vocabulary:
        # <mask>=4, [@BOS@]=5, <unused0..99>=6..105, <start_of_turn>=106, <end_of_turn>=107
        sentencepiece={"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3, "pad_piece": "<pad>",
                       "eos_piece": "<eos>", "bos_piece": "<bos>", "unk_piece": "<unk>", "add_dummy_prefix": False,
                       "user_defined_symbols": ["<mask>", "[@BOS@]", *(f"<unused{i}>" for i in range(100)),
                                                "<start_of_turn>", "<end_of_turn>"]},
        config={"model_type": "gemma", "hidden_size": 128, "intermediate_size": 1024, "num_attention_heads": 4,
                "num_key_value_heads": 1, "head_dim": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192,
                "tie_word_embeddings": True},
    ),
    "llama": Twin(  # meta-llama/Llama-2-7b-hf
        tokenizer="sentencepiece",
        tokenizer_config={"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
                          "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                          "pad_token": None, "extra_special_tokens": []},
        sentencepiece={"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1, "add_dummy_prefix": True},
        split_lines=True,
        config={"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2752, "num_attention_heads": 8,
                "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                "tie_word_embeddings": False},
    ),
    "mistral": Twin(  # mistralai/Mistral-7B-v0.1
        tokenizer="sentencepiece",
        tokenizer_config={"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
                          "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                          "pad_token": None, "extra_special_tokens": [], "spaces_between_special_tokens": False},
        sentencepiece={"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1, "add_dummy_prefix": True},
        split_lines=True,
        config={"model_type": "mistral", "hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 8,
                "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
                "sliding_window": 4096, "tie_word_embeddings": False},
    ),
    "phi": Twin(  # microsoft/phi-2
        tokenizer="byte_level",
        tokenizer_config={"tokenizer_class": "CodeGenTokenizer", "add_prefix_space": False,
                          "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                          "model_max_length": 2048},
        bpe_vocab="gpt-2",  # GPT-2's 50256 + 39 added = 50295 tokens; the embedding is padded to 51200 as Phi-2's
        added=PHI_ADDED,
        config={"model_type": "phi", "vocab_size": 51200, "hidden_size": 320, "intermediate_size": 1280,
                "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 2048,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4},
                "resid_pdrop": 0.1, "layer_norm_eps": 1e-5, "tie_word_embeddings": False},
    ),
    "qwen2": Twin(  # Qwen/Qwen2.5-Coder-7B
        tokenizer="byte_level",
        tokenizer_config={"tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "bos_token": None,
                          "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
                          "errors": "replace", "split_special_tokens": False, "model_max_length": 32768,
                          "chat_template": QWEN_CHAT_TEMPLATE},
        bpe_vocab="qwen2",  # Qwen's 151643 + 22 added = 151665 tokens; the embedding is padded to 152064 as the 7B's
        added=QWEN_ADDED,
        config={"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 448, "intermediate_size": 2368,
                "num_attention_heads": 7, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 32768,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                "tie_word_embeddings": False},
    ),
}
ARCHITECTURES = tuple(TWINS)


def _corpus() -> list[str]:
    """Text to train the tokenizer on: our prompt templates, the sample data and a little prose."""
    texts = [t.render("x", "y") + t.render("x") + t.reply_end for t in TEMPLATES.values()]
    if SAMPLE_DATA.is_file():
        for row in json.loads(SAMPLE_DATA.read_text(encoding="utf-8")):
            texts.extend(row.values())
    texts.append("The quick brown fox jumps over the lazy dog. Write a function that returns the answer.")
    return texts


def train_sentencepiece(twin: Twin) -> bytes:
    """A SentencePiece BPE model (serialized ModelProto) trained on our corpus with the family's settings.

    Shared with Llama, Mistral and Gemma: byte fallback, digits split one by one, no normalization and
    whitespace kept as is (identity rule, no removal of extra spaces), whitespace-only pieces allowed.
    """
    import sentencepiece as spm

    texts = _corpus()
    if twin.split_lines:
        texts = [line for text in texts for line in text.split("\n") if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=SP_VOCAB_SIZE,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, minloglevel=2,
        **twin.sentencepiece,
    )
    return model.getvalue()


def _write_sentencepiece_tokenizer(twin: Twin, directory: Path):
    """tokenizer.model, and the tokenizer.json transformers converts from it.

    Llama-2's and Mistral's tokenizer.json were converted by transformers 4.3x: a normalizer that prepends
    `▁` to every text segment, no pre-tokenizer. transformers 5 loads Mistral's through the generic backend,
    which runs that file as is, and rebuilds Llama's in LlamaTokenizer (Metaspace, from `legacy`).
    """
    from tokenizers import AddedToken, normalizers
    from transformers import AutoTokenizer

    (directory / "tokenizer.model").write_bytes(train_sentencepiece(twin))
    (directory / "tokenizer_config.json").write_text(json.dumps(twin.tokenizer_config), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    # SentencePiece matches user-defined pieces whole wherever they occur: added tokens do that in tokenizers
    user_defined = twin.sentencepiece.get("user_defined_symbols", ())
    tokenizer.add_tokens([AddedToken(p, normalized=False) for p in user_defined
                          if p not in tokenizer.all_special_tokens])
    if twin.sentencepiece["add_dummy_prefix"]:
        backend = tokenizer.backend_tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    tokenizer.save_pretrained(directory)


def _write_byte_level_tokenizer(twin: Twin, directory: Path):
    """A byte-level BPE trained with the family's own pre-tokenizer, its added tokens after the regular vocabulary."""
    from tokenizers import AddedToken
    from transformers import CodeGenTokenizer, Qwen2Tokenizer

    from qlora.llamacpp import real_bpe_vocab

    classes = {"CodeGenTokenizer": CodeGenTokenizer, "Qwen2Tokenizer": Qwen2Tokenizer}
    cls = classes[twin.tokenizer_config["tokenizer_class"]]
    # the real vocabulary: llama.cpp's converter recognises only a BPE that tokenizes its check text as a known model
    vocab, merges = real_bpe_vocab(twin.bpe_vocab)
    specials = {k: v for k, v in twin.tokenizer_config.items() if k.endswith("_token")}
    tokenizer = cls(vocab=vocab, merges=merges, **specials)
    tokenizer.add_tokens([AddedToken(t, special=special, normalized=not special) for t, special in twin.added])
    tokenizer.save_pretrained(directory)


def write_tokenizer(arch: str, directory: str | Path):
    """Write `arch`'s tokenizer files into `directory` as its hub repo has them; returns the loaded tokenizer."""
    from transformers import AutoTokenizer

    twin, directory = TWINS[arch], Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if twin.tokenizer == "sentencepiece":
        _write_sentencepiece_tokenizer(twin, directory)
    else:
        _write_byte_level_tokenizer(twin, directory)
    # transformers 5 drops keys it consumed (e.g. LlamaTokenizer's `legacy`); the real repo states them
    path = directory / "tokenizer_config.json"
    config = {**json.loads(path.read_text(encoding="utf-8")), **twin.tokenizer_config}
    config.pop("vocab_file", None)  # an absolute path to the file it was converted from
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return AutoTokenizer.from_pretrained(directory)


def build_tokenizer(arch: str):
    """`arch`'s twin tokenizer as its files alone load it (no config.json: Mistral's loads as LlamaTokenizer)."""
    with tempfile.TemporaryDirectory() as tmp:
        return write_tokenizer(arch, tmp)


def build_config(arch: str, tokenizer, initializer_range: float = 0.15):
    """The family's config at toy size: 2 layers, its layer proportions, ids from the twin tokenizer."""
    from transformers import AutoConfig

    values = dict(TWINS[arch].config)
    return AutoConfig.for_model(
        values.pop("model_type"),
        **{"vocab_size": len(tokenizer), **values},
        num_hidden_layers=2,
        initializer_range=initializer_range,
        # as the real configs: Qwen's names its EOS as BOS too, and only a family with its own pad token sets it
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token != tokenizer.eos_token else None,
    )


def build_tiny_model(arch: str, output: str | Path, *, overwrite: bool = False, seed: int = 0,
                     initializer_range: float = 0.15) -> Path:
    """Save a random tiny `arch` model and its tokenizer to `output`; returns the directory.

    initializer_range defaults to 0.15: with the usual 0.02 a tiny Gemma cannot memorise even one
    example (its frozen final norm and tied head cap the logits' confidence).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in TWINS:
        raise UserError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    output = Path(output)
    check_output_dir(output, overwrite, "tiny", "OUTPUT")
    with publishing(output.resolve(), "tiny", "OUTPUT") as tmp:
        tokenizer = write_tokenizer(arch, tmp)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(build_config(arch, tokenizer, initializer_range), dtype=torch.float32)
        model.save_pretrained(tmp)
        write_marker(tmp, "tiny", arch=arch)
    return output
