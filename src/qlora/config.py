"""The one recipe schema: every key a recipe may hold, its default and its one description."""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qlora.errors import UserError
from qlora.files import read_text


class _Section(BaseModel):
    # strict: `lora.r: yes` or `lora.r: "16"` is an error rather than 1 or 16; no inf or nan anywhere
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


SEED_RANGE = dict(ge=0, le=2**32 - 1)  # what numpy's and transformers' set_seed accept


class ModelSection(_Section):
    name_or_path: str = Field(
        description="Base model: a hub id (google/gemma-2b) or a local directory saved with save_pretrained."
    )
    revision: str = Field(
        "main", description="Hub branch, tag or commit of the base model; pin a commit for a reproducible run."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model repo. Only for repos you trust; off by default."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel: sdpa (PyTorch fused, default), eager, or flash_attention_2 (CUDA GPUs "
        "of compute capability 8.0 or newer, bf16/fp16 compute)."
    )


class QuantizationSection(_Section):
    load_in_4bit: bool = Field(
        True, description="Load the frozen base in 4 bits (QLoRA). false trains LoRA on a full-precision base."
    )
    load_in_8bit: bool = Field(
        False, description="Load the frozen base in 8 bits (LLM.int8) instead: about 1 byte per weight against 4-bit's "
        "0.52, for a weight error of 0.9% against NF4's 9.2% (relative RMS on a Gaussian 4096 x 4096 matrix: "
        "scripts/bench_quant_error.py); the QLoRA paper found NF4 + double quantization already matches 16-bit LoRA, so 8 bits "
        "are for when memory is plentiful. Implies load_in_4bit: false."
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: nf4 (NormalFloat, best for normally distributed weights) or fp4."
    )
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too: saves ~0.37 bits/param (~0.4 GB on 7B)."
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype of the matmuls on dequantized weights and of mixed precision training. auto: bfloat16 "
        "where the device runs it natively (CUDA capability 8.0+, CPUs with AVX512-BF16/AMX), float16 with a loss "
        "scaler on older CUDA GPUs (T4, V100), else float32. The run records what auto chose.",
    )
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="dtype the packed 4-bit weights are stored in; uint8 unless sharding with FSDP."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_bit_width(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("load_in_8bit") is True:
            if values.get("load_in_4bit") is True:
                raise ValueError("quantization.load_in_8bit and load_in_4bit are both true: choose one")
            values = {**values, "load_in_4bit": False}
        return values

    @property
    def quantized(self) -> bool:
        """Whether the base is loaded by bitsandbytes (4 or 8 bits)."""
        return self.load_in_4bit or self.load_in_8bit


class LoraSection(_Section):
    r: int = Field(
        16, gt=0, description="LoRA rank: adapter capacity; trainable parameters grow linearly with r. At most the "
        "width (smaller side) of the narrowest layer it targets, beyond which an update gains no rank."
    )
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input; 0.05-0.1 for small datasets.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description='Layers that get adapters: "all-linear" (QLoRA paper: best quality) or names like [q_proj, v_proj].',
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train: none, all, lora_only.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r); helps at high ranks.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): a little better, noticeably slower.")
    modules_to_save: list[str] = Field(
        [], description="Extra modules trained in full and saved with the adapter (e.g. [lm_head]); costs memory."
    )
    trained_tokens: list[str] = Field(
        [], description='Tokens whose embedding and LM-head rows are trained and saved with the adapter, e.g. '
        '["<|im_start|>", "<|im_end|>"] for template chatml on a base that lacks them: each becomes one special token '
        "(added to the tokenizer, and the embeddings grown to hold it, where missing); the other rows stay frozen."
    )

    @model_validator(mode="after")
    def _targets_not_empty(self) -> LoraSection:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError('lora.target_modules is an empty list; name layers or use "all-linear"')
        return self

    @model_validator(mode="after")
    def _tokens_distinct(self) -> LoraSection:
        for i, token in enumerate(self.trained_tokens):
            if not token.strip() or token != token.strip():
                raise ValueError(f"lora.trained_tokens[{i}] ({token!r}) is blank or starts or ends with whitespace, "
                                 "which would swallow the spaces around it in every text; give the bare token, "
                                 "e.g. <|im_end|>")
            if token in self.trained_tokens[:i]:
                raise ValueError(f"lora.trained_tokens lists {token!r} twice; keep one")
        return self


