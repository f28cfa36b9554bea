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

import functools
import types

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # float32 logits per chunk (128 MiB): Gemma's 256k vocabulary -> 131 tokens at a time


def chunk_loss(h, weight, bias, labels, softcap, scale, rows, row_weight, with_grad: bool):
    """(summed cross-entropy, gradient w.r.t. `h` or None, gradient w.r.t. `row_weight` or None) of one chunk of
    hidden states, in float32 logits that are freed on return: at most the logits in float32 and one copy in the
    weight's dtype exist at any time. `row_weight` (len(rows) x d, trained) stands in for `weight`'s `rows`."""
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
    # a log-sum-exp whose exponentials stay in the logits' memory and then become the softmax: torch.logsumexp
    # would allocate two more float32 chunks
    top = logits.amax(dim=-1)
    sums = logits.sub_(top[:, None]).exp_().sum(dim=-1)
    loss = (top + sums.log() - target).sum()
    if not with_grad:
        return loss, None, None
    grad = logits.div_(sums[:, None])
    grad[torch.arange(len(labels), device=labels.device), labels] -= 1
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
    """Summed cross-entropy of `labels` given `hidden` (n x d) and the head `weight` (vocab x d, frozen) whose `rows`
    are `row_weight` (trained, or None), with the gradients computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, scale, rows, row_weight):
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_rows = torch.zeros_like(row_weight, dtype=torch.float32) if ctx.needs_input_grad[7] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # in the head weight's dtype, as autocast runs it
            for start in range(0, n, chunk):
                loss, grad, grad_row = chunk_loss(
                    hidden[start:start + chunk].to(weight.dtype), weight, bias, labels[start:start + chunk],
                    softcap, scale, rows, row_weight, grad_hidden is not None or grad_rows is not None)
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
                None, None, None, None if grad_rows is None else (grad_rows * grad_total).to(ctx.row_dtype))


def head_scaling(config) -> tuple[float | None, float]:
    """(final logit soft-cap, logit scale) of a model's LM head, as its own forward applies them."""
    text = config.get_text_config()
    scale = getattr(text, "logit_scale", None) or 1.0
    return getattr(text, "final_logit_softcapping", None), float(scale)


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


def trained_token_loss(base_model, head: torch.nn.Module, inputs: dict):
    """(summed loss, trained tokens) of a batch through `base_model` (the transformers
    model under peft) and its fusable `head`, scoring only positions whose next token is trained. `inputs` holds
    `labels` (-100 where not trained) and the backbone's inputs (input_ids, position_ids or attention_mask)."""
    labels = inputs["labels"][:, 1:]
    backbone = getattr(base_model, base_model.base_model_prefix)
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = backbone(**kwargs, use_cache=False).last_hidden_state[:, :-1]
    mask = labels != IGNORE_INDEX
    softcap, scale = head_scaling(base_model.config)
    weight, bias, rows, row_weight = head_parts(head)
    total = TrainedTokenCrossEntropy.apply(hidden[mask], weight, bias, labels[mask], softcap, scale, rows, row_weight)
    return total, mask.sum()


def add_trained_token_loss(model) -> None:
    """Let `model(**inputs, qlora_loss=True)` return trained_token_loss's (summed loss, trained tokens), so the loss
    is computed inside the forward of every wrapper around the model (peft, and DDP, which must run the forward to
    reduce the gradients), the way TRL's add_fused_lm_head patches a model; without the flag the forward is the
    model's own, so generation is unchanged. `model` is the transformers model (under peft)."""
    if getattr(model, "qlora_loss_added", False):
        return
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, qlora_loss=False, **kwargs):
        if not qlora_loss:
            return original(*args, **kwargs)
        inputs = {k: v for k, v in kwargs.items()
                  if v is not None and k not in ("output_attentions", "output_hidden_states", "return_dict")}
        return trained_token_loss(self, fusable_head(self), inputs)

    model.forward = types.MethodType(forward, model)
    model.qlora_loss_added = True
