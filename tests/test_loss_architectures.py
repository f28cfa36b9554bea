"""qlora's loss equals the model's own, architecture by architecture, or is not used.

For every model type in qlora.loss.HEADS (the only ones qlora's loss is used for), a tiny random model built from
transformers' config class, loaded as qlora loads a base (4-bit NF4, double-quantized) with LoRA on every linear
layer, gives the same loss and LoRA gradients through qlora.loss as through `model(**batch, labels=...)`, in float32.
Every head attribute a forward may scale its logits by is set away from its default (Granite's logits_scaling 8 made
qlora's loss 54.86 where the model's own was 8.02), and a Mixture-of-Experts model adds its router's auxiliary loss.

Which model types: transformers 5.25 registers 200 for AutoModelForCausalLM. Tested here (and so in HEADS) are 78
decoder-only text models people fine-tune: Llama, Mistral/Ministral/Mixtral, Gemma 1-3 (Gemma-3's multimodal class
too), Qwen2/3/3.5/Next and their MoE, Phi-1/2/3, Granite 3/4 and their MoE, Cohere (Command-R) 1-2, OLMo 1-3, OLMoE
and FlexOlmo, StarCoder2, StableLM, GPT-NeoX (Pythia), Falcon and Falcon-H1, GPT-2, GPT-BigCode (StarCoder), GPT-J/Neo,
CodeGen, Bloom, OPT, MPT, Persimmon, DeepSeek-V2/V3, GLM/GLM-4 and their MoE, EXAONE 3/4, SmolLM3, InternLM3, MiniCPM3,
Nemotron and Nemotron-H, Hunyuan, ERNIE 4.5, Seed-OSS, Helium, Apertus, Arcee, gpt-oss, HyperCLOVA X, VaultGemma, LFM2,
Jamba, Bamba, MiniMax and a few newer ones that build as they are. Left to the model's own loss (qlora.loss.unproven):
encoders with a causal-LM head (bert, roberta, electra, ...), encoder-decoders (bart, marian, pegasus, ...), speech,
music and vision models (whisper, musicgen, moshi, git, fuyu, mllama, ...), recurrent models (mamba, rwkv, xlstm),
models whose head does more than HEADS can say (inkling's muP scaling and vocabulary cut), families qlora cannot
put LoRA on as it stands (jetmoe: no activation checkpointing; peft's LoRA breaks on phimoe's and llama4's routers),
and the rest, whose heads nobody here has read: each trains through full logits, and joins HEADS with a row in
ARCHITECTURES.
"""

import io

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from conftest import recipe_for
from qlora.check import model_shape, training_loss
from qlora.errors import UserError
from qlora.loss import HEADS, Objective, fusable_head, trained_token_loss, unproven
from qlora.model import add_lora, load_quantized_base
from qlora.plan import resolve_recipe

# the shared toy size, applied where a config has the attribute: every projection a multiple of 32 (bitsandbytes'
# CPU 4-bit kernel), two layers, four experts of which two route
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=64, shared_expert_intermediate_size=64, n_embd=64, n_layer=2, n_head=2,
            n_inner=128, n_positions=256, ffn_hidden_size=128, initializer_range=0.1)
# multi-head latent attention (DeepSeek-V2/V3, MiniCPM3) at toy size: every projection a multiple of 32
MLA = dict(kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
           num_key_value_heads=2)
# hybrids of attention and linear attention (gated delta rule) or Mamba-2 mixers: one layer of each, toy sized
GATED_DELTA = dict(linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=2,
                   layer_types=["linear_attention", "full_attention"])