FORMAT_FIELDS = {  # our field names per data.format; data.fields maps them to a file's own columns
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}
DEFAULT_TEMPLATE = {"alpaca": "alpaca", "prompt_completion": "raw", "messages": "chatml", "text": "raw"}


class DataSection(_Section):
    path: str = Field(
        description="Training data: a local .json (list), .jsonl, .parquet or .csv file or a directory saved by "
        "`datasets` (relative to the working directory), or a hub dataset id."
    )
    revision: str | None = Field(None, description="Hub dataset branch, tag or commit; pin a commit to reproduce.")
    subset: str | None = Field(None, description="Hub dataset configuration (subset) name, if it has several.")
    split: str = Field("train", description="Split of a hub dataset (or saved DatasetDict) to train on.")
    format: Literal["alpaca", "prompt_completion", "messages", "text"] = Field(
        "alpaca",
        description="Row format: alpaca (instruction, optional input, output), prompt_completion, messages "
        "(chat turns; loss on assistant turns only) or text (plain text; loss on every token).",
    )
    fields: dict[str, str] = Field(
        {}, description="Our field names -> the file's columns, e.g. {output: response} for a `response` column; a "
        "column in no row of the data is refused."
    )
    template: Literal["alpaca", "chatml", "llama-2", "gemma", "tokenizer", "raw"] | None = Field(
        None,
        description="Prompt template: alpaca, chatml, llama-2 ([INST]), gemma (<start_of_turn>), tokenizer (the "
        "model's own chat template) or raw (the prompt as is). Default by format: alpaca -> alpaca, "
        "messages -> chatml, else raw. Saved in the run and reused by generate and merge.",
    )
    max_length: int = Field(
        2048, gt=8, description="Longest example in tokens (prompt + response + its end); drives activation memory."
    )
    too_long: Literal["drop", "truncate", "error"] = Field(
        "drop",
        description="Rows longer than max_length: drop (default; every kept row keeps its trained end), "
        "truncate (cut the end; rows with no trained token left are dropped) or error. Always counted.",
    )
    skip_invalid: bool = Field(
        False, description="Drop rows with missing, empty or non-string fields (reported) instead of stopping."
    )
    max_invalid_fraction: float = Field(
        0.05, ge=0, le=1, description="With skip_invalid, still stop when more than this fraction of rows is invalid."
    )
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows (a quick trial run); null = all.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=0.5, description="Hold out this fraction of rows (seeded) to report eval loss; 0 = none."
    )
    eval_path: str | None = Field(None, description="A separate eval file (same format); exclusive with eval_fraction.")
    train_on_inputs: bool = Field(
        False, description="Train on the prompt tokens too (loss on every token), not only on the responses."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_template(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("template") is None:
            values = {**values, "template": DEFAULT_TEMPLATE.get(values.get("format", "alpaca"), "alpaca")}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> DataSection:
        known = FORMAT_FIELDS[self.format]
        for name in self.fields:
            if name not in known:
                raise ValueError(f"data.fields.{name} is not a field of format {self.format}; "
                                 f"its fields are {', '.join(known)}")
        if self.format == "text" and self.template != "raw":
            raise ValueError("format text carries its own formatting: use template raw")
        if self.eval_fraction and self.eval_path:
            raise ValueError("set data.eval_fraction or data.eval_path, not both")
        return self

    def column(self, name: str) -> str:
        """The file's column holding our field `name`."""
        return self.fields.get(name, name)


class TrainSection(_Section):
    output_dir: str = Field(description="Run directory: recipe.yaml, adapter/, checkpoints/, metrics.jsonl. check and "
                            "train prove it can be created by making and removing a temporary directory there.")
    max_steps: int | None = Field(
        None, gt=0, description="Optimizer steps to train; null trains for `epochs` instead. The run (max_steps, or "
        "epochs x steps per epoch) must end within a year at 1 ms a step: 31,536,000,000 steps."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the data when max_steps is null.")
    batch_size: int = Field(
        4, gt=0, description="Sequences per device per micro-batch; activation memory scales with it. check and train "
        "refuse a batch of the longest example whose estimated peak exceeds the device's memory (RAM on a CPU)."
    )
    grad_accum: int = Field(
        4, gt=0, description="Micro-batches per optimizer step: effective batch = batch_size x grad_accum."
    )
    learning_rate: float = Field(
        2e-4, gt=0, description="Peak learning rate; 1e-4 to 2e-4 is usual for QLoRA. At most 1: Adam moves each "
        "weight by about the learning rate every step, and LoRA weights are far smaller than 1."
    )
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming the LR up from 0.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay on the adapter weights. At most 1: each step multiplies a weight "
        "by 1 - learning_rate x weight_decay, which must stay between 0 and 1."
    )
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm (0.3 as in the QLoRA paper).")
    optimizer: Literal["auto", "adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adafactor"] = (
        Field("auto", description="Optimizer; auto = paged_adamw_8bit on CUDA (a quarter of AdamW's state memory, "
                                  "paged to CPU on spikes instead of OOM), adamw_torch on CPU. The run records what "
                                  "auto chose.")
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in backward (non-reentrant): ~30% slower, far less activation memory."
    )
    padding_free: bool = Field(
        True,
        description="Pack each micro-batch best-fit-decreasing into rows of at most data.max_length tokens with "
        "position_ids: almost no pad tokens are computed, no example attends to another (block-diagonal mask), and "
        "attention grows with each row's length, not the micro-batch's. Same loss as padded batches; off = pad each "
        "batch.",
    )
    group_by_length: bool = Field(
        False, description="Batch rows of similar length: less padding when padding_free is off; changes data order."
    )
    liger: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Liger kernels (RMSNorm, RoPE, SwiGLU): auto = on CUDA when the `liger` extra is installed. "
        "The LM head is always fused and tiled (TRL), so full logits are never materialised.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "off",
        description="torch.compile the decoder layers' attention and MLP blocks (the LoRA path: 4-bit dequantize, "
        "matmul, dropout, LoRA A/B and scale; inductor writes C++/OpenMP on CPU, Triton on CUDA). on: compiled at "
        "the first step (seconds to a minute, cached in ~/.cache/qlora/inductor for later runs); auto: the first "
        "steps are timed eager then compiled and the faster is kept (the decision is kept in the checkpoint for a "
        "resume); check says what auto will do. Compiled kernels round differently from eager ones (losses within "
        "1%); a run resumes bit-identical in either mode, and auto's once past its 6-step warm-up. off by default: "
        "its gain is measured on CPU only, 1.1-1.2x (docs/performance.md).",
    )
    seed: int = Field(42, **SEED_RANGE, description="Seed for adapter init, data order and dropout (0 to 2^32-1).")
    logging_steps: int = Field(10, gt=0, description="Write a metrics.jsonl line every N optimizer steps.")
    save_steps: int = Field(200, gt=0, description="Write a checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(3, gt=0, description="Keep at most N checkpoints (oldest removed); null keeps all.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        [], description="Extra experiment trackers (metrics.jsonl is always written)."
    )
    eval_steps: int | None = Field(
        None, gt=0, description="Evaluate every N optimizer steps; null = save_steps. Needs eval data "
        "(data.eval_fraction or data.eval_path)."
    )
    eval_batch_size: int | None = Field(
        None, gt=0, description="Sequences per device per eval batch; null = batch_size. Needs eval data."
    )
    eval_problems: str | None = Field(
        None, description="HumanEval- or MBPP-style problems (.jsonl, as `qlora eval --problems` reads) the run answers "
        "while it trains: at step 0 (the base), every eval_problems_every steps and at the last step, with the run's "
        "template, each answer's code run in qlora's sandbox; pass@1 (and pass@k for k = eval_samples) goes into "
        "metrics.jsonl and the progress line. Needs allow_code_execution. With several processes each takes its "
        "share of the problems."
    )
    eval_problems_every: int | None = Field(
        None, gt=0, description="Steps between evals of eval_problems; null = eval_steps (itself null = save_steps)."
    )
    eval_samples: int = Field(
        1, gt=0, description="Answers per problem in the eval_problems eval: 1 decodes greedily; more are sampled with "
        "generation.temperature, top_p and top_k, and pass@k for k = eval_samples is reported beside pass@1."
    )
    eval_max_new_tokens: int = Field(256, gt=0, description="Most tokens per answer in the eval_problems eval.")
    allow_code_execution: bool = Field(
        False, description="Run the code the model writes for eval_problems, in qlora's sandbox (docs/evaluation.md "
        "says what it does and does not stop); the environment variable QLORA_ALLOW_CODE_EVAL=1 does the same. "
        "check and train refuse eval_problems without one of them."
    )
    keep_best: Literal["none", "eval_loss", "pass@1"] = Field(
        "none", description="At the end, publish the best checkpoint as adapter/ (its step and score in RUN/best.json) "
        "instead of the last one: eval_loss = the lowest eval loss (needs eval data), pass@1 = the highest pass@1 on "
        "eval_problems (the first step to reach it; the base at step 0 is not a candidate). save_total_limit never "
        "deletes it and a resumed run keeps it. The metric's evals (eval_steps, or eval_problems_every) must fall on "
        "checkpoints: a multiple of save_steps."
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evals of the keep_best metric in a row without a better score; the "
        "checkpoint written there ends the run and adapter/ is the best one. null = train to the end. A resumed run "
        "counts on from its checkpoint."
    )
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune: uniform noise on the input embeddings while training (the paper uses 5); "
        "null = off. Generation never sees it."
    )
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW's first-moment decay (8-bit and paged ones too).")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW's second-moment decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW's epsilon.")
    min_lr_ratio: float = Field(
        0.0, ge=0, lt=1, description="cosine schedule only: decay to this fraction of learning_rate instead of 0."
    )
    extra: dict[str, Any] = Field(
        {}, description="Further SFTConfig / TrainingArguments fields by name (e.g. {torch_compile: true}); a name "
        "SFTConfig lacks, or that a key above already sets, is refused, as are those that would break saving or "
        "resuming: save_strategy, save_only_model, ignore_data_skip, resume_from_checkpoint, load_best_model_at_end, "
        "save_on_each_node."
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="With several processes (`--nproc-per-node`, torchrun, accelerate launch): ddp = every GPU holds "
        "the 4-bit base and trains on its share of the batches; fsdp = the weights and the adapter's state are sharded "
        "across the GPUs (FSDP-QLoRA; each GPU still loads the 4-bit base whole first; CUDA only; needs "
        "quantization.quant_storage = the compute dtype).",
    )


    @field_validator("learning_rate", "weight_decay")
    @classmethod
    def _at_most_one(cls, value: float, info) -> float:
        if value > 1:
            why = ("Adam moves each weight by about the learning rate every step, so the adapter diverges at once; "
                   "1e-4 to 2e-4 is usual" if info.field_name == "learning_rate" else
                   "each step multiplies a weight by 1 - learning_rate x weight_decay, which would flip its sign; "
                   "0 to 0.1 is usual")
            raise ValueError(f"at most 1: {why}")
        return value

    @model_validator(mode="after")
    def _min_lr_with_cosine(self) -> TrainSection:
        if self.min_lr_ratio and self.lr_scheduler != "cosine":
            raise ValueError(f"train.min_lr_ratio applies to the cosine schedule, not {self.lr_scheduler}; set "
                             "train.lr_scheduler: cosine or drop min_lr_ratio")
        return self


