"""`qlora check`: a pre-flight report on the data, the masking and the memory a recipe will need.

It loads the tokenizer, the data and the model's config only (never the weights), runs the same
row checks `train` runs, and estimates peak memory (the GPU's, or RAM on a CPU) from the config alone.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlora.collate import best_fit_decreasing
from qlora.config import Recipe
from qlora.data import (IGNORE_INDEX, TEMPLATES, DataReport, Template, build_datasets, is_local_path, load_rows,
                        tokenize_rows)
from qlora.errors import UserError
from qlora.evaluate import EVAL_SHARE, Problem, prompt_ids, training_eval_settings, training_problems
from qlora.files import check_creatable
from qlora.loss import CHUNK_ELEMENTS, unproven
from qlora.plan import Plan, device_memory, make_plan
from qlora.rundir import METRICS_FILE, RunPlan, data_fingerprint, plan_run, refuse_if_locked
from qlora.runfiles import read_metrics

GB = 1024**3
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantization: one fp32 constant per 256 absmax values
# optimizer state bytes per trainable parameter
OPTIMIZER_BYTES = {"adamw_torch": 8, "paged_adamw_32bit": 8, "paged_adamw_8bit": 2, "adamw_8bit": 2, "adafactor": 4}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# one optimizer step on this CPU, SmolLM2-135M's LoRA adapter (4.9M parameters), ms: scripts/bench_optimizer.py,
# benchmarks/results/optimizer-smollm2-135m-cpu.json
CPU_STEP_MS = {"adamw_torch": 30.4, "paged_adamw_8bit": 141.9}
# a year at 1 ms a step: no step takes less (the trainer's own Python work per step is more), so a longer run never ends
MOST_STEPS = 365 * 24 * 3600 * 1000


@dataclass
class ModelShape:
    """Parameter counts of a model, and what decides how its loss is computed, read from its config on the meta
    device (no weights)."""

    quantized: int  # weights of the linear layers bitsandbytes quantizes (all but the output head)
    other: int  # embeddings, norms, an untied output head
    embeddings: int  # of `other`: the input embedding and an untied output head
    embedding_name: str  # the input embedding's module name, last part (embed_tokens)
    lora: int  # trainable adapter parameters for the recipe's lora section
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv: int  # width of the key and value projections (key-value heads x head size)
    largest: int  # weights of the largest quantized linear layer, which is dequantized whole for its matmul
    class_name: str  # GraniteForCausalLM
    loss_fallback: str | None  # why the model's own forward computes the loss instead of qlora.loss, or None
    router_aux_loss_coef: float | None  # its config's, where the model returns router logits (Mixture of Experts)


def model_shape(recipe: Recipe) -> ModelShape:
    """Count parameters by building the model on the meta device from its config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(recipe.model.name_or_path, revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code)
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot read the config of {recipe.model.name_or_path!r}: {exc}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    embeddings = embedding.weight.numel()
    if head is not None and head.weight is not embedding.weight:
        embeddings += head.weight.numel()
    targets = recipe.lora.target_modules
    quantized = lora = largest = 0
    linear_names = set()
    narrowest = None  # the targeted layer whose smaller side is the smallest
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        quantized += module.weight.numel()
        largest = max(largest, module.weight.numel())
        linear_names.add(name.rsplit(".", 1)[-1])
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
            lora += recipe.lora.r * (module.in_features + module.out_features)
            if narrowest is None or min(module.in_features, module.out_features) < min(narrowest[1:]):
                narrowest = (name.rsplit(".", 1)[-1], module.in_features, module.out_features)
    check_module_names(model, recipe, sorted(linear_names))
    check_rank(recipe, *narrowest)
    head_name = next(n for n, m in model.named_modules() if m is head).rsplit(".", 1)[-1]
    check_trained_tokens(head, head_name, recipe)
    trained = targets != "all-linear" and head_name in targets or head_name in recipe.lora.modules_to_save
    total = sum(p.numel() for p in model.parameters())
    text = getattr(config, "text_config", config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    embedding_name = next(n for n, m in model.named_modules() if m is embedding).rsplit(".", 1)[-1]
    return ModelShape(quantized=quantized, other=total - quantized, embeddings=embeddings,
                      embedding_name=embedding_name, lora=lora,
                      hidden=text.hidden_size,
                      intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                      layers=text.num_hidden_layers, vocab=text.vocab_size,
                      kv=(getattr(text, "num_key_value_heads", None) or heads) * head_dim, largest=largest,
                      class_name=type(model).__name__,
                      loss_fallback=f"lora trains its LM head {head_name}" if trained else unproven(model),
                      router_aux_loss_coef=getattr(text, "router_aux_loss_coef", 0.0)
                      if hasattr(text, "output_router_logits") else None)


def check_module_names(model, recipe: Recipe, linear_names: list[str]) -> None:
    """lora.target_modules and lora.modules_to_save must each name a module of the model (peft matches the
    last part of a module's dotted name); a misspelt one would train less than the recipe says, or fail later."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} - {""}
    targets = [] if recipe.lora.target_modules == "all-linear" else recipe.lora.target_modules
    for key, wanted, kind, valid in (("lora.target_modules", targets, "linear layers", linear_names),
                                     ("lora.modules_to_save", recipe.lora.modules_to_save, "modules",
                                      sorted(n for n in names if not n.isdigit()))):
        missing = [name for name in wanted if name not in names]
        if missing:
            raise UserError(f"{key}: {', '.join(missing)} matches no layer of {recipe.model.name_or_path}; "
                            f"its {kind} are {', '.join(valid)}")


def check_rank(recipe: Recipe, layer: str, inputs: int, outputs: int) -> None:
    """lora.r may not exceed the width of the narrowest layer it targets: the update of an inputs x outputs layer
    has rank at most min(inputs, outputs), so a larger r only adds parameters and memory."""
    width = min(inputs, outputs)
    if recipe.lora.r > width:
        raise UserError(f"lora.r: {recipe.lora.r} is above {width}, the width of {layer} ({inputs} -> {outputs}), "
                        f"the narrowest layer it targets: an update of that layer has rank at most {width}; use "
                        f"r <= {width} or leave {layer} out of lora.target_modules")


def check_run_length(recipe: Recipe, rows: int) -> None:
    """The run must end within a year even at 1 ms a step (MOST_STEPS): train.max_steps, or train.epochs over the
    data's optimizer steps per epoch."""
    t = recipe.train
    if t.max_steps is not None:
        steps, key = t.max_steps, f"train.max_steps: {t.max_steps}"
    else:
        per_epoch = max(1, -(-rows // t.batch_size) // t.grad_accum)
        steps, key = t.epochs * per_epoch, f"train.epochs: {t.epochs:g} x {per_epoch} steps per epoch"
    if steps > MOST_STEPS:
        raise UserError(f"{key} would take more than a year even at 1 ms a step (less than any step takes); give "
                        f"at most {MOST_STEPS:,} steps")


def memory_problem(recipe: Recipe, memory: dict[str, Any]) -> str | None:
    """Why the worst micro-batch (estimate_memory) cannot fit this device's memory, or None: train would run out
    at such a batch."""
    available, device = device_memory()
    if memory["total"] <= available:
        return None
    if memory["loading_whole_base"] > available:
        return (f"train.distributed: fsdp: every GPU loads the whole 4-bit base before FSDP shards it, an estimated "
                f"{memory['loading_whole_base'] / GB:,.1f} GiB, more than the {available / GB:.1f} GiB of {device} "
                "(accelerate 1.16 loads only a full-precision base on rank 0 alone); use GPUs with more memory")
    rows = recipe.train.batch_size
    return (f"train.batch_size: {rows} rows of {memory['tokens_per_micro_batch'] // rows:,} tokens (the longest "
            f"example) need an estimated {memory['total'] / GB:,.1f} GiB, more than the {available / GB:.1f} GiB of "
            f"{device}; lower train.batch_size (raise train.grad_accum to keep the effective batch), data.max_length "
            "or lora.r (`qlora check` shows the estimate by part)")


def worst_micro_batch(recipe: Recipe, shape: ModelShape, report: DataReport, processes: int = 1) -> dict[str, Any]:
    """estimate_memory for batch_size rows of the longest example, each with the most trained tokens of any."""
    b = recipe.train.batch_size
    return estimate_memory(recipe, shape, b * max(report.lengths), b * report.most_trained, processes)


def check_trained_tokens(head, name: str, recipe: Recipe) -> None:
    """peft's trainable tokens compute an LM head without its bias (Phi-2 has one) outside our loss, so generation
    from the adapter would differ from training: such a head must be trained in full instead."""
    lora = recipe.lora
    if not lora.trained_tokens or getattr(head, "bias", None) is None:
        return
    if name not in lora.modules_to_save:
        raise UserError(f"lora.trained_tokens: the LM head of {recipe.model.name_or_path} has a bias, which peft's "
                        f"trainable tokens drop; add {name} to lora.modules_to_save to train the head in full")


def training_loss(recipe: Recipe, shape: ModelShape) -> str:
    """How `train` computes the loss, in one line (qlora.loss, or the model's own forward, and the objective
    SFTTrainer defines from train.extra); UserError for an objective it would not train as written."""
    extra = recipe.train.extra
    dft, smoothing = extra.get("loss_type") == "dft", extra.get("label_smoothing_factor", 0.0)
    if dft and smoothing:
        raise UserError("train.extra: loss_type dft and label_smoothing_factor together, but TRL trains dft without "
                        "smoothing; remove one")
    # the auxiliary loss as SFTTrainer enables it: the config's coefficient unless train.extra sets one
    coef = extra.get("router_aux_loss_coef")
    if coef and shape.router_aux_loss_coef is None:
        raise UserError(f"train.extra.router_aux_loss_coef: {shape.class_name} is not a Mixture-of-Experts model "
                        "returning router logits; remove it")
    aux = shape.router_aux_loss_coef if coef is None else coef
    objective = ("dft" if dft else f"label smoothing {smoothing:g}" if smoothing else "cross-entropy") + (
        f" + router auxiliary loss x {aux:g}" if aux else "")
    if shape.loss_fallback is None:
        return f"qlora's at trained positions only (proven equal to {shape.class_name}'s own): {objective}"
    if dft or smoothing:
        key = "loss_type: dft" if dft else "label_smoothing_factor"
        raise UserError(f"train.extra.{key}: only qlora's loss computes it, and {shape.loss_fallback}; remove it")
    return f"{shape.class_name}'s own forward with labels (full logits): {objective}; {shape.loss_fallback}"


def estimate_memory(recipe: Recipe, shape: ModelShape, tokens: int, trained: int | None = None,
                    processes: int = 1) -> dict[str, Any]:
    """Peak memory (bytes) of one GPU by part, for a micro-batch of `tokens` tokens of which `trained` (all by
    default) are scored by the LM head (`qlora check`: batch_size rows of the longest example, each with the most
    trained tokens of any example: the worst case), with `processes` GPUs training: DDP holds everything on every
    GPU, FSDP splits the weights and the adapter's state over them once it has loaded the 4-bit base whole on each.

    The formula is written out in docs/performance.md ("Memory estimate"); scripts/bench.py measures each part.
    """
    q, t = recipe.quantization, recipe.train
    compute = DTYPE_BYTES[q.compute_dtype]
    if q.quantized:
        if q.load_in_4bit:
            weights = shape.quantized * 0.5
            constants = shape.quantized / NF4_BLOCK * (1 + 4 / NESTED_BLOCK if q.double_quant else 4)
        else:  # LLM.int8: one byte per weight; its float32 scale per output row is lost in the rounding
            weights, constants = shape.quantized * 1.0, 0.0
        # add_lora: norms in float32 (peft's k-bit preparation); the embedding and head back in bf16 when bf16
        # computes, float32 otherwise
        embedding = compute if q.compute_dtype == "bfloat16" else 4
        other = shape.embeddings * embedding + (shape.other - shape.embeddings) * 4
        # a float32 norm weight times a compute-dtype activation is float32: so is the residual stream between layers
        stream = 4
        dequantized = shape.largest * compute  # each quantized weight is dequantized whole for its matmul
    else:
        weights, constants, embedding = shape.quantized * compute, 0.0, compute
        other = shape.other * compute
        stream, dequantized = compute, 0
    adapters = shape.lora * (4 + 4 + OPTIMIZER_BYTES[t.optimizer])  # fp32 weights, fp32 grads, optimizer state
    h, i, kv = shape.hidden, shape.intermediate, shape.kv
    # what one layer keeps for backward (counted with saved-tensor hooks on the twins: 4 MLP-wide and 8 hidden-wide
    # tensors in the stream's dtype, 1 MLP-wide and 6 hidden-wide in the compute dtype, queries, keys, values and
    # the attention output) and one MLP-wide gradient in flight
    per_layer_full = tokens * ((5 * stream + compute) * i + 8 * (stream + compute) * h + 2 * compute * kv)
    # checkpointing keeps each layer's input (the stream, ~5 bytes per element with the checkpoint's own records,
    # measured) and recomputes one layer at a time in backward
    with_ckpt = shape.layers * tokens * h * (stream + 1) + per_layer_full + dequantized
    without_ckpt = shape.layers * per_layer_full + dequantized
    # qlora.loss: one chunk of logits (the matmul's output and its float32 copy, which becomes the gradient in
    # place), plus the gathered hidden states of the trained positions and their gradient; never tokens x vocab
    trained = tokens if trained is None else trained
    chunk = min(trained, max(1, CHUNK_ELEMENTS // shape.vocab))
    logit_bytes = compute + 4 if compute < 4 else 4  # float32 logits are their own float32 copy
    head = chunk * shape.vocab * logit_bytes + 2 * trained * h * stream
    # lora.trained_tokens on the input embedding: peft's trainable tokens build the whole embedding's gradient
    # (Gemma-2B's 256k x 2048 with float32 compute: +1.7 GiB in backward, scripts/bench.py --trained-tokens); 4 bytes
    # per element is measured for float32 only, an upper bound for bf16
    embedding_rows = bool(recipe.lora.trained_tokens) and shape.embedding_name not in recipe.lora.modules_to_save
    share = processes if t.distributed == "fsdp" else 1
    parts = {
        "nf4_weights" if q.load_in_4bit else "int8_weights" if q.load_in_8bit else "base_weights": weights / share,
        "quantization_constants": constants / share,
        "unquantized_weights": other / share,
        "lora_weights_grads_optimizer": adapters / share,
        "activations": with_ckpt if t.gradient_checkpointing else without_ckpt,
        "lm_head_chunk": head,
    }
    if embedding_rows:
        parts["trained_token_embedding_gradient"] = shape.vocab * h * 4
    # FSDP: each GPU loads the 4-bit base whole before it keeps its shard: transformers 5.25 loads it on every rank,
    # and accelerate 1.16 loads on rank 0 alone only a base without 4-bit weights (fsdp2_prepare_model)
    loading = weights + constants + shape.other * compute if share > 1 and q.load_in_4bit else 0
    return {
        "parts": parts,
        "total": max(sum(parts.values()), loading),
        "loading_whole_base": loading,
        "activations_with_checkpointing": with_ckpt,
        "activations_without_checkpointing": without_ckpt,
        "tokens_per_micro_batch": tokens,
        "processes": processes,
        # an unfused head: the logits, their fp32 upcast for the loss, and its gradient
        "unfused_logits": tokens * shape.vocab * (compute + 4 + 4),
    }


def eval_problems_estimate(recipe: Recipe, pre: Preflight, report: DataReport, processes: int) -> dict[str, Any]:
    """What the train.eval_problems eval costs each process per eval point against the training between two evals,
    counted in FLOPs (no weights are loaded, so no speed is measured here; train prints the measured times): 2 per
    weight per token the eval reads or writes (each prompt, then eval_max_new_tokens, the most an answer can take);
    4 per weight per trained token (forward, and backward to the inputs only, as the 4-bit base gets no weight
    gradient), 6 with gradient checkpointing (the forward again)."""
    t = recipe.train
    style, _, _ = training_eval_settings(recipe)
    prompts = sum(len(prompt_ids(pre.tokenizer, pre.template, p, style)) for p in pre.problems)
    every = t.eval_problems_every or t.eval_steps or t.save_steps
    eval_tokens = t.eval_samples * (prompts + len(pre.problems) * t.eval_max_new_tokens) / processes
    train_tokens = every * t.batch_size * t.grad_accum * report.tokens / report.examples
    eval_flops, train_flops = 2 * eval_tokens, (6 if t.gradient_checkpointing else 4) * train_tokens
    metrics = Path(t.output_dir) / METRICS_FILE
    measured = [r for r in read_metrics(metrics, "fix or delete that line") if r.get("eval_seconds") is not None] \
        if pre.run_plan.action == "resume" and metrics.is_file() else []
    return {"problems": len(pre.problems), "samples": t.eval_samples, "every": every, "eval_tokens": round(eval_tokens),
            "train_tokens": round(train_tokens), "share": eval_flops / (eval_flops + train_flops),
            "style": style, "measured": {"step": measured[-1]["step"], "seconds": measured[-1]["eval_seconds"]}
            if measured else None}


def padding_efficiency(lengths: list[int], batch_size: int, seed: int) -> float:
    """Real tokens / padded tokens when random batches are padded to their longest row."""
    order = lengths[:]
    random.Random(seed).shuffle(order)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(order) / sum(max(b) * len(b) for b in batches)


def packing_efficiency(lengths: list[int], capacity: int) -> float:
    """Real tokens / packed capacity with best-fit-decreasing packing into rows of `capacity` tokens."""
    return sum(lengths) / (len(best_fit_decreasing(lengths, capacity)) * capacity)


@dataclass
class CheckReport:
    data: DataReport
    errors: list[str] = field(default_factory=list)
    resolved: dict[str, str] = field(default_factory=dict)  # what auto settings become on this machine
    length_stats: dict[str, float] = field(default_factory=dict)
    histogram: list[tuple[int, int, int]] = field(default_factory=list)  # (from, to, count)
    padding_efficiency: float = 0.0
    packing_efficiency: float = 0.0
    trainable_parameters: int = 0
    memory: dict[str, Any] = field(default_factory=dict)
    trained_token_ids: dict[str, int] = field(default_factory=dict)  # lora.trained_tokens -> id
    vocabulary: int = 0  # rows of the base's embedding
    examples: list[list[tuple[str, bool]]] = field(default_factory=list)  # (text, trained) spans
    skipped: list[str] = field(default_factory=list)  # damaged checkpoints train would pass over (RunPlan.skipped)
    eval_problems: dict[str, Any] | None = None  # eval_problems_estimate, with train.eval_problems
    notes: list[str] = field(default_factory=list)  # settings that run, but cost more than they give here

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"].pop("lengths")
        d["data"]["examples"] = self.data.examples
        return d


def histogram(lengths: list[int], bins: int = 8) -> list[tuple[int, int, int]]:
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min((n - low) // width, bins - 1)] += 1
    return [(low + i * width, low + (i + 1) * width - 1, c) for i, c in enumerate(counts)]


def spans(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Decoded runs of consecutive tokens that are all trained or all masked."""
    out: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            out.append((tokenizer.decode(ids[start:i]), labels[start] != IGNORE_INDEX))
            start = i
    return out


@dataclass
class Preflight:
    """A recipe that passed every check `train` runs before it writes: planned for this machine, with its rows,
    tokenizer, template, model shape and what train will do with its run directory."""

    plan: Plan  # the recipe resolved for this machine and the library arguments
    rows: list[Any]
    eval_rows: list[Any] | None
    tokenizer: Any
    template: Template
    shape: ModelShape
    fingerprint: str  # of the training and eval rows
    keep: list[Path]  # local paths the run reads, which --overwrite must never delete
    run_plan: RunPlan
    loss: str  # how train computes the loss (training_loss)
    problems: list[Problem] | None  # train.eval_problems

    @property
    def recipe(self) -> Recipe:
        return self.plan.recipe


def preflight(recipe: Recipe, overwrite: bool = False) -> Preflight:
    """Run every check `train` runs before writing anything (UserError on the first failure): the one validation
    path `check` and `train` share. Tokenizing the rows (data.build_datasets) comes after it in both."""
    from qlora.model import add_trained_tokens, load_tokenizer

    plan = make_plan(recipe)
    recipe = plan.recipe
    problems = training_problems(recipe)
    data, model = recipe.data, recipe.model
    rows = load_rows(data)
    eval_rows = load_rows(data, "eval_path") if data.eval_path else None
    check_run_length(recipe, len(rows))
    tokenizer = load_tokenizer(model)
    add_trained_tokens(tokenizer, recipe.lora.trained_tokens)
    shape = model_shape(recipe)
    loss = training_loss(recipe, shape)
    keep = [Path(p) for p in (data.path, data.eval_path) if p and is_local_path(p)]
    keep += [Path(model.name_or_path)] if Path(model.name_or_path).is_dir() else []
    keep += [Path(recipe.train.eval_problems)] if problems else []
    refuse_if_locked(Path(recipe.train.output_dir))
    fingerprint = data_fingerprint(rows, eval_rows, [vars(p) for p in problems or []])
    run_plan = plan_run(recipe, fingerprint, overwrite, keep)
    if run_plan.action != "complete":
        check_creatable(Path(recipe.train.output_dir), "train.output_dir")
    return Preflight(plan, rows, eval_rows, tokenizer, TEMPLATES[data.template], shape, fingerprint, keep, run_plan,
                     loss, problems)


def check(recipe: Recipe, overwrite: bool = False, processes: int = 1) -> CheckReport:
    """Everything `qlora check` reports; `errors` lists what would stop `qlora train` (exit 2).

    It runs train's own checks (preflight, then tokenizing with data.build_datasets); on a refusal it reports
    on every row that could be trained, whatever the policy says.
    """
    pre = preflight(recipe, overwrite)
    recipe, data, tokenizer, template = pre.recipe, pre.recipe.data, pre.tokenizer, pre.template
    errors = []
    try:
        train_set, _, report = build_datasets(recipe, pre.rows, pre.eval_rows, tokenizer, template)
        ids, labels = train_set["input_ids"][:2], train_set["labels"][:2]
    except UserError as refused:
        errors.append(str(refused))
        lenient = data.model_copy(update={"skip_invalid": True, "max_invalid_fraction": 1.0,
                                          "too_long": "drop" if data.too_long == "error" else data.too_long})
        try:
            ids, labels, report = tokenize_rows(pre.rows, tokenizer, template, lenient, data.path)
        except UserError:  # nothing trainable to report on: train's own refusal is the answer
            raise refused from None
    lengths = report.lengths
    shape = pre.shape
    ordered = sorted(lengths)
    memory = worst_micro_batch(recipe, shape, report, processes)
    errors += [problem] if (problem := memory_problem(recipe, memory)) else []
    return CheckReport(
        data=report,
        errors=errors,
        resolved={"device": pre.plan.device, "compute_dtype": recipe.quantization.compute_dtype,
                  "optimizer": recipe.train.optimizer, "attn_implementation": recipe.model.attn_implementation,
                  "loss": pre.loss, "compile": pre.plan.compile},
        length_stats={"min": ordered[0], "median": statistics.median(ordered),
                      "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]},
        histogram=histogram(lengths),
        padding_efficiency=padding_efficiency(lengths, recipe.train.batch_size, recipe.train.seed),
        packing_efficiency=packing_efficiency(lengths, data.max_length),
        trainable_parameters=shape.lora,
        memory=memory,
        trained_token_ids=dict(zip(recipe.lora.trained_tokens,
                                   tokenizer.convert_tokens_to_ids(recipe.lora.trained_tokens))),
        vocabulary=shape.vocab,
        examples=[spans(tokenizer, ids[i], labels[i]) for i in range(min(2, len(ids)))],
        skipped=pre.run_plan.skipped,
        eval_problems=eval_problems_estimate(recipe, pre, report, processes) if pre.problems else None,
        notes=[note] if (note := optimizer_note(recipe, shape)) else [],
    )


def optimizer_note(recipe: Recipe, shape: ModelShape) -> str | None:
    """Why bitsandbytes' 8-bit AdamW does not pay on a CPU, where a recipe names it: the state it saves for this
    adapter, against the measured cost of its CPU step."""
    import torch

    optimizer = recipe.train.optimizer
    if torch.cuda.is_available() or optimizer not in ("paged_adamw_8bit", "adamw_8bit"):
        return None
    saved = shape.lora * (OPTIMIZER_BYTES["adamw_torch"] - OPTIMIZER_BYTES[optimizer])
    slow, fast = CPU_STEP_MS["paged_adamw_8bit"], CPU_STEP_MS["adamw_torch"]
    return (f"train.optimizer: {optimizer} saves {saved / 2**20:,.0f} MiB of optimizer state here, but on a CPU "
            f"bitsandbytes runs it as a chain of small ops: {slow / fast:.1f}x the step time of adamw_torch on "
            f"SmolLM2-135M's adapter ({slow:.0f} vs {fast:.0f} ms, benchmarks/results/optimizer-smollm2-135m-cpu.json); "
            "use optimizer: auto (adamw_torch on CPU) unless RAM is that tight")


def print_report(report: CheckReport, recipe: Recipe, console) -> None:
    """The human-readable report: colour in a terminal, [-masked-] / [+trained+] markers otherwise."""
    from rich.markup import escape

    d, stats, r = report.data, report.length_stats, report.resolved
    for line in report.skipped:
        console.print(f"[yellow]run:[/] {escape(line)}", highlight=False)
    console.print(f"[bold]device[/] {r['device']}: compute {r['compute_dtype']}, optimizer {r['optimizer']}, "
                  f"attention {r['attn_implementation']}")
    console.print(f"[bold]loss[/] {escape(r['loss'])}", highlight=False)
    console.print(f"[bold]train.compile[/] {escape(r['compile'])}", highlight=False)
    console.print(f"[bold]data[/] {d.source}: {d.rows_total} rows, {d.rows_total - d.invalid_count} valid"
                  + (f", {escape(d.invalid_summary())}" if d.invalid else ""))
    console.print(f"tokens per example: min {stats['min']}, median {stats['median']:g}, p95 {stats['p95']}, "
                  f"max {stats['max']}")
    top = max(c for _, _, c in report.histogram)
    for low, high, count in report.histogram:
        console.print(f"  {low:>6}-{high:<6} {'#' * round(30 * count / top):<30} {count}")
    console.print(f"longer than data.max_length={recipe.data.max_length}: {len(d.dropped_too_long)} dropped, "
                  f"{len(d.truncated)} truncated")
    console.print(f"trained tokens: {d.trained_tokens:,} of {d.tokens:,} ({d.trained_tokens / d.tokens:.1%})")
    console.print(f"end of reply trained: {d.stop_trained} of {d.examples} examples "
                  f"({d.stop_trained / d.examples:.1%})")
    console.print(f"batches of {recipe.train.batch_size} padded to their longest row: {report.padding_efficiency:.1%}"
                  f" real tokens; packed best-fit-decreasing into {recipe.data.max_length}: "
                  f"{report.packing_efficiency:.1%}")
    console.print(f"trainable parameters: {report.trainable_parameters:,} (LoRA r={recipe.lora.r} on "
                  f"{recipe.lora.target_modules})")
    tokens = report.trained_token_ids
    if tokens:
        rows = max(report.vocabulary, max(tokens.values()) + 1)
        grown = f"; the embeddings grow from {report.vocabulary:,} to {rows:,} rows" if rows > report.vocabulary else ""
        console.print("lora.trained_tokens: " + ", ".join(f"{escape(t)} id {i}" for t, i in tokens.items()) + grown,
                      highlight=False)
    m = report.memory
    on_gpu = r["device"].startswith("cuda")
    memory, one, many = ("GPU memory", "GPU", "GPUs") if on_gpu else ("RAM (CPU training)", "process", "processes")
    each = f" per {one}, {m['processes']} {many} with {recipe.train.distributed}" if m["processes"] > 1 else ""
    console.print(f"[bold]peak {memory} estimate: {m['total'] / GB:.2f} GiB{each}[/] (micro-batch of "
                  f"{m['tokens_per_micro_batch']:,} tokens, longest example x batch_size)")
    for name, value in m["parts"].items():
        console.print(f"  {name:<30} {value / GB:8.3f} GiB")
    console.print(f"  activations: {m['activations_with_checkpointing'] / GB:.3f} GiB with gradient checkpointing, "
                  f"{m['activations_without_checkpointing'] / GB:.3f} GiB without")
    console.print(f"  full logits, which qlora's loss never builds: {m['unfused_logits'] / GB:.3f} GiB")
    if (e := report.eval_problems) is not None:
        measured = (f"; this run's last eval (step {e['measured']['step']}) took {e['measured']['seconds']:.1f} s"
                    if e["measured"] else "")
        console.print(f"[bold]eval_problems[/] {e['problems']} problems x {e['samples']} answers ({e['style']}) every "
                      f"{e['every']} steps: at most {e['eval_tokens']:,} tokens per process per eval, against "
                      f"{e['train_tokens']:,} trained between evals: ~{e['share']:.0%} of the time by FLOPs (2 per "
                      "weight per eval token; 4 per trained token, 6 with gradient checkpointing), a lower bound: "
                      "decoding a few answers at a time uses a device less fully than training (5 to 10 times less on "
                      "a CPU tiny twin), and train prints each eval's measured time and share" + measured,
                      highlight=False)
        if e["share"] > EVAL_SHARE:
            console.print(f"[yellow]eval_problems would take more than {EVAL_SHARE:.0%} of the training time:[/] raise "
                          "train.eval_problems_every, or lower train.eval_max_new_tokens or eval_samples")
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    for number, example in enumerate(report.examples, start=1):
        console.print(f"[bold]example {number}[/] ([dim]masked[/] / [green]trained[/]):")
        if console.is_terminal:
            console.print("".join(f"[green]{escape(t)}[/]" if trained else f"[dim]{escape(t)}[/]"
                                  for t, trained in example))
        else:
            console.print(escape("".join(f"[+{t}+]" if trained else f"[-{t}-]" for t, trained in example)),
                          highlight=False)
