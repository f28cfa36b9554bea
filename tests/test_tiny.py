"""Tiny twins: each family's tokenizer type, special ids, BOS/prefix behaviour and layer proportions, as the real one."""

import shutil
from fractions import Fraction

import huggingface_hub
import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qlora.errors import UserError
from qlora.merge import merge
from qlora.model import save_tokenizer
from qlora.tiny import ARCHITECTURES, build_tiny_model
from qlora.train import train

SENTENCEPIECE = ("llama", "mistral", "gemma")
BYTE_LEVEL = ("phi", "qwen2")
# Texts a code assistant meets: indentation, blank lines, tabs, trailing spaces, digits, accents, CJK, emoji
TEXTS = [
    "def f",
    "def reverse(s):\n    \"\"\"Return s reversed.\"\"\"\n    return s[::-1]\n",
    "class A:\n\tdef g(self):\n\t\treturn 0  # tab-indented\n\n\n",
    "x  =  1   \ny = 2\t\t\n",
    "Write a function that returns 12345 + 678.",
    "naïve café, déjà vu — “quotes”",
    "函数返回值 🙂🚀 ok",
    "### Instruction:\nReverse a list.\n\n### Response:\n",
    "[INST] Add type hints. [/INST]",
]
# Text that starts with whitespace: SentencePiece still adds its dummy `▁`; transformers 5's LlamaTokenizer
# (Metaspace, prepend_scheme "first") does not, for the real Llama-2 as for its twin. Mistral's tokenizer.json
# (a Prepend normalizer, run as is) and Gemma (no dummy prefix) agree with SentencePiece here too.
LEADING_SPACE = ["    return x", " leading space", "\n\nafter blank lines"]

REAL = {  # the real models' figures: MLP width / hidden, query heads per KV head (Gemma-2B: one KV head)
    "llama": dict(mlp=Fraction(11008, 4096), group=1, tied=False),
    "mistral": dict(mlp=Fraction(14336, 4096), group=4, tied=False),
    "gemma": dict(mlp=Fraction(16384, 2048), group=None, tied=True),
    "phi": dict(mlp=Fraction(10240, 2560), group=1, tied=False),
    "qwen2": dict(mlp=Fraction(18944, 3584), group=7, tied=False),
}


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    return {arch: AutoTokenizer.from_pretrained(tiny_model(arch)) for arch in ARCHITECTURES}


def sentencepiece_processor(directory):
    return spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))


def test_sentencepiece_families_special_ids_and_classes(tokenizers):
    llama, mistral, gemma = (tokenizers[a] for a in SENTENCEPIECE)
    # transformers 5.23 loads Llama-2 as LlamaTokenizer, Mistral-7B-v0.1 (model_type mistral) with its generic backend
    assert (type(llama).__name__, type(mistral).__name__, type(gemma).__name__) == (
        "LlamaTokenizer", "TokenizersBackend", "GemmaTokenizer")
    for tok in (llama, mistral):
        assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", None)
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        assert tok.convert_ids_to_tokens([3, 13, 258]) == ["<0x00>", "<0x0A>", "<0xFF>"]  # byte pieces, as Llama's
    assert [gemma.pad_token_id, gemma.eos_token_id, gemma.bos_token_id, gemma.unk_token_id] == [0, 1, 2, 3]
    assert gemma.convert_ids_to_tokens([0, 1, 2, 3, 4, 5, 6, 105, 106, 107]) == [
        "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[@BOS@]", "<unused0>", "<unused99>",
        "<start_of_turn>", "<end_of_turn>"]
    turn = gemma("<start_of_turn>user\nhi<end_of_turn>\n", add_special_tokens=False)["input_ids"]
    assert turn[0] == 106 and 107 in turn
    assert gemma.decode(turn, skip_special_tokens=True) == "user\nhi\n"  # turn markers are special, as Gemma's


