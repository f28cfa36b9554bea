"""llama.cpp reads our output with no flags: each twin's merged model, converted by llama.cpp's stock converter.

The converter comes from the llama-cpp-python sdist on PyPI (the one network access the suite allows, cached
outside the repo); the GGUF is read back with the gguf-py vendored with it. Converted once per twin.
"""

import json

import pytest
import sentencepiece as spm
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from conftest import ROW, ROW_WITH_INPUT, recipe_for
from qlora.errors import RunFailed, UserError
from qlora.llamacpp import convert, gguf_reader, llama_cpp_dir, real_bpe_vocab
from qlora.merge import merge
from qlora.tiny import ARCHITECTURES
from qlora.train import train

# llama.cpp's name for each family's architecture (Mistral-7B runs as llama) and tokenizer model
# ("llama" = SentencePiece, "gpt2" = byte-level BPE, with the pre-tokenizer the converter recognised)
LLAMA_CPP = {
    "gemma": ("gemma", "llama", "default"),
    "llama": ("llama", "llama", "default"),
    "mistral": ("llama", "llama", "default"),
    "phi": ("phi2", "gpt2", "phi-2"),
    "qwen2": ("qwen2", "gpt2", "qwen2"),
}
# Each family's own prompt format where it has one, so the chat template carries its special tokens
TEMPLATE = {"gemma": "gemma", "llama": "llama-2", "mistral": "alpaca", "phi": "alpaca", "qwen2": "chatml"}
SENTENCEPIECE = [a for a in ARCHITECTURES if LLAMA_CPP[a][1] == "llama"]
BYTE_LEVEL = [a for a in ARCHITECTURES if LLAMA_CPP[a][1] == "gpt2"]
# gguf TokenType values (gguf-py constants.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@pytest.fixture(scope="module", params=ARCHITECTURES)
def converted(request, tmp_path_factory, tiny_model, llama_cpp):
    """(arch, merged dir, GGUFReader of its f16 conversion) for a twin trained a few steps and merged."""
    arch = request.param
    directory = tmp_path_factory.mktemp(f"gguf-{arch}")
    # one step moves the adapter off zero: the merge then differs from the base, which is all conversion needs
    run = train(recipe_for(directory, tiny_model(arch), [ROW, ROW_WITH_INPUT], data={"template": TEMPLATE[arch]},
                           train={"max_steps": 1, "logging_steps": 1, "save_steps": 100}))
    merged = merge(run, directory / "merged")
    gguf = convert(merged, directory / "model.gguf", llama_cpp=llama_cpp)
    return arch, merged, gguf_reader(gguf, llama_cpp)


def field(reader, key, default=None):
    return reader.fields[key].contents() if key in reader.fields else default


def test_architecture_and_tokenizer_model_are_the_family(converted):
    arch, _, reader = converted
    architecture, model, pre = LLAMA_CPP[arch]
    assert field(reader, "general.architecture") == architecture
    assert field(reader, "tokenizer.ggml.model") == model
    assert field(reader, "tokenizer.ggml.pre") == pre


def test_tokens_are_the_transformers_vocabulary_in_id_order(converted):
    arch, merged, reader = converted
    tokenizer, config = AutoTokenizer.from_pretrained(merged), AutoConfig.from_pretrained(merged)
    tokens, kinds = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    n = len(tokenizer)
    assert tokens[:n] == tokenizer.convert_ids_to_tokens(list(range(n)))
    # rows of the embedding past the tokenizer (Phi-2 and Qwen pad theirs) are unused padding entries
    assert len(tokens) == len(kinds) == config.vocab_size
    assert set(kinds[n:]) <= {UNUSED}


def test_special_token_ids_and_bos_are_the_transformers_ones(converted):
    arch, merged, reader = converted
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token != tokenizer.eos_token:
        assert field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    # llama.cpp adds BOS as the key says; without it, SentencePiece vocabularies add one and phi-2/qwen2
    # pre-tokenizers do not (llama-vocab.cpp)
    adds_bos = tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token", field(reader, "tokenizer.ggml.model") == "llama") == adds_bos
    assert field(reader, "tokenizer.ggml.add_eos_token", False) is False


def test_added_tokens_are_matched_whole_by_llama_cpp(converted):
    """llama.cpp finds a token in text as one id only if it is control, user-defined or unknown (llama-vocab.cpp).

    The converter learns which are from tokenizer_config.json's added_tokens_decoder (SentencePiece) or the
    tokenizer's added vocabulary (BPE); a plain entry would be split into pieces, e.g. Gemma's <start_of_turn>.
    """
    arch, merged, reader = converted
    kinds, tokens = field(reader, "tokenizer.ggml.token_type"), field(reader, "tokenizer.ggml.tokens")
    added = AutoTokenizer.from_pretrained(merged).added_tokens_decoder
    plain = [tokens[i] for i in sorted(added) if kinds[i] not in (CONTROL, USER_DEFINED, UNKNOWN)]
    assert not plain, f"{len(plain)} added tokens are plain text to llama.cpp, e.g. {plain[-3:]}"