MIN_DIVISOR = 0.01  # vLLM's floor for the temperature: below it logits / temperature overflow float32 (inf, nan)


class GenerationSection(_Section):
    max_new_tokens: int = Field(256, gt=0, description="Most tokens to generate per prompt.")
    temperature: float = Field(
        0.0, ge=0, description="Sampling temperature; 0 decodes greedily (deterministic). Otherwise at least 0.01: "
        "the logits are divided by it, and below 0.01 they overflow to inf (vLLM's floor too) while sampling is "
        "already greedy in all but name."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest token set with this mass.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 turns it off.")
    num_beams: int = Field(1, gt=0, description="Beam search width; 1 = no beam search.")
    repetition_penalty: float = Field(
        1.0, gt=0, description="Above 1 discourages repeating tokens already present; at least 0.01, as the logits "
        "of those tokens are divided by it."
    )
    seed: int | None = Field(None, **SEED_RANGE,
                             description="Seed for sampling (0 to 2^32-1); the same seed gives the same text.")
    stop: list[str] = Field([], description="Strings that end the output; the text stops before the first one. The end of a "
                           "reply in the template (chatml's <|im_end|>, gemma's <end_of_turn>, a chat template's own) "
                           "always does.")

    @field_validator("temperature", "repetition_penalty")
    @classmethod
    def _finite_logits(cls, value: float, info) -> float:
        if 0 < value < MIN_DIVISOR:
            zero = "0 (greedy) or " if info.field_name == "temperature" else ""
            raise ValueError(f"give {zero}at least {MIN_DIVISOR}: the logits are divided by it, and below "
                             f"{MIN_DIVISOR} they overflow float32 to inf and sampling fails")
        return value


class Recipe(_Section):
    model: ModelSection
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection
    generation: GenerationSection = GenerationSection()

    @model_validator(mode="after")
    def _sections_agree(self) -> Recipe:
        if self.train.distributed == "fsdp" and self.quantization.load_in_4bit \
                and self.quantization.quant_storage == "uint8":
            raise ValueError("train.distributed: fsdp shards the 4-bit weights, which FSDP can only do when they are "
                             "stored in a float dtype: set quantization.quant_storage to the compute dtype "
                             "(bfloat16)")
        t = self.train
        has_eval_data = bool(self.data.eval_path or self.data.eval_fraction)
        if t.keep_best == "eval_loss" and not has_eval_data:
            raise ValueError("train.keep_best: eval_loss picks a checkpoint by its eval loss, and the recipe has no eval "
                             "data: set data.eval_path or data.eval_fraction, or keep_best: none")
        if t.keep_best == "pass@1" and not t.eval_problems:
            raise ValueError("train.keep_best: pass@1 picks a checkpoint by the code it writes, and train.eval_problems "
                             "is not set: name a problems file there, or keep_best: none")
        if t.keep_best != "none":
            key, every = (("eval_problems_every", t.eval_problems_every or t.eval_steps or t.save_steps)
                          if t.keep_best == "pass@1" else ("eval_steps", t.eval_steps or t.save_steps))
            if every % t.save_steps:
                raise ValueError(f"train.keep_best: the eval at every train.{key}={every} must have a checkpoint to "
                                 f"keep, and train.save_steps={t.save_steps} does not divide it: make {key} a multiple "
                                 "of save_steps")
            if t.distributed == "fsdp" and t.save_total_limit == 1:
                raise ValueError("train.keep_best with train.distributed: fsdp: the trainer writes FSDP checkpoints "
                                 "itself and, with save_total_limit 1, deletes all but the best at the end, the last "
                                 "one a resume needs too; set save_total_limit to 2 or more")
        if t.early_stopping_patience and t.keep_best == "none":
            raise ValueError("train.early_stopping_patience counts evals without a better score of the train.keep_best "
                             "metric, and keep_best is none: set keep_best to eval_loss or pass@1")
        if t.eval_problems is None and t.eval_problems_every is not None:
            raise ValueError("train.eval_problems_every is set but train.eval_problems is not, so nothing would be "
                             "evaluated: name a problems file, or drop it")
        if t.eval_problems and t.eval_samples > 1 and self.generation.temperature == 0:
            raise ValueError(f"train.eval_samples: {t.eval_samples} answers per problem are sampled with "
                             "generation.temperature, which is 0 (greedy): every sample would be the same; set "
                             "generation.temperature (0.2 is usual for pass@1) or eval_samples: 1")
        if t.eval_problems and t.distributed == "fsdp":
            raise ValueError("train.eval_problems with train.distributed: fsdp: each process answers its share of the "
                             "problems, which sharded weights cannot do (every forward needs every process); use ddp, "
                             "or `qlora eval` the finished run")
        if self.train.distributed == "fsdp" and self.lora.trained_tokens:
            raise ValueError("lora.trained_tokens cannot be trained with train.distributed: fsdp (peft's trainable "
                             "tokens need FSDP's use_orig_params, which FSDP-QLoRA turns off); use ddp")
        return self

    @model_validator(mode="after")
    def _eval_keys_need_eval_data(self) -> Recipe:
        if not (self.data.eval_fraction or self.data.eval_path):
            for key in ("eval_steps", "eval_batch_size"):
                if getattr(self.train, key) is not None:
                    raise ValueError(f"train.{key} is set but there is no eval data, so the run would never "
                                     "evaluate: set data.eval_fraction or data.eval_path, or drop it")
        return self


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at `loc` (a path of field names) in the Recipe tree."""
    cls: type[BaseModel] = Recipe
    for part in loc:
        annotation = cls.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        cls = annotation
    return list(cls.model_fields)


def _same_initial(name: str, valid: list[str]) -> list[str]:
    """The valid key starting with the same letter that is most similar (lora.rnak -> lora.r)."""
    candidates = [v for v in valid if v[:1] == name[:1]]
    return sorted(candidates, key=lambda v: -difflib.SequenceMatcher(None, name, v).ratio())[:1]


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(p for p in error["loc"] if isinstance(p, str))
    key = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        parent, name = loc[:-1], loc[-1]
        valid = _section_fields(parent)
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6) or _same_initial(name, valid)
        prefix = ".".join(parent) + "." if parent else ""
        hint = f"did you mean {prefix}{close[0]}?" if close else "valid keys: " + ", ".join(prefix + v for v in valid)
        return f"unknown key {key}: {hint}"
    if error["type"] == "missing":
        return f"{key} is required but missing"
    got = error.get("input")
    if error["type"] in ("bool_type", "int_type", "float_type") and isinstance(got, str):
        if (yaml_1_1 := _yaml_1_1_reading(got)) is not None:
            kind, fix = ("a boolean", "write true or false") if error["type"] == "bool_type" else \
                ("a number", "write the number in decimal digits")
            return f"{key}: {got!r} is text, not {kind}, in YAML 1.2, which recipes follow (YAML 1.1 reads " \
                   f"{yaml_1_1!r}): {fix}"
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    message = error["msg"].removeprefix("Value error, ")
    # a rule across sections (loc is empty) names its keys itself
    return message if not loc or message.startswith(key + ".") else f"{key}: {message}{shown}"


def _yaml_1_1_reading(text: str) -> bool | int | float | None:
    """What YAML 1.1 (PyYAML's safe_load) reads `text` as, where that is a boolean or number and 1.2 reads text."""
    try:
        old, new = yaml.safe_load(text), parse_yaml(text)
    except yaml.YAMLError:
        return None
    return old if isinstance(old, (bool, int, float)) and isinstance(new, str) else None


class RecipeYAMLError(yaml.MarkedYAMLError):
    """YAML that is well formed but no recipe: its `problem` is the message, its mark the line."""

    def __init__(self, problem: str, mark):
        super().__init__(problem=problem, problem_mark=mark)


MAX_DEPTH = 32  # levels of nesting; a recipe needs 4, and a deeper document would exhaust Python's recursion
MERGE_TAG = "tag:yaml.org,2002:merge"
# Plain scalars are typed as in YAML 1.2's core schema, not 1.1's: `on`, `off`, `yes`, `no` stay text (train.liger: on
# is the documented string, not True), as do `1:30` (1.1: base 60, 90), `1_000`, `0b1`, dates, and `0755`, which 1.1
# reads as octal 493 and 1.2 as 755: left as text, a number key refuses it instead of guessing. `2e-4` is a float.
CORE_SCHEMA = [
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?(?:0|[1-9][0-9]*)|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    ("float", r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", "-+0123456789."),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("merge", r"<<", "<"),  # YAML 1.1's merge key, which 1.2 tools keep
]


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2's plain scalars (CORE_SCHEMA) and merge keys as YAML defines them, refusing
    duplicate keys, keys that are not names, tags that would build objects and documents too deep or too large."""

    yaml_implicit_resolvers: dict = {}

    def __init__(self, stream):
        super().__init__(stream)
        self.composing: list[str | None] = []  # the anchor (or None) of each node being composed, outermost first

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) and event.anchor in self.composing:
            raise RecipeYAMLError(f"*{event.anchor} is inside &{event.anchor} itself: an endless recipe",
                                  event.start_mark)
        if len(self.composing) >= MAX_DEPTH:
            raise RecipeYAMLError(f"nested more than {MAX_DEPTH} levels deep; a recipe needs a few", event.start_mark)
        self.composing.append(event.anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self.composing.pop()

    def construct_mapping(self, node, deep=False):
        """The mapping's own keys (each once), then those of its `<<` merged mappings that it lacks: of a merged list,
        the earlier mapping's value wins (YAML's merge key; PyYAML 6.0.3 lets the later one win)."""
        mapping: dict[Any, Any] = {}
        lines: dict[Any, int] = {}
        merged = []
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                key = "<<"
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                if not all(isinstance(source, yaml.MappingNode) for source in sources):
                    raise RecipeYAMLError("the merge key << takes a mapping or a list of mappings, e.g. <<: *base",
                                          value_node.start_mark)
                merged += sources
            elif not isinstance(key_node, yaml.ScalarNode):
                raise RecipeYAMLError(f"a key is a {key_node.id}; recipe keys are names", key_node.start_mark)
            else:
                key = self.construct_object(key_node)
                if not isinstance(key, str):
                    raise RecipeYAMLError(f"the key {key_node.value!r} reads as {key!r}, not a name; quote it "
                                          f"(\"{key_node.value}\") if you mean the text", key_node.start_mark)
            if key in lines:
                raise RecipeYAMLError(f"duplicate key {key!r} (first on line {lines[key]}); keep one",
                                      key_node.start_mark)
            lines[key] = key_node.start_mark.line + 1
            if key != "<<":
                mapping[key] = self.construct_object(value_node, deep=deep)
        for source in merged:
            for key, value in self.construct_mapping(source, deep).items():
                mapping.setdefault(key, value)
        return mapping

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
            raise RecipeYAMLError(f"a number of {len(node.value)} digits is more than Python reads "
                                  f"({sys.get_int_max_str_digits()}) and any recipe needs", node.start_mark) from None

    def construct_undefined(self, node):
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise RecipeYAMLError(f"refused the tag {tag}: a recipe holds plain values, never Python objects",
                              node.start_mark)


class RecipeDumper(yaml.SafeDumper):
    """yaml.SafeDumper that quotes a string YAML 1.1 or 1.2 would read as something else (`on`, `1e5`, `0o7`), so a
    recipe it writes reads back the same in RecipeLoader and in any other YAML reader."""


for name, pattern, first in CORE_SCHEMA:
    for cls in (RecipeLoader, RecipeDumper):
        cls.add_implicit_resolver(f"tag:yaml.org,2002:{name}", re.compile(f"^(?:{pattern})$"), list(first))
RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)
RecipeLoader.add_constructor(None, RecipeLoader.construct_undefined)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: builds no Python objects


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into its key path and YAML-typed value (read as a recipe's values are)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. --set lora.r=32")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        shown = raw if len(raw) <= 60 else raw[:57] + "..."
        raise UserError(f"--set {key}: value {shown!r} is not a valid recipe value "
                        f"({getattr(exc, 'problem', None) or exc})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the recipe mapping with each `--set KEY=VALUE` applied."""
    result = dict(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {text!r}: {'.'.join(path[: depth + 1])} is not a section")
            node[part] = node = dict(child)  # a copy: the caller's mapping, and a YAML alias of it, stay as they were
        node[path[-1]] = value
    return result


def read_recipe_file(path: Path) -> dict[str, Any]:
    """Read a recipe mapping with the safe RecipeLoader; errors name the file and line."""
    text = read_text(path, "recipe")
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise UserError(f"{path}:{where}: " + (problem if isinstance(exc, RecipeYAMLError)
                                               else f"not valid YAML ({problem})")) from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a mapping with sections model, data, train, ...")
    return raw


def validate_recipe(raw: dict[str, Any], source: str) -> Recipe:
    """Build a Recipe; the first error becomes a UserError naming the key and what is allowed."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"{source}: {_describe(errors[0])}{more}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    raw = apply_overrides(read_recipe_file(path), list(overrides))
    return validate_recipe(raw, str(path))


def with_generation_overrides(base: GenerationSection, overrides: dict[str, Any]) -> GenerationSection:
    """`base` with the flags that were given (not None) applied, validated like a recipe; an error names the flag."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return GenerationSection.model_validate({**base.model_dump(), **given})
    except ValidationError as exc:
        error = exc.errors()[0]
        flag = "--" + str(error["loc"][0]).replace("_", "-")
        raise UserError(_describe({**error, "loc": (flag, *error["loc"][1:])})) from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default filled in."""
    return yaml.dump(recipe.model_dump(mode="json"), Dumper=RecipeDumper, sort_keys=False, allow_unicode=True)


def recipe_reference() -> str:
    """Markdown tables of every recipe key, its default and description (for docs/reference.md)."""
    lines = []
    for section, info in Recipe.model_fields.items():
        lines += [f"### `{section}`", "", "| key | default | description |", "|---|---|---|"]
        for name, field in info.annotation.model_fields.items():
            default = "required" if field.is_required() else f"`{yaml.safe_dump(field.default, default_flow_style=True).strip().removesuffix('...').strip()}`"
            lines.append(f"| `{section}.{name}` | {default} | {field.description} |")
        lines.append("")
    return "\n".join(lines)