def test_byte_level_families_put_their_added_tokens_after_the_vocabulary(tokenizers):
    phi, qwen = tokenizers["phi"], tokenizers["qwen2"]
    regular = phi.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    assert (type(phi).__name__, phi.bos_token, phi.eos_token, phi.unk_token, phi.pad_token) == (
        "CodeGenTokenizer", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", None)
    assert phi.eos_token_id == regular  # GPT-2's <|endoftext|> is its last regular-sized id, then CodeGen's whitespace
    assert phi.convert_tokens_to_ids(" " * 8) in phi("\tif x:\n        pass")["input_ids"]  # one indentation token
    regular = qwen.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    assert (type(qwen).__name__, qwen.bos_token, qwen.unk_token) == ("Qwen2Tokenizer", None, None)
    assert (qwen.eos_token, qwen.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == [
        regular, regular + 1, regular + 2, regular + 21]
    ids = qwen("<|im_start|>user\nhi<|im_end|>\n")["input_ids"]
    assert ids[0] == regular + 1 and regular + 2 in ids
    assert qwen.decode(qwen("<|fim_prefix|>a")["input_ids"], skip_special_tokens=True) == "<|fim_prefix|>a"  # not special
    assert "You are Qwen" in qwen.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bos_is_added_as_the_family_does_and_eos_never(arch, tokenizers):
    tok = tokenizers[arch]
    ids = tok("def f")["input_ids"]
    adds_bos = arch in SENTENCEPIECE
    assert (ids[0] == tok.bos_token_id) is adds_bos
    assert ids.count(tok.bos_token_id) == (1 if adds_bos else 0)
    assert ids[-1] != tok.eos_token_id


@pytest.mark.parametrize("arch, pieces", [
    ("llama", ["▁def", "▁f"]), ("mistral", ["▁def", "▁f"]), ("gemma", ["def", "▁f"]),
    ("phi", ["def", "Ġf"]), ("qwen2", ["def", "Ġf"]),
])
def test_dummy_prefix_only_where_the_family_has_one(arch, pieces, tokenizers):
    tok = tokenizers[arch]
    assert tok.convert_ids_to_tokens(tok("def f", add_special_tokens=False)["input_ids"]) == pieces


def test_mistral_prefixes_every_segment_and_llama_only_the_first(tokenizers):
    # Mistral's tokenizer_config says legacy: true, Llama-2's legacy: false; "x</s>y" is a response then EOS then text
    llama, mistral = tokenizers["llama"], tokenizers["mistral"]
    assert llama.convert_ids_to_tokens(llama("x</s>y", add_special_tokens=False)["input_ids"]) == ["▁x", "</s>", "y"]
    assert mistral.convert_ids_to_tokens(mistral("x</s>y", add_special_tokens=False)["input_ids"]) == [
        "▁x", "</s>", "▁y"]


@pytest.mark.parametrize("arch", SENTENCEPIECE)
def test_transformers_and_sentencepiece_give_the_same_ids(arch, tiny_model, tokenizers):
    directory, tok = tiny_model(arch), tokenizers[arch]
    sp = sentencepiece_processor(directory)
    texts = TEXTS + (LEADING_SPACE if arch != "llama" else [])
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text
        assert tok(text)["input_ids"] == [sp.bos_id(), *ids]
        assert tok.decode(ids) == sp.decode(ids) == text
    emoji = sp.encode("🙂", out_type=str)
    assert emoji[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]  # not in the vocabulary: byte fallback


@pytest.mark.parametrize("arch", SENTENCEPIECE)
def test_sentencepiece_model_has_the_family_settings(arch, tiny_model):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tiny_model(arch) / "tokenizer.model").read_bytes())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    assert trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert trainer.byte_fallback and trainer.split_digits and trainer.allow_whitespace_only_pieces
    assert normalizer.name == "identity" and not normalizer.remove_extra_whitespaces
    assert normalizer.add_dummy_prefix is (arch != "gemma")
    assert trainer.pad_id == (0 if arch == "gemma" else -1)
    assert 900 <= len(proto.pieces) <= 1100