def test_trained_tokens_a_base_lacked_are_control_tokens_of_the_grown_vocabulary(trained_tokens_run, tmp_path,
                                                                                  llama_cpp):
    merged = merge(trained_tokens_run, tmp_path / "merged")
    reader = gguf_reader(convert(merged, tmp_path / "model.gguf", llama_cpp=llama_cpp), llama_cpp)
    tokenizer, config = AutoTokenizer.from_pretrained(merged), AutoConfig.from_pretrained(merged)
    ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    tokens, kinds = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == config.vocab_size == max(ids) + 1
    assert [tokens[i] for i in ids] == ["<|im_start|>", "<|im_end|>"] and {kinds[i] for i in ids} == {CONTROL}
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert list(embedding.shape) == [config.hidden_size, config.vocab_size]


def test_chat_template_is_the_merged_one(converted):
    arch, merged, reader = converted
    template = AutoTokenizer.from_pretrained(merged).chat_template
    assert template and field(reader, "tokenizer.chat_template") == template


def test_tensors_are_the_merged_weights_in_f16(converted):
    arch, merged, reader = converted
    config = json.loads((merged / "config.json").read_text())
    with safe_open(merged / "model.safetensors", "pt") as weights:
        count = len(list(weights.keys()))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == count  # every weight, none made up (llama.cpp computes rotary tables itself)
    architecture = LLAMA_CPP[arch][0]
    assert field(reader, f"{architecture}.block_count") == config["num_hidden_layers"]
    assert field(reader, f"{architecture}.embedding_length") == config["hidden_size"]
    # gguf shapes list the fastest-varying dimension first: [hidden, vocab] is a vocab x hidden matrix
    assert list(tensors["token_embd.weight"].shape) == [config["hidden_size"], config["vocab_size"]]
    assert ("output.weight" in tensors) == (not config["tie_word_embeddings"])
    assert tensors["token_embd.weight"].tensor_type.name == "F16"


@pytest.mark.parametrize("converted", SENTENCEPIECE, indirect=True)
def test_sentencepiece_vocabulary_scores_and_prefix_match_tokenizer_model(converted):
    """What llama.cpp's SentencePiece tokenizer runs on: the pieces, their scores and kinds, the dummy prefix."""
    arch, merged, reader = converted
    sp = spm.SentencePieceProcessor(model_file=str(merged / "tokenizer.model"))
    added = AutoTokenizer.from_pretrained(merged).added_tokens_decoder  # their kinds: test above
    ids = [i for i in range(sp.vocab_size()) if i not in added]
    scores, kinds = field(reader, "tokenizer.ggml.scores"), field(reader, "tokenizer.ggml.token_type")
    assert [scores[i] for i in ids] == pytest.approx([sp.GetScore(i) for i in ids])
    assert len({scores[i] for i in ids}) > len(ids) // 2  # BPE pieces ranked by score, not all alike
    assert [kinds[i] for i in ids] == [BYTE if sp.IsByte(i) else CONTROL if sp.IsControl(i) else
                                       UNKNOWN if sp.IsUnknown(i) else NORMAL for i in ids]
    assert sum(kinds[i] == BYTE for i in ids) == 256  # byte fallback: every byte has its piece
    dummy_prefix = sp.EncodeAsPieces("x")[0].startswith("▁")
    assert field(reader, "tokenizer.ggml.add_space_prefix", True) == dummy_prefix  # llama.cpp's default: True


@pytest.mark.parametrize("converted", BYTE_LEVEL, indirect=True)
def test_byte_level_vocabulary_is_the_real_one_with_its_merges(converted):
    """The converter recognised the tokenizer (test above); its merges are the transformers tokenizer's."""
    arch, merged, reader = converted
    merges = json.loads((merged / "tokenizer.json").read_text())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]


def test_real_bpe_vocab_tokenizes_as_llama_cpp_reference(llama_cpp):
    """Qwen2's vocabulary rebuilt from llama.cpp's copy tokenizes its reference texts to its reference ids."""
    from transformers import Qwen2Tokenizer

    vocab, merges = real_bpe_vocab("qwen2", llama_cpp)
    assert len(vocab) == 151643 and len(merges) == 151387
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, bos_token=None, eos_token=None, unk_token=None)
    models = llama_cpp / "models"
    texts = (models / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (models / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) > 40
    for text, ids in zip(texts, expected):
        assert tokenizer.encode(text, add_special_tokens=False) == [int(i) for i in ids.split()], text


def test_converter_refusal_is_one_line(tmp_path, llama_cpp):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(RunFailed) as exc:
        convert(tmp_path, tmp_path / "out.gguf", llama_cpp=llama_cpp)
    assert "convert_hf_to_gguf.py could not convert" in str(exc.value) and "\n" not in str(exc.value)
    assert "NoSuchForCausalLM" in str(exc.value)
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob("*.tmp"))


def test_llama_cpp_dir_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(UserError, match=f"LLAMA_CPP_DIR={tmp_path} holds no convert_hf_to_gguf.py"):
        llama_cpp_dir()
    monkeypatch.delenv("LLAMA_CPP_DIR")
    # an index that does not answer: pip's own error, on one line, and nothing left in the cache
    for key, value in {"PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                       "PIP_FIND_LINKS": "", "PIP_RETRIES": "0"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RunFailed, match=r"\(from versions: none\).*set LLAMA_CPP_DIR") as exc:
        llama_cpp_dir(tmp_path / "cache" / "llama.cpp")
    assert "\n" not in str(exc.value)
    assert not list((tmp_path / "cache").iterdir())
