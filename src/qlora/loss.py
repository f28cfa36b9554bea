"""The training loss, computed only where it is trained: the LM head scores just the positions whose next token is
a trained label, in chunks, and the gradient of those chunks is taken in the same pass.

A plain causal-LM loss builds logits for every position (batch x length x vocabulary, then a float32 copy for the
softmax, then its gradient). Here the backbone's hidden states are gathered at the trained positions only (a
prompt is about 58% of the tokens of Alpaca-style code data), and each chunk of them is projected, softmaxed and
differentiated at once, as fused linear-cross-entropy kernels do: the chunk's logits are freed before the next
chunk, nothing is recomputed in backward, and the backward pass only scales the stored input gradient. It is pure
PyTorch, so the CPU and CUDA run the same code.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # float32 logits per chunk (128 MiB): Gemma's 256k vocabulary -> 131 tokens at a time


class TrainedTokenCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `labels` given `hidden` (n x d) and the head `weight` (vocab x d, frozen), with the
    gradient w.r.t. `hidden` computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, scale):
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # in the head weight's dtype, as autocast runs it
            for start in range(0, n, chunk):
                h, y = hidden[start:start + chunk].to(weight.dtype), labels[start:start + chunk]
                logits = (h @ weight.T).float()
                if bias is not None:
                    logits += bias
                if scale != 1.0:
                    logits *= scale
                if softcap:
                    capped = torch.tanh(logits / softcap)
                    logits = capped * softcap
                lse = torch.logsumexp(logits, dim=-1)
                target = logits.gather(1, y[:, None]).squeeze(1)
                total += (lse - target).sum()
                if grad_hidden is None:
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(y), device=y.device), y] -= 1
                if softcap:
                    grad *= 1 - capped * capped
                if scale != 1.0:
                    grad *= scale
                grad_hidden[start:start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None


def head_scaling(config) -> tuple[float | None, float]:
    """(final logit soft-cap, logit scale) of a model's LM head, as its own forward applies them."""
    text = config.get_text_config()
    scale = getattr(text, "logit_scale", None) or 1.0
    return getattr(text, "final_logit_softcapping", None), float(scale)


def fusable_head(model) -> torch.nn.Linear | None:
    """The LM head when it is a plain frozen linear layer (the usual QLoRA case), else None: a head with LoRA or
    trained in full (lora.modules_to_save) needs the model's own forward."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.requires_grad:
        return None
    if head.bias is not None and head.bias.requires_grad:
        return None
    return head


def trained_token_loss(base_model, head: torch.nn.Linear, inputs: dict):
    """(summed loss, trained tokens) of a batch through `base_model` (the transformers
    model under peft) and its fusable `head`, scoring only positions whose next token is trained. `inputs` holds
    `labels` (-100 where not trained) and the backbone's inputs (input_ids, position_ids or attention_mask)."""
    labels = inputs["labels"][:, 1:]
    backbone = getattr(base_model, base_model.base_model_prefix)
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = backbone(**kwargs, use_cache=False).last_hidden_state[:, :-1]
    mask = labels != IGNORE_INDEX
    softcap, scale = head_scaling(base_model.config)
    total = TrainedTokenCrossEntropy.apply(hidden[mask], head.weight, head.bias, labels[mask], softcap, scale)
    return total, mask.sum()