@pytest.mark.parametrize("arch", BYTE_LEVEL)
def test_byte_level_tokenizers_round_trip_every_text(arch, tiny_model, tokenizers):
    tok = tokenizers[arch]
    assert not (tiny_model(arch) / "tokenizer.model").exists()
    for text in TEXTS + LEADING_SPACE:
        assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_proportions_are_the_real_models(arch, tiny_model, tokenizers):
    config = AutoConfig.from_pretrained(tiny_model(arch))
    real = REAL[arch]
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    assert Fraction(config.intermediate_size, config.hidden_size) == real["mlp"]
    assert heads % kv == 0 and heads // kv == (real["group"] or heads)
    assert config.tie_word_embeddings is real["tied"]
    assert config.num_hidden_layers == 2 and config.initializer_range == 0.15
    assert config.vocab_size >= len(tokenizers[arch])
    assert config.eos_token_id == tokenizers[arch].eos_token_id
    if arch == "gemma":
        assert heads * head_dim == config.hidden_size and kv == 1
    if arch == "mistral":
        assert config.sliding_window == 4096
    if arch == "phi":  # Phi-2 rotates 32 of its 80 head dims
        assert head_dim == 80 and config.rope_parameters["partial_rotary_factor"] == 0.4
    if arch in ("phi", "qwen2"):  # the embedding is padded past the tokenizer, as Phi-2's and Qwen's are
        assert config.vocab_size > len(tokenizers[arch]) and config.vocab_size % 64 == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_twin_loads_in_4bit_nf4_and_runs(arch, tiny_model, tokenizers):
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch), quantization_config=nf4, dtype=torch.bfloat16)
    linears = {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert len(linears) == 2 * 7 - 2 * (arch == "phi")  # q,k,v,o + 3 MLP (Phi: dense + fc1, fc2) per layer
    # bitsandbytes' packed CPU kernel (avx512-bf16, no-grad forward) needs out % 32 and in % 64 (its block size)
    assert all(m.out_features % 32 == 0 and m.in_features % 64 == 0 for m in linears.values())
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linears.values())
    if arch == "qwen2":
        assert all(linears[f"model.layers.0.self_attn.{p}_proj"].bias is not None for p in "qkv")
    ids = torch.tensor([tokenizers[arch]("def f(x):\n    return x")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def test_unknown_architecture_and_occupied_directory_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unknown architecture 'gpt5'.*qwen2"):
        build_tiny_model("gpt5", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        build_tiny_model("phi", tmp_path / "full")
    assert (tmp_path / "full" / "keep").read_text() == "x"


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma", "qwen2"])
def test_sentencepiece_model_travels_into_adapter_and_merged_dirs(arch, make_recipe, tiny_model, tmp_path):
    base = tiny_model(arch)
    run = train(make_recipe(arch=arch, train={"max_steps": 1, "save_steps": 1, "logging_steps": 1}))
    merged = merge(run, tmp_path / "merged")
    for directory in (run / "adapter", merged):
        if arch in SENTENCEPIECE:
            assert (directory / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
        else:
            assert not (directory / "tokenizer.model").exists()
    original, reloaded = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(merged)
    assert type(reloaded) is type(original)
    for text in [*TEXTS, *LEADING_SPACE, f"x{original.eos_token}y"]:
        assert reloaded(text)["input_ids"] == original(text)["input_ids"], text


def test_save_tokenizer_takes_tokenizer_model_from_the_hub_cache(tiny_model, tmp_path, monkeypatch, capsys):
    base = tiny_model("gemma")
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--org--gemma-twin" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copyfile(base / "tokenizer.model", snapshot / "tokenizer.model")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tokenizer = AutoTokenizer.from_pretrained(base)

    class Model:  # the recipe's model section: only these two keys are read
        name_or_path, revision = "org/gemma-twin", commit

    save_tokenizer(tokenizer, Model, tmp_path / "cached")
    assert (tmp_path / "cached" / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    Model.name_or_path = "org/not-downloaded"  # offline, nothing cached: the tokenizer is saved, with a warning
    save_tokenizer(tokenizer, Model, tmp_path / "uncached")
    assert (tmp_path / "uncached" / "tokenizer.json").is_file()
    assert not (tmp_path / "uncached" / "tokenizer.model").exists()
    assert "tokenizer.model of org/not-downloaded is not in the local hub cache" in capsys.readouterr().err