MAMBA = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16)
# per model type: what its config needs beyond TINY to build at toy size
ARCHITECTURES = {
    **dict.fromkeys((
        "afmoe", "apertus", "apertus1p5_text", "arcee", "bloom", "cohere", "cohere2", "cohere2_moe", "cwm", "ernie4_5",
        "ernie4_5_moe", "exaone", "exaone4", "exaone_moe", "flex_olmo", "gemma", "gemma2", "gemma3_text", "glm", "glm4",
        "glm4_moe", "gpt2", "gpt_bigcode", "gpt_neox", "gpt_oss", "granite", "granitemoe", "granitemoeshared",
        "helium", "hunyuan_v1_dense", "hunyuan_v1_moe", "hyperclovax", "internlm3", "jais2", "jamba", "lfm2", "llama",
        "mimo_v2_flash", "minimax", "ministral", "ministral3", "mistral", "mixtral", "mpt", "nemotron", "olmo",
        "olmo2", "olmo3", "olmo_hybrid", "olmoe", "opt", "persimmon", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3",
        "qwen3_moe", "seed_oss", "smollm3", "stablelm", "starcoder2", "vaultgemma"), {}),
    "bamba": MAMBA, "codegen": {"rotary_dim": 16}, "gptj": {"rotary_dim": 16}, "falcon": {"num_kv_heads": 1},
    "deepseek_v2": MLA | {"first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
    "deepseek_v3": MLA | {"first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
    "glm4_moe_lite": MLA | {"first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
    "minicpm3": MLA | {"dim_model_base": 8},
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 8, "mamba_d_head": 8, "mamba_d_state": 16,
                  "mamba_chunk_size": 16},
    "gemma3": {"text_config": TINY, "mm_tokens_per_image": 4, "image_token_index": 300, "boi_token_index": 301,
               "eoi_token_index": 302, "vision_config": {"hidden_size": 64, "intermediate_size": 128,
                                                         "num_hidden_layers": 1, "num_attention_heads": 2,
                                                         "image_size": 28, "patch_size": 14}},
    "gpt_neo": {"num_layers": 2, "num_heads": 2, "attention_types": [[["global", "local"], 1]]},
    "granitemoehybrid": MAMBA | {"layer_types": ["mamba", "attention"]},
    "nemotron_h": MAMBA,
    "qwen3_5_text": GATED_DELTA, "qwen3_next": GATED_DELTA,
}
# LoRA targets where peft refuses qlora's default (all-linear): the Mamba mixers' out_proj of Falcon-H1, Nemotron-H
ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj"]
LORA_TARGETS = {"falcon_h1": ATTENTION_AND_MLP, "nemotron_h": ATTENTION_AND_MLP}
# away from every default: 1.0 scales nothing, and a soft-cap of 2 bends logits of about 1
HEAD_ATTRIBUTES = {"logits_scaling": 8.0, "logit_scale": 0.25, "lm_head_multiplier": 0.5, "output_multiplier": 0.5,
                   "final_logit_softcapping": 2.0}
AUX_LOSS_COEF = 0.05  # large enough that a forgotten router loss fails the comparison


def tiny_config(model_type: str):
    cls = CONFIG_MAPPING[model_type]
    defaults = cls()
    kwargs = {k: v for k, v in TINY.items() if hasattr(defaults, k) and not isinstance(getattr(cls, k, None), property)}
    kwargs |= ARCHITECTURES.get(model_type, {})
    config = cls(**kwargs)
    text = config.get_text_config()
    for name, value in HEAD_ATTRIBUTES.items():
        if hasattr(text, name) and not isinstance(getattr(type(text), name, None), property):
            setattr(text, name, value)
    for name in list(vars(text)):  # a deterministic forward in training mode
        if "dropout" in name or name.endswith("pdrop"):
            setattr(text, name, 0.0)
    if hasattr(text, "output_router_logits"):
        text.output_router_logits, text.router_aux_loss_coef = True, AUX_LOSS_COEF
    return config


def quantized_lora_model(directory, config, lora=None):
    """A random model of `config` saved in `directory` and loaded back as qlora trains it: the 4-bit base and LoRA
    (adapter weights perturbed from zero, so every layer's gradient flows through them), float32 compute."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory / "model")
    lora = {"target_modules": LORA_TARGETS.get(config.model_type, "all-linear")} | (lora or {})
    recipe = resolve_recipe(recipe_for(directory, directory / "model", quantization={"compute_dtype": "float32"},
                                       lora=lora))
    vocabulary = range(config.get_text_config().vocab_size)  # add_lora reads only len() without trained tokens
    model = add_lora(load_quantized_base(recipe), recipe, vocabulary)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return model


def batch():
    """Two rows, the second right-padded, prompts masked."""
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, 16))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 12:] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    labels[:, :5] = -100
    return {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}


def grads(model):
    """Every LoRA gradient, flattened: zeros where no gradient reached (a vision tower without images)."""
    return torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten()
                      for p in model.parameters() if p.requires_grad])


def compare(model, expected_loss, loss):
    """Backward both, return (relative loss difference, relative gradient difference)."""
    expected_loss.backward()
    expected = grads(model)
    model.zero_grad()
    loss.backward()
    got = grads(model)
    model.zero_grad()
    loss_error = abs(loss.item() - expected_loss.item()) / expected_loss.item()
    return loss_error, ((got - expected).norm() / expected.norm()).item()


def test_every_proven_model_type_is_tested():
    assert set(HEADS) == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_loss_and_lora_gradients_equal_the_models_own(tmp_path, model_type):
    model = quantized_lora_model(tmp_path, tiny_config(model_type))
    base = model.get_base_model()
    assert unproven(base) is None
    head = fusable_head(base)
    assert head is not None
    inputs = batch()
    expected = model(**inputs).loss
    total, count = trained_token_loss(base, head, inputs)
    assert count == (inputs["labels"][:, 1:] != -100).sum()
    loss_error, grad_error = compare(model, expected, total / count)
    assert loss_error < 1e-5 and grad_error < 1e-4, (loss_error, grad_error)


def reference_loss(model, inputs, objective):
    """`objective`'s mean loss from the model's own full logits, as TRL's SFTTrainer computes it (transformers'
    LabelSmoother; dft's probability-weighted log-likelihood), plus the router's auxiliary loss the forward returns."""
    from transformers.trainer_pt_utils import LabelSmoother

    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
    labels = inputs["labels"]
    if objective.label_smoothing:
        loss = LabelSmoother(epsilon=objective.label_smoothing)(outputs, labels, shift_labels=True)
    else:
        log_probs = outputs.logits[:, :-1].float().log_softmax(-1)
        target, mask = labels[:, 1:].clamp(min=0), labels[:, 1:] != -100
        log_p = log_probs.gather(-1, target[..., None]).squeeze(-1)[mask]
        loss = -(log_p * log_p.exp().detach()).sum() / mask.sum()
    aux = getattr(outputs, "aux_loss", None)
    return loss if aux is None else loss + model.get_base_model().router_aux_loss_coef * aux


@pytest.mark.parametrize("objective", [Objective(dft=True), Objective(label_smoothing=0.1)],
                         ids=["dft", "label-smoothing"])
@pytest.mark.parametrize("model_type", ["granite", "gemma2", "mixtral"])
def test_dft_and_label_smoothing_equal_trls_on_full_logits(tmp_path, model_type, objective):
    """train.extra's loss_type dft and label_smoothing_factor are computed by qlora's loss exactly (a scaled head, a
    soft-capped one, a Mixture of Experts with its router loss)."""
    model = quantized_lora_model(tmp_path, tiny_config(model_type))
    base = model.get_base_model()
    inputs = batch()
    total, count = trained_token_loss(base, fusable_head(base), inputs, objective)
    loss_error, grad_error = compare(model, reference_loss(model, inputs, objective), total / count)
    assert loss_error < 1e-5 and grad_error < 1e-4, (loss_error, grad_error)


def test_an_unproven_architecture_trains_with_its_own_loss(tmp_path):
    """Inkling scales its hidden states by a muP width multiplier and cuts its padded vocabulary before the loss: a
    head qlora.loss does not reproduce, so the model's own forward computes it, exactly."""
    model = quantized_lora_model(tmp_path, tiny_config("inkling_text"))
    base = model.get_base_model()
    assert unproven(base) == ("qlora's loss is not proven for model type inkling_text "
                              "(tests/test_loss_architectures.py)")
    inputs = batch()
    expected = model(**inputs).loss
    total, count = trained_token_loss(base, fusable_head(base), inputs)
    assert max(compare(model, expected, total / count)) < 1e-6
    with pytest.raises(ValueError, match="needs qlora's loss"):
        trained_token_loss(base, fusable_head(base), inputs, Objective(dft=True))


def test_a_trained_head_trains_with_the_models_own_loss(tmp_path):
    """lora.modules_to_save: [lm_head] trains the head in full: not fusable, so Granite's own forward (logits / 8)."""
    model = quantized_lora_model(tmp_path, tiny_config("granite"), lora={"modules_to_save": ["lm_head"]})
    base = model.get_base_model()
    assert fusable_head(base) is None
    inputs = batch()
    expected = model(**inputs).loss
    total, count = trained_token_loss(base, None, inputs)
    assert max(compare(model, expected, total / count)) < 1e-6


def test_a_remote_code_class_is_not_proven():
    from transformers import LlamaConfig, LlamaForCausalLM

    class CustomLlamaForCausalLM(LlamaForCausalLM):  # trust_remote_code: any forward, under a known model type
        pass

    with torch.device("meta"):
        model = CustomLlamaForCausalLM(LlamaConfig(**{k: TINY[k] for k in ("vocab_size", "hidden_size",
                                                                          "intermediate_size", "num_hidden_layers")}))
    assert unproven(model) == "CustomLlamaForCausalLM is not transformers' own class for llama (remote code)"


def loss_line(directory, model_type, **sections):
    """What `qlora check` says of the loss for a recipe training a `model_type` (its config alone is read)."""
    tiny_config(model_type).save_pretrained(directory / model_type)
    recipe = recipe_for(directory, directory / model_type, **sections)
    return training_loss(recipe, model_shape(recipe))


def test_check_says_which_loss_train_computes(tmp_path, make_recipe):
    from rich.console import Console

    from qlora.check import check, print_report

    assert loss_line(tmp_path, "granite") == (
        "qlora's at trained positions only (proven equal to GraniteForCausalLM's own): cross-entropy")
    assert loss_line(tmp_path, "mixtral", train={"extra": {"loss_type": "dft"}}) == (
        "qlora's at trained positions only (proven equal to MixtralForCausalLM's own): dft + router auxiliary loss x "
        f"{AUX_LOSS_COEF:g}")
    assert loss_line(tmp_path, "qwen3_moe", train={"extra": {"router_aux_loss_coef": 0.0}}).endswith(
        "own): cross-entropy")
    assert loss_line(tmp_path, "inkling_text", train={"extra": {"label_smoothing_factor": 0.0}}) == (
        "InklingForCausalLM's own forward with labels (full logits): cross-entropy; qlora's loss is not proven for "
        "model type inkling_text (tests/test_loss_architectures.py)")
    assert loss_line(tmp_path, "granite", lora={"modules_to_save": ["lm_head"]}).endswith(
        "(full logits): cross-entropy; lora trains its LM head lm_head")
    out = io.StringIO()
    recipe = make_recipe(arch="llama")
    print_report(check(recipe), recipe, Console(file=out, width=200))
    assert "loss qlora's at trained positions only (proven equal to LlamaForCausalLM's own): cross-entropy\n" in (
        out.getvalue())


@pytest.mark.parametrize("model_type, sections, error", [
    ("granite", {"lora": {"modules_to_save": ["lm_head"]}, "train": {"extra": {"label_smoothing_factor": 0.1}}},
     "train.extra.label_smoothing_factor: only qlora's loss computes it, and lora trains its LM head lm_head; "
     "remove it"),
    ("inkling_text", {"train": {"extra": {"loss_type": "dft"}}},
     "train.extra.loss_type: dft: only qlora's loss computes it, and qlora's loss is not proven for model type "
     "inkling_text (tests/test_loss_architectures.py); remove it"),
    ("llama", {"train": {"extra": {"loss_type": "dft", "label_smoothing_factor": 0.1}}},
     "train.extra: loss_type dft and label_smoothing_factor together, but TRL trains dft without smoothing; "
     "remove one"),
    ("llama", {"train": {"extra": {"router_aux_loss_coef": 0.01}}},
     "train.extra.router_aux_loss_coef: LlamaForCausalLM is not a Mixture-of-Experts model returning router "
     "logits; remove it"),
])
def test_check_refuses_an_objective_it_would_not_train_as_written(tmp_path, model_type, sections, error):
    with pytest.raises(UserError) as info:
        loss_line(tmp_path, model_type, **sections)
    assert str(info.value) == error
