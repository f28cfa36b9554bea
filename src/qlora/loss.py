"""The training loss, computed only where it is trained: the LM head scores just the positions whose next token is
a trained label, in chunks, and the gradient of those chunks is taken in the same pass.

A plain causal-LM loss builds logits for every position (batch x length x vocabulary, then a float32 copy for the
softmax, then its gradient). Here the backbone's hidden states are gathered at the trained positions only (a
prompt is about 58% of the tokens of Alpaca-style code data), and each chunk of them is projected, softmaxed and
differentiated at once, as fused linear-cross-entropy kernels do: the chunk's logits are freed before the next
chunk, nothing is recomputed in backward, and the backward pass only scales the stored input gradient. It is pure
PyTorch, so the CPU and CUDA run the same code.

It is used only where it is proven equal to the model's own loss: transformers' own class for a model type in HEADS
(tests/test_loss_architectures.py compares loss and LoRA gradients for each), with a frozen plain LM head. Any other
model, or a head LoRA trains, gets the model's own forward with labels (full logits): slower, never a different
objective.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # float32 logits per chunk (128 MiB): Gemma's 256k vocabulary -> 131 tokens at a time

MULTIPLY, DIVIDE, SOFTCAP = "multiply", "divide", "softcap"
# model type -> what its ForCausalLM.forward does to the LM head's output before its loss: (text config attribute,
# operation) in order, a soft-cap (cap * tanh(logits / cap), skipped when the attribute is None) last. Exactly the
# model types tests/test_loss_architectures.py proves qlora's loss and gradients equal to the model's own for, with
# every head attribute set away from its default; a type missing here (a new architecture may scale its head in a way
# nobody listed) trains with the model's own loss. MiniCPM3 divides the hidden states, which for its bias-free head is
# dividing the logits. Gemma-3's multimodal class never soft-caps, whatever its text config says.
HEADS = {
    **dict.fromkeys((
        "afmoe", "apertus", "apertus1p5_text", "arcee", "bamba", "bloom", "codegen", "cwm", "deepseek_v2",
        "deepseek_v3", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "exaone_moe", "falcon", "flex_olmo", "gemma",
        "gemma3", "glm", "glm4", "glm4_moe", "glm4_moe_lite", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gpt_oss",
        "gptj", "helium", "hunyuan_v1_dense", "hunyuan_v1_moe", "internlm3", "jais2", "jamba", "lfm2", "llama",
        "mimo_v2_flash", "minimax", "ministral", "ministral3", "mistral", "mixtral", "mpt", "nemotron", "nemotron_h",
        "olmo", "olmo2", "olmo3", "olmo_hybrid", "olmoe", "opt", "persimmon", "phi", "phi3", "qwen2", "qwen2_moe",
        "qwen3", "qwen3_5_text", "qwen3_moe", "qwen3_next", "seed_oss", "smollm3", "stablelm", "starcoder2"), ()),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), (("logit_scale", MULTIPLY),)),
    **dict.fromkeys(("granite", "granitemoe", "granitemoehybrid", "granitemoeshared", "minicpm3"),
                    (("logits_scaling", DIVIDE),)),
    "hyperclovax": (("logits_scaling", MULTIPLY),),
    "falcon_h1": (("lm_head_multiplier", MULTIPLY),),
    **dict.fromkeys(("gemma2", "gemma3_text", "vaultgemma"), (("final_logit_softcapping", SOFTCAP),)),
}


@dataclass(frozen=True)
class Objective:
    """A trained token's loss as TRL's SFTTrainer defines it (SFTConfig's loss_type and label_smoothing_factor)."""

    dft: bool = False  # loss_type dft: each token's negative log-likelihood times its (detached) probability
    label_smoothing: float = 0.0  # transformers' LabelSmoother: (1 - e) * nll + e * the vocabulary's mean -log p


def chunk_loss(h, weight, bias, labels, softcap, scale, rows, row_weight, objective: Objective, with_grad: bool):
    """(summed loss, gradient w.r.t. `h` or None, gradient w.r.t. `row_weight` or None) of one chunk of hidden
    states, in float32 logits that are freed on return: at most the logits in float32 and one copy in the weight's
    dtype exist at any time. `row_weight` (len(rows) x d, trained) stands in for `weight`'s `rows`."""
    logits = (h @ weight.T).float()
    if rows is not None:
        logits[:, rows] = (h @ row_weight.to(h.dtype).T).float()
    if bias is not None:
        logits += bias
    if scale != 1.0:
        logits *= scale
    if softcap:
        capped = logits.div_(softcap).tanh_()
        logits = capped * softcap
    target = logits.gather(1, labels[:, None]).squeeze(1)
    smoothing = objective.label_smoothing
    mean = logits.mean(dim=-1) if smoothing else None
    # a log-sum-exp whose exponentials stay in the logits' memory and then become the softmax: torch.logsumexp
    # would allocate two more float32 chunks
    top = logits.amax(dim=-1)
    sums = logits.sub_(top[:, None]).exp_().sum(dim=-1)
    log_z = top + sums.log()
    nll = log_z - target
    per_token = (1 - smoothing) * nll + smoothing * (log_z - mean) if smoothing else nll
    probability = nll.neg().exp() if objective.dft else None
    loss = (per_token * probability if objective.dft else per_token).sum()
    if not with_grad:
        return loss, None, None
    grad = logits.div_(sums[:, None])
    grad[torch.arange(len(labels), device=labels.device), labels] -= 1 - smoothing
    if smoothing:
        grad -= smoothing / grad.shape[1]
    if objective.dft:
        grad *= probability[:, None]
    if softcap:
        grad *= capped.square_().neg_().add_(1)
    if scale != 1.0:
        grad *= scale
    grad_h = grad.to(weight.dtype) @ weight
    if rows is None:
        return loss, grad_h, None
    grad_rows = grad[:, rows]
    grad_h += (grad_rows @ (row_weight.float() - weight[rows].float())).to(grad_h.dtype)
    return loss, grad_h, grad_rows.T @ h.float()


class TrainedTokenCrossEntropy(torch.autograd.Function):
    """Summed loss (cross-entropy, or `objective`'s) of `labels` given `hidden` (n x d) and the head `weight`
    (vocab x d, frozen) whose `rows` are `row_weight` (trained, or None), with the gradients computed chunk by chunk in
    the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, scale, rows, row_weight, objective):
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_rows = torch.zeros_like(row_weight, dtype=torch.float32) if ctx.needs_input_grad[7] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        device = hidden.device.type
        # the matmuls run in the dtype the model's own head would: autocast's (fp16 on a T4, where peft keeps the
        # head's weight in float32), cast once as autocast does per call, else the weight's; the loss in float32
        if torch.is_autocast_enabled(device) and weight.dtype != torch.get_autocast_dtype(device):
            weight = weight.to(torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            for start in range(0, n, chunk):
                loss, grad, grad_row = chunk_loss(
                    hidden[start:start + chunk].to(weight.dtype), weight, bias, labels[start:start + chunk],
                    softcap, scale, rows, row_weight, objective, grad_hidden is not None or grad_rows is not None)
                total += loss
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = grad
                if grad_rows is not None:
                    grad_rows += grad_row
        ctx.save_for_backward(grad_hidden, grad_rows)
        ctx.row_dtype = None if row_weight is None else row_weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_rows = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None,
                None, None, None, None if grad_rows is None else (grad_rows * grad_total).to(ctx.row_dtype), None)


NLL = Objective()


def head_scaling(config) -> tuple[float | None, float]:
    """(final logit soft-cap or None, logit scale) of a model type in HEADS, as its own forward applies them."""
    text = config.get_text_config()
    softcap, scale = None, 1.0
    for attribute, operation in HEADS[config.model_type]:
        value = getattr(text, attribute)
        if operation == SOFTCAP:
            softcap = value
        else:
            scale = scale * value if operation == MULTIPLY else scale / value
    return softcap, float(scale)


def unproven(model) -> str | None:
    """Why qlora's loss is not proven equal to `model`'s own (the transformers model, under peft or not), or None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = model.config
    if config.model_type not in HEADS:
        return f"qlora's loss is not proven for model type {config.model_type} (tests/test_loss_architectures.py)"
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or MODEL_FOR_CAUSAL_LM_MAPPING[type(config)] is not type(model):
        return f"{type(model).__name__} is not transformers' own class for {config.model_type} (remote code)"
    return None


def fusable_head(model) -> torch.nn.Module | None:
    """The LM head when it is a frozen plain linear layer (the usual QLoRA case), or one whose lora.trained_tokens
    rows peft trains (a TrainableTokensWrapper around it), else None: a head with LoRA or trained in full
    (lora.modules_to_save) needs the model's own forward."""
    from peft.utils.other import TrainableTokensWrapper

    head = model.get_output_embeddings()
    layer = head.token_adapter.base_layer if isinstance(head, TrainableTokensWrapper) else head
    if type(layer) is not torch.nn.Linear or layer.weight.requires_grad:
        return None
    if layer.bias is not None and layer.bias.requires_grad:
        return None
    return head


def head_parts(head: torch.nn.Module) -> tuple:
    """(frozen weight, bias, trained row ids or None, their trained weights or None) of a fusable head. peft's
    trainable tokens replace the rows of their ids by their own weights (the tied head's are the embedding's)."""
    from peft.utils.other import TrainableTokensWrapper

    if not isinstance(head, TrainableTokensWrapper):
        return head.weight, head.bias, None, None
    adapter = head.token_adapter
    layer = adapter.base_layer
    if adapter.disable_adapters or adapter.merged:  # the base's own rows (disable_adapter(), or folded in)
        return layer.weight, layer.bias, None, None
    (name,) = adapter.active_adapters
    rows = torch.tensor(adapter.token_indices[name], device=layer.weight.device)
    return layer.weight, layer.bias, rows, adapter.trainable_tokens_delta[name]


def last_hidden_states(base_model, inputs: dict) -> tuple:
    """(the backbone's last hidden states, the router's auxiliary loss as the model's forward weights it, or None) for
    `inputs` without labels."""
    backbone = getattr(base_model, base_model.base_model_prefix)
    text = base_model.config.get_text_config()
    if not getattr(text, "output_router_logits", False):
        return backbone(**inputs, use_cache=False).last_hidden_state, None
    # each Mixture-of-Experts family computes its auxiliary loss in its own forward, its own way: run that forward with
    # the logits of one position only, and take the backbone's hidden states on the way
    states = []
    hook = backbone.register_forward_hook(lambda module, args, output: states.append(output.last_hidden_state))
    try:
        aux = base_model(**inputs, use_cache=False, logits_to_keep=1).aux_loss
    finally:
        hook.remove()
    return states[0], None if aux is None else base_model.router_aux_loss_coef * aux


def own_loss(base_model, inputs: dict):
    """(summed loss, trained tokens) from the model's own forward with labels (full logits): its mean times the
    trained tokens."""
    count = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
    return base_model(**inputs, use_cache=False).loss * count, count


def trained_token_loss(base_model, head: torch.nn.Module | None, inputs: dict, objective: Objective = NLL):
    """(summed loss, trained tokens) of a batch through `base_model` (the transformers model under peft) and its
    fusable `head`, scoring only positions whose next token is trained; the model's own loss where qlora's is not
    proven equal to it (`head` None, or `unproven`). `inputs` holds `labels` (-100 where not trained) and the
    backbone's inputs (input_ids, position_ids or attention_mask). A router auxiliary loss counts once per trained
    token, so the sum over the trained tokens is, as a mean, the model's own loss."""
    if head is None or unproven(base_model):
        if objective != NLL:  # qlora check refuses these recipes
            raise ValueError(f"{objective} needs qlora's loss: {unproven(base_model) or 'the LM head is trained'}")
        return own_loss(base_model, inputs)
    labels = inputs["labels"][:, 1:]
    hidden, aux = last_hidden_states(base_model, {k: v for k, v in inputs.items() if k != "labels"})
    mask = labels != IGNORE_INDEX
    softcap, scale = head_scaling(base_model.config)
    weight, bias, rows, row_weight = head_parts(head)
    total = TrainedTokenCrossEntropy.apply(hidden[:, :-1][mask], weight, bias, labels[mask], softcap, scale, rows,
                                           row_weight, objective)
    count = mask.sum()
    return (total, count) if aux is None else (total + aux * count, count)


def add_trained_token_loss(model) -> None:
    """Let `model(**inputs, qlora_loss=True)` (or an Objective instead of True) return trained_token_loss's (summed
    loss, trained tokens), so the loss is computed inside the forward of every wrapper around the model (peft, and
    DDP, which must run the forward to reduce the gradients), the way TRL's add_fused_lm_head patches a model; without
    the flag the forward is the model's own, so generation is unchanged. `model` is the transformers model (under
    peft)."""
    if getattr(model, "qlora_loss_added", False):
        return
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, qlora_loss: bool | Objective = False, **kwargs):
        if not qlora_loss:
            return original(*args, **kwargs)
        inputs = {k: v for k, v in kwargs.items()
                  if v is not None and k not in ("output_attentions", "output_hidden_states", "return_dict")}
        return trained_token_loss(self, fusable_head(self), inputs, NLL if qlora_loss is True else qlora_loss)

    model.forward = types.MethodType(forward, model)
    model.qlora_loss_added = True
