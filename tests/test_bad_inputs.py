"""The error contract, input by input: every bad recipe, flag, data, eval or prompt file exits 2 with ONE stderr line
that names the culprit, no traceback, and nothing written or changed (not the case's directory, not the finished run
it points at). Recipe cases run under both `check` and `train`: if `check` passes, `train` starts, and where `train`
refuses, `check` refuses with the same line.
"""

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROW, ROW_WITH_INPUT, snapshot
from qlora.cli import app
from qlora.generate import row_line


@dataclass
class World:
    model: Path
    run: Path  # a finished run (tiny Gemma), shared by the session: it must come out of every case unchanged
    recipe: dict
    phi: Path  # a tiny Phi-2, whose LM head has a bias


@pytest.fixture(scope="module")
def world(tiny_model, memorised_run):
    recipe = {"model": {"name_or_path": str(tiny_model("gemma"))}, "data": {"path": "data.json", "max_length": 512},
              "train": {"output_dir": "run", "max_steps": 2, "batch_size": 1, "grad_accum": 1}}
    return World(tiny_model("gemma"), memorised_run, recipe, tiny_model("phi"))


def write_recipe(w: World, changes: dict | None = None, text: str | None = None, name="recipe.yaml") -> str:
    """A recipe in the working directory: the good one with dotted `changes` applied (None deletes), or `text`."""
    raw = copy.deepcopy(w.recipe)
    for dotted, value in (changes or {}).items():
        *parents, key = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    Path(name).write_text(text if text is not None else yaml.safe_dump(raw), encoding="utf-8")
    return name


def data_file(name: str, content) -> str:
    """A data file in the working directory: bytes as they are, anything else as JSON."""
    Path(name).write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return name


def with_data(name, content, key="data.path", **more):
    return lambda w: [write_recipe(w, {key: data_file(name, content), **more})]


def recipe_with(**changes):
    return lambda w: [write_recipe(w, {k.replace("__", "."): v for k, v in changes.items()})]


def recipe_text(text):
    return lambda w: [write_recipe(w, text=text)]


def recipe_plus(text):
    """The good recipe with `text` appended as a user types it (YAML)."""
    return lambda w: [write_recipe(w, text=yaml.safe_dump(w.recipe) + text)]


DEEP = "[" * 100_000 + "]" * 100_000
LONG_INTEGER = "1" * 5001  # over the 4300 digits int() reads


GOOD = [ROW, ROW_WITH_INPUT]
NOT_A_RUN = "notes.txt"

# (id, argv after the command, culprit the stderr line must name); run under both `check` and `train`
RECIPE_CASES = [
    ("recipe-missing", lambda w: ["nope.yaml"], "nope.yaml"),
    ("recipe-is-directory", lambda w: [Path("adir").mkdir() or "adir"], "adir"),
    ("recipe-binary", lambda w: [data_file("r.yaml", b"model:\0\x01\x02")], "r.yaml"),
    ("recipe-latin1", lambda w: [data_file("r.yaml", "model: {name_or_path: caf\u00e9}".encode("latin-1"))], "r.yaml"),
    ("recipe-bad-yaml", recipe_text("model: [unclosed\n"), "recipe.yaml"),
    ("recipe-duplicate-section", recipe_text("train: {output_dir: a}\ntrain: {output_dir: b}\n"), "train"),
    ("recipe-duplicate-nested-key", recipe_plus("lora:\n  r: 8\n  r: 16\n"), "r"),
    ("recipe-merge-key-from-an-unknown-key", recipe_plus("base: &b {r: 8}\nlora: {<<: *b}\n"), "unknown key base"),
    ("recipe-merge-key-not-a-mapping", recipe_plus("lora: {<<: 8}\n"), "merge key <<"),
    ("recipe-merge-key-twice", recipe_plus("lora:\n  <<: {r: 8}\n  <<: {alpha: 8}\n"), "duplicate key '<<'"),
    ("recipe-complex-key", recipe_plus("lora:\n  ? [r, alpha]\n  : 8\n"), "line"),
    ("recipe-number-key", recipe_plus("lora: {16: r}\n"), "'16'"),
    ("recipe-alias-inside-itself", recipe_plus("lora: &l {modules_to_save: *l}\n"), "*l"),
    ("recipe-deep-yaml", recipe_plus(f"lora: {{modules_to_save: {DEEP}}}\n"), "line"),
    ("recipe-deep-json", recipe_text('{"model": ' + DEEP + "}"), "line"),
    ("recipe-5001-digit-integer", recipe_plus(f"lora: {{r: {LONG_INTEGER}}}\n"), "5001 digits"),
    ("recipe-sexagesimal", recipe_plus("lora: {r: 1:30}\n"), "lora.r"),
    ("recipe-octal-looking", recipe_plus("lora: {r: 0755}\n"), "lora.r"),
    ("recipe-underscored-number", recipe_plus("lora: {r: 1_6}\n"), "lora.r"),
    ("recipe-yes-for-a-boolean", recipe_plus("lora: {use_rslora: yes}\n"), "lora.use_rslora"),
    ("recipe-liger-on-not-installed",  # `on` is the documented string, not YAML 1.1's True: refused for what it is
     lambda w: [write_recipe(w, text=yaml.safe_dump(w.recipe).replace("train:\n", "train:\n  liger: on\n"))],
     "train.liger: on"),
    ("recipe-a-list", recipe_text("- model\n- data\n"), "recipe.yaml"),
    ("recipe-python-tag", recipe_text("model: !!python/object/apply:os.system ['true']\n"), "recipe.yaml"),
    ("recipe-empty", recipe_text(""), "recipe.yaml"),
    ("unknown-key", recipe_with(lora__rnak=8), "lora.rnak"),
    ("unknown-section", recipe_with(optimiser={"lr": 1}), "optimiser"),
    ("missing-model", recipe_with(model=None), "model"),
    ("missing-output-dir", recipe_with(train__output_dir=None), "train.output_dir"),
    ("bool-as-int", recipe_with(lora__r=True), "lora.r"),
    ("string-as-int", recipe_with(lora__r="16"), "lora.r"),
    ("zero-rank", recipe_with(lora__r=0), "lora.r"),
    ("negative-rank", recipe_with(lora__r=-1), "lora.r"),
    ("float-as-int", recipe_with(train__max_steps=1.5), "train.max_steps"),
    ("inf-alpha", recipe_with(lora__alpha=float("inf")), "lora.alpha"),
    ("nan-temperature", recipe_with(generation__temperature=float("nan")), "generation.temperature"),
    ("dropout-above-1", recipe_with(lora__dropout=1.5), "lora.dropout"),
    ("string-learning-rate", recipe_with(train__learning_rate="fast"), "train.learning_rate"),
    ("bool-learning-rate", recipe_with(train__learning_rate=False), "train.learning_rate"),
    ("negative-seed", recipe_with(train__seed=-1), "train.seed"),
    ("huge-seed", recipe_with(train__seed=2**40), "train.seed"),
    ("zero-batch", recipe_with(train__batch_size=0), "train.batch_size"),
    ("unknown-optimizer", recipe_with(train__optimizer="sgd"), "train.optimizer"),
    ("unknown-quant-type", recipe_with(quantization__quant_type="int4"), "quantization.quant_type"),
    ("unknown-format", recipe_with(data__format="csv"), "data.format"),
    ("unknown-field", recipe_with(data__fields={"answer": "output"}), "data.fields.answer"),
    ("text-with-template", recipe_with(data__format="text", data__template="alpaca"), "template"),
    ("eval-fraction-and-path", recipe_with(data__eval_fraction=0.1, data__eval_path="data.json"), "eval"),
    ("empty-targets", recipe_with(lora__target_modules=[]), "lora.target_modules"),
    ("target-matching-nothing", recipe_with(lora__target_modules=["q_proj", "qproj"]), "qproj"),
    ("modules-to-save-matching-nothing", recipe_with(lora__modules_to_save=["head"]), "lora.modules_to_save"),
    ("trained-token-blank", recipe_with(lora__trained_tokens=["<|im_end|>", " "]), "lora.trained_tokens[1]"),
    ("trained-token-spaced", recipe_with(lora__trained_tokens=[" <|im_end|>"]), "lora.trained_tokens[0]"),
    ("trained-token-twice", recipe_with(lora__trained_tokens=["<|im_end|>", "<|im_end|>"]), "lora.trained_tokens"),
    ("trained-tokens-with-fsdp", recipe_with(train__distributed="fsdp", quantization__quant_storage="bfloat16",
                                             lora__trained_tokens=["<|im_end|>"]), "lora.trained_tokens"),
    ("trained-tokens-biased-head", lambda w: [write_recipe(w, {"model.name_or_path": str(w.phi),
                                                               "lora.trained_tokens": ["<|im_end|>"]})],
     "lora.modules_to_save"),
    ("tracker-not-installed", recipe_with(train__report_to=["wandb"]), "train.report_to"),
    ("flash-attention-on-cpu", recipe_with(model__attn_implementation="flash_attention_2"),
     "model.attn_implementation"),
    ("float16-on-cpu", recipe_with(quantization__compute_dtype="float16"), "quantization.compute_dtype"),
    ("model-dir-missing", recipe_with(model__name_or_path="./no-such-model"), "no-such-model"),
    ("model-dir-without-config", lambda w: [Path("empty-model").mkdir() or write_recipe(
        w, {"model.name_or_path": "./empty-model"})], "empty-model"),
    ("data-missing", recipe_with(data__path="missing.json"), "missing.json"),
    ("data-binary-json", with_data("d.json", b"\x89PNG\r\n\x1a\n\0\0\0"), "d.json"),
    ("data-latin1-jsonl", with_data("d.jsonl", json.dumps(ROW).replace("string", "stri\u00f1g").encode("latin-1")),
     "d.jsonl"),
    ("data-garbage-parquet", with_data("d.parquet", b"PAR1 this is not parquet at all PAR1"), "d.parquet"),
    ("data-truncated-parquet", with_data("d.parquet", b"PAR1\x15\x04\x15"), "d.parquet"),
    ("data-json-object", with_data("d.json", {"rows": GOOD}), "d.json"),
    ("data-bad-json", with_data("d.json", b'[{"instruction": "x",'), "d.json"),
    ("data-bad-jsonl-line", with_data("d.jsonl", (json.dumps(ROW) + "\n{oops}\n").encode()), "line 2"),
    ("data-deep-json", with_data("d.json", DEEP.encode()), "d.json"),
    ("data-deep-jsonl", with_data("d.jsonl", (json.dumps(ROW) + "\n" + DEEP + "\n").encode()), "line 2"),
    ("data-5001-digit-integer-json", with_data("d.json", f"[{LONG_INTEGER}]".encode()), "d.json"),
    ("data-5001-digit-integer-jsonl",
     with_data("d.jsonl", (json.dumps(ROW) + f'\n{{"id": {LONG_INTEGER}}}\n').encode()), "line 2"),
    ("data-binary-csv", with_data("d.csv", b"instruction,output\n\0\0\xff\xfe"), "d.csv"),
    ("data-latin1-csv", with_data("d.csv", "instruction,output\ncaf\u00e9,x\n".encode("latin-1")), "d.csv"),
    ("data-empty-list", with_data("d.json", []), "d.json"),
    ("data-empty-jsonl", with_data("d.jsonl", b"\n\n"), "d.jsonl"),
    ("data-empty-output", with_data("d.json", [ROW, dict(ROW, output="")]), "(rows 1)"),
    ("data-wrong-format", with_data("d.json", [{"question": "q", "answer": "a"}]), "data.fields"),
    ("data-row-not-object", with_data("d.jsonl", (json.dumps(ROW) + "\n[1, 2]\n").encode()), "(rows 1)"),
    ("data-non-string-field", with_data("d.json", [ROW, dict(ROW, output=42)]), "(rows 1)"),
    ("data-dir-not-a-dataset", lambda w: [Path("ddir").mkdir() or write_recipe(w, {"data.path": "./ddir"})], "ddir"),
    ("data-too-long-error", recipe_with(data__too_long="error", data__max_length=20), "data.max_length"),
    ("data-nothing-fits", recipe_with(data__max_length=20), "data.max_length"),
    ("data-invalid-over-cap", with_data("d.json", [ROW, dict(ROW, output="")], **{"data.skip_invalid": True}),
     "data.max_invalid_fraction"),
    ("eval-missing", recipe_with(data__eval_path="nope.jsonl"), "data.eval_path"),
    ("eval-binary", with_data("e.jsonl", b"\0\0\0\0", key="data.eval_path"), "e.jsonl"),
    ("eval-invalid-rows", with_data("e.json", [dict(ROW, output="")], key="data.eval_path"), "e.json"),
    ("eval-fraction-leaves-nothing", lambda w: [write_recipe(w, {"data.path": data_file("one.json", [ROW]),
                                                                  "data.eval_fraction": 0.4})], "data.eval_fraction"),
    ("output-dir-is-a-file", lambda w: [Path("out").write_text("x") and write_recipe(w, {"train.output_dir": "out"})],
     "train.output_dir"),
    ("output-dir-under-a-file", lambda w: [Path("f").write_text("x") and write_recipe(w, {"train.output_dir": "f/run"})],
     "train.output_dir"),
    ("output-dir-not-a-run", lambda w: [(Path("mine").mkdir(), Path("mine/notes.txt").write_text("x"))
                                        and write_recipe(w, {"train.output_dir": "mine"})], "train.output_dir"),
    ("overwrite-not-a-run", lambda w: [(Path("mine").mkdir(), Path("mine/notes.txt").write_text("x"))
                                       and write_recipe(w, {"train.output_dir": "mine"}), "--overwrite"],
     "train.output_dir"),
    ("overwrite-holding-the-data", lambda w: [write_recipe(w, {"train.output_dir": "."}), "--overwrite"],
     "train.output_dir"),
    ("resume-another-recipe", lambda w: [str(w.run / "recipe.yaml"), "--set", "lora.r=8"], "lora.r (16 -> 8)"),
    ("resume-shorter-than-done", lambda w: [str(w.run / "recipe.yaml"), "--set", "train.max_steps=50"],
     "train.max_steps=50"),
    ("8bit-and-4bit", lambda w: [write_recipe(w, {"quantization.load_in_8bit": True,
                                                  "quantization.load_in_4bit": True})], "load_in_8bit"),
    ("extra-unknown-field", lambda w: [write_recipe(w, {"train.extra": {"torch_compil": True}})], "train.extra"),
    ("extra-bad-value", lambda w: [write_recipe(w, {"train.extra": {"hub_strategy": "sometimes"}})], "hub_strategy"),
    ("extra-number-for-a-path", lambda w: [write_recipe(w, {"train.extra": {"accelerator_config": 5}})],
     "accelerator_config"),
    ("extra-wrong-type", lambda w: [write_recipe(w, {"train.extra": {"torch_compile": "yes"}})], "torch_compile"),
    ("extra-owned-field", lambda w: [write_recipe(w, {"train.extra": {"learning_rate": 1.0}})], "train.extra"),
    ("min-lr-not-cosine", lambda w: [write_recipe(w, {"train.min_lr_ratio": 0.1, "train.lr_scheduler": "linear"})],
     "train.min_lr_ratio"),
    ("fsdp-on-cpu", lambda w: [write_recipe(w, {"train.distributed": "fsdp",
                                                "quantization.quant_storage": "bfloat16"})], "train.distributed"),
    ("fsdp-uint8-storage", lambda w: [write_recipe(w, {"train.distributed": "fsdp"})], "quantization.quant_storage"),
    ("zero-processes", lambda w: [write_recipe(w), "--nproc-per-node", "0"], "--nproc-per-node"),
    ("set-no-equals", lambda w: [write_recipe(w), "--set", "lora.r"], "lora.r"),
    ("set-no-key", lambda w: [write_recipe(w), "--set", "=3"], "=3"),
    ("set-into-a-value", lambda w: [write_recipe(w), "--set", "model.name_or_path.x=1"], "model.name_or_path"),
    ("set-bool-rank", lambda w: [write_recipe(w), "--set", "lora.r=yes"], "lora.r"),
    ("set-string-lr", lambda w: [write_recipe(w), "--set", "train.learning_rate=abc"], "train.learning_rate"),
    ("set-bad-yaml", lambda w: [write_recipe(w), "--set", "lora.target_modules=[q_proj"], "lora.target_modules"),
    ("set-unknown-key", lambda w: [write_recipe(w), "--set", "train.epoch=2"], "train.epoch"),
    ("set-sexagesimal", lambda w: [write_recipe(w), "--set", "lora.r=1:30"], "lora.r"),
    ("set-yes-for-a-boolean", lambda w: [write_recipe(w), "--set", "lora.use_rslora=yes"], "lora.use_rslora"),
    ("set-deep", lambda w: [write_recipe(w), "--set", f"lora.modules_to_save={DEEP}"], "lora.modules_to_save"),
    ("set-5001-digit-integer", lambda w: [write_recipe(w), "--set", f"lora.r={LONG_INTEGER}"], "lora.r"),
    ("set-complex-key", lambda w: [write_recipe(w), "--set", "train.extra={? [a, b]: 1}"], "train.extra"),
    # train.keep_best and the trainer's own best-model keys it replaces
    ("keep-best-without-eval-data", recipe_with(train__keep_best="eval_loss"), "train.keep_best"),
    ("keep-best-pass-at-1-without-eval-problems", recipe_with(train__keep_best="pass@1"),
     "train.keep_best: pass@1 picks a checkpoint by the code it writes, and train.eval_problems is not set"),
    ("keep-best-unknown-metric", recipe_with(train__keep_best="pass@10"), "train.keep_best"),
    # train.eval_problems (issue 30): the opt-in to run generated code, the file, the keys around it
    ("eval-problems-without-opt-in", lambda w: [write_recipe(w, {"train.eval_problems": data_file(
        "p.jsonl", PROBLEMS.read_bytes())})], "set train.allow_code_execution: true"),
    ("eval-problems-missing", recipe_with(train__eval_problems="nope.jsonl", train__allow_code_execution=True),
     "train.eval_problems: file not found"),
    ("eval-problems-not-problems", lambda w: [write_recipe(w, {
        "train.eval_problems": data_file("p.jsonl", b'{"task_id": "x"}\n'), "train.allow_code_execution": True})],
     "train.eval_problems: p.jsonl row 0 (line 1) is neither a HumanEval problem"),
    ("eval-problems-every-without-problems", recipe_with(train__eval_problems_every=5), "train.eval_problems_every"),
    ("keep-best-pass-at-1-without-checkpoint", recipe_with(
        train__eval_problems="p.jsonl", train__keep_best="pass@1", train__save_steps=2, train__eval_problems_every=3),
     "make eval_problems_every a multiple of save_steps"),
    ("early-stopping-without-keep-best", recipe_with(train__early_stopping_patience=2),
     "train.early_stopping_patience"),
    ("eval-samples-greedy", recipe_with(train__eval_problems="p.jsonl", train__eval_samples=5), "train.eval_samples"),
    ("keep-best-eval-without-checkpoint", lambda w: [write_recipe(w, {
        "train.keep_best": "eval_loss", "train.save_steps": 4, "train.eval_steps": 6,
        "data.eval_path": data_file("eval.json", GOOD)})], "eval_steps a multiple of save_steps"),
    ("extra-metric-for-best-model", recipe_with(train__extra={"metric_for_best_model": "eval_loss"}),
     "use train.keep_best"),
    ("extra-load-best-model-at-end", recipe_with(train__extra={"load_best_model_at_end": True}),
     "use train.keep_best"),
    # check passing means train finishes: bounds, saving, eval data, columns, the output directory (issue 28, item 5)
    ("rank-1e29", recipe_with(lora__r=10**29), "lora.r"),
    ("rank-above-the-narrowest-layer", recipe_with(lora__r=33), "k_proj (128 -> 32)"),
    ("learning-rate-1e300", recipe_with(train__learning_rate=1e300), "train.learning_rate: at most 1"),
    ("weight-decay-above-1", recipe_with(train__weight_decay=2.0), "train.weight_decay: at most 1"),
    ("max-steps-1e20", recipe_with(train__max_steps=10**20), "train.max_steps"),
    ("epochs-beyond-a-year", recipe_with(train__max_steps=None, train__epochs=1e300), "train.epochs"),
    ("batch-beyond-memory", recipe_with(train__batch_size=10**9), "train.batch_size"),
    ("extra-save-strategy-no", recipe_with(train__extra={"save_strategy": "no"}), "train.extra.save_strategy"),
    ("extra-save-strategy-epoch", recipe_with(train__extra={"save_strategy": "epoch"}), "train.extra.save_strategy"),
    ("extra-save-only-model", recipe_with(train__extra={"save_only_model": True}), "train.extra.save_only_model"),
    ("extra-ignore-data-skip", recipe_with(train__extra={"ignore_data_skip": True}), "train.extra.ignore_data_skip"),
    ("extra-resume-from-checkpoint", recipe_with(train__extra={"resume_from_checkpoint": "run/checkpoints/x"}),
     "train.extra.resume_from_checkpoint"),
    ("extra-load-best-model-at-end-with-eval-data",
     recipe_with(data__eval_fraction=0.4, train__extra={"load_best_model_at_end": True}),
     "train.extra.load_best_model_at_end"),
    ("extra-save-on-each-node", recipe_with(train__extra={"save_on_each_node": True}), "train.extra.save_on_each_node"),
    ("eval-steps-without-eval-data", recipe_with(train__eval_steps=5), "train.eval_steps"),
    ("eval-batch-size-without-eval-data", recipe_with(train__eval_batch_size=2), "train.eval_batch_size"),
    ("mapped-column-in-no-row", recipe_with(data__fields={"input": "nosuchcolumn"}),
     "data.fields.input: no row of"),
    ("mapped-column-in-no-eval-row",
     lambda w: [write_recipe(w, {"data.path": data_file("d.json", [dict(ROW, context="x")]), "data.eval_path":
                                 data_file("e.json", [ROW]), "data.fields": {"input": "context"}})], "e.json"),
    ("output-dir-in-proc", recipe_with(train__output_dir="/proc/qlora-run"), "train.output_dir"),
    ("generation-temperature-1e-300", recipe_with(generation__temperature=1e-300), "generation.temperature"),
    ("generation-repetition-penalty-1e-300", recipe_with(generation__repetition_penalty=1e-300),
     "generation.repetition_penalty"),
    ("data-csv-row-with-an-extra-field", with_data("d.csv", b"instruction,output\nhi,there\nx,y,extra\n"),
     "d.csv line 3"),
    ("data-dataset-info-garbage", lambda w: [saved_dataset("ddir", "dataset_info.json")
                                            and write_recipe(w, {"data.path": "./ddir"})], "ddir"),
    ("data-dataset-state-garbage", lambda w: [saved_dataset("ddir", "state.json")
                                             and write_recipe(w, {"data.path": "./ddir"})], "ddir"),
]


def launch(*flags):
    """`qlora train` through the launcher with one process, then `flags` (a later --nproc-per-node wins)."""
    return lambda w: [write_recipe(w), "--nproc-per-node", "1", *flags]


def saved_dataset(name: str, garbage: str) -> bool:
    """A directory saved by datasets.save_to_disk whose file `garbage` holds garbage."""
    import datasets

    datasets.Dataset.from_list(GOOD).save_to_disk(name)
    Path(name, garbage).write_text("garbage")
    return True


def generate_args(*flags):
    return lambda w: [str(w.run), "--prompt", "Write a function.", *flags]


def prompts_file(content, *flags):
    return lambda w: [str(w.run), "--input-file", data_file("in.jsonl", content), "--output-file", "out.jsonl", *flags]


PROMPT = (json.dumps({"instruction": "Write a function."}) + "\n").encode()
PROBLEMS = Path(__file__).resolve().parents[1] / "src" / "qlora" / "sample_data" / "eval_problems.jsonl"


def eval_args(*flags):
    return lambda w: [str(w.run), "--problems", str(PROBLEMS), "--out", "o", "--allow-code-execution", *flags]

def a_file() -> str:
    Path("f").write_text("a file, not a directory")
    return "f"


def made(w: World) -> dict:
    """What `eval_args()` records in its --out (evaluate.made_of), computed as the command does."""
    from qlora.config import GenerationSection
    from qlora.evaluate import made_of

    return made_of(w.run, None, PROBLEMS, "instruct", GenerationSection(temperature=0.2, top_p=0.95,
                                                                        max_new_tokens=512, seed=0))


def eval_out(of: dict) -> bool:
    """An earlier `qlora eval --out o` of `of`, as eval leaves it."""
    Path("o").mkdir()
    Path("o/samples.jsonl").write_text(json.dumps({"model": "run", "task_id": "qlora/0", "sample": 0}) + "\n")
    Path("o/.qlora.json").write_text(json.dumps({"written_by": "eval", "of": of}))
    return True


GGUF_HEADER_CUT = b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8  # version 3, then the tensor count cut short


def rwkv_gguf() -> str:
    """A well-formed GGUF, with a tokenizer, of an architecture transformers does not load (RWKV-6)."""
    from gguf import GGUFWriter

    writer = GGUFWriter("rwkv.gguf", "rwkv6")
    writer.add_tokenizer_model("gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return "rwkv.gguf"


OTHER_CASES = [
    ("generate-missing-run", "generate", lambda w: ["nope", "--prompt", "x"], "nope"),
    ("generate-not-a-run", "generate", lambda w: [Path("adir").mkdir() or "adir", "--prompt", "x"], "adir"),
    ("generate-run-without-adapter", "generate",
     lambda w: [Path("half").mkdir() or write_recipe(w, name="half/recipe.yaml") and "half", "--prompt", "x"], "half"),
    ("generate-no-mode", "generate", lambda w: [str(w.run)], "--prompt"),
    ("generate-two-modes", "generate", lambda w: [str(w.run), "--prompt", "x", "--chat"], "--chat"),
    ("generate-input-without-output", "generate",
     lambda w: [str(w.run), "--input-file", data_file("in.jsonl", PROMPT)], "--output-file"),
    ("generate-empty-prompt", "generate", lambda w: [str(w.run), "--prompt", ""], "--prompt"),
    ("generate-empty-stop", "generate", generate_args("--stop", ""), "stop"),
    ("generate-zero-batch", "generate", generate_args("--batch-size", "0"), "--batch-size"),
    ("generate-negative-batch", "generate", generate_args("--batch-size", "-1"), "--batch-size"),
    ("generate-negative-seed", "generate", generate_args("--seed", "-1"), "seed"),
    ("generate-huge-seed", "generate", generate_args("--seed", str(10**30)), "seed"),
    ("generate-inf-temperature", "generate", generate_args("--temperature", "inf"), "temperature"),
    ("generate-nan-temperature", "generate", generate_args("--temperature", "nan"), "temperature"),
    ("generate-negative-temperature", "generate", generate_args("--temperature", "-1"), "temperature"),
    ("generate-zero-top-p", "generate", generate_args("--top-p", "0"), "--top-p"),
    ("generate-top-p-above-1", "generate", generate_args("--top-p", "1.5"), "--top-p"),
    ("generate-negative-top-k", "generate", generate_args("--top-k", "-1"), "--top-k"),
    ("generate-zero-beams", "generate", generate_args("--num-beams", "0"), "--num-beams"),
    ("generate-zero-new-tokens", "generate", generate_args("--max-new-tokens", "0"), "--max-new-tokens"),
    ("generate-zero-repetition-penalty", "generate", generate_args("--repetition-penalty", "0"),
     "--repetition-penalty"),
    ("generate-beams-stream", "generate", generate_args("--num-beams", "2", "--stream"), "--stream"),
    ("generate-input-missing", "generate",
     lambda w: [str(w.run), "--input-file", "nope.jsonl", "--output-file", "out.jsonl"], "nope.jsonl"),
    ("generate-input-binary", "generate", prompts_file(b"\0\0\x01"), "in.jsonl"),
    ("generate-input-latin1", "generate", prompts_file('{"instruction": "caf\u00e9"}\n'.encode("latin-1")), "in.jsonl"),
    ("generate-input-bad-json", "generate", prompts_file(PROMPT + b"{oops\n"), "line 2"),
    ("generate-input-no-instruction", "generate", prompts_file(PROMPT + b'{"input": "x"}\n'), "row 1"),
    ("generate-input-empty", "generate", prompts_file(b"\n"), "in.jsonl"),
    ("generate-output-in-missing-dir", "generate",
     lambda w: [str(w.run), "--input-file", data_file("in.jsonl", PROMPT), "--output-file", "no/dir/out.jsonl"],
     "no/dir"),
    ("generate-output-is-a-directory", "generate",
     lambda w: [str(w.run), "--input-file", data_file("in.jsonl", PROMPT), "--output-file",
                Path("odir").mkdir() or "odir"], "odir"),
    ("generate-output-is-the-input", "generate",
     lambda w: [str(w.run), "--input-file", data_file("in.jsonl", PROMPT), "--output-file", "in.jsonl"], "in.jsonl"),
    ("generate-output-of-other-rows", "generate",
     lambda w: [str(w.run), "--input-file", data_file("in.jsonl", PROMPT), "--output-file",
                data_file("out.jsonl", (json.dumps({"instruction": "Other.", "generation": "x"}) + "\n").encode())],
     "out.jsonl"),
    ("generate-output-one-line-without-newline", "generate",  # a user's file: never cut (issue 28)
     lambda w: [str(w.run), "--input-file", data_file("in.jsonl", PROMPT), "--output-file",
                data_file("results.json", b'{"accuracy": 0.93}')], "results.json line 1"),
    ("generate-output-cut-line-of-another-row", "generate",
     lambda w: [str(w.run), "--input-file", data_file("in.jsonl", PROMPT), "--output-file",
                data_file("out.jsonl", b'{"instruction": "Other')], "out.jsonl line 1"),
    ("generate-output-line-past-the-last-row", "generate",
     lambda w: [str(w.run), "--input-file", data_file("in.jsonl", PROMPT), "--output-file",
                data_file("out.jsonl", (row_line(json.loads(PROMPT), "x") + "\n{").encode())], "out.jsonl line 2"),
    ("generate-input-deep", "generate", prompts_file((DEEP + "\n").encode()), "in.jsonl line 1"),
    ("generate-input-5001-digit-integer", "generate",
     prompts_file(PROMPT + f'{{"instruction": "x", "id": {LONG_INTEGER}}}\n'.encode()), "in.jsonl line 2"),
    ("merge-not-a-run", "merge", lambda w: [Path("adir").mkdir() or "adir", "--output", "m"], "adir"),
    ("merge-output-is-the-run", "merge", lambda w: [str(w.run), "--output", str(w.run), "--overwrite"], "--output"),
    ("merge-output-holds-the-run", "merge", lambda w: [str(w.run), "--output", str(w.run.parent), "--overwrite"],
     "--output"),
    ("merge-output-is-the-adapter", "merge",
     lambda w: [str(w.run), "--output", str(w.run / "adapter"), "--overwrite"], "--output"),
    ("merge-output-not-empty", "merge",
     lambda w: [str(w.run), "--output", (Path("m").mkdir(), Path("m/x").write_text("x")) and "m"], "--output"),
    ("merge-overwrite-not-a-merge", "merge",
     lambda w: [str(w.run), "--output", (Path("m").mkdir(), Path("m/x").write_text("x")) and "m", "--overwrite"],
     "--output"),
    ("merge-output-is-a-file", "merge", lambda w: [str(w.run), "--output", Path("f").write_text("x") and "f"],
     "--output"),
    ("merge-unknown-base", "merge", lambda w: [str(w.run), "--output", "m", "--base", "foo"], "--base"),
    ("merge-unknown-dtype", "merge", lambda w: [str(w.run), "--output", "m", "--dtype", "int8"], "--dtype"),
    ("merge-garbage-shard-size", "merge", lambda w: [str(w.run), "--output", "m", "--max-shard-size", "garbage"],
     "--max-shard-size"),
    ("merge-agreement-above-1", "merge", lambda w: [str(w.run), "--output", "m", "--min-agreement", "2"],
     "--min-agreement"),
    ("merge-negative-agreement", "merge", lambda w: [str(w.run), "--output", "m", "--min-agreement", "-0.1"],
     "--min-agreement"),
    ("eval-nothing-asked", "eval", lambda w: [str(w.run)], "--problems"),
    ("eval-run-and-samples", "eval", eval_args("--samples", "s.jsonl"), "--samples"),
    ("eval-no-run", "eval", lambda w: ["--problems", str(PROBLEMS), "--out", "o", "--allow-code-execution"], "RUN"),
    ("eval-loss-without-run", "eval", lambda w: ["--loss", "d.json"], "--loss"),
    ("eval-no-opt-in", "eval", lambda w: [str(w.run), "--problems", str(PROBLEMS), "--out", "o"],
     "--allow-code-execution"),
    ("eval-no-out", "eval", lambda w: [str(w.run), "--problems", str(PROBLEMS), "--allow-code-execution"], "--out"),
    ("eval-k-above-n", "eval", eval_args("--n", "2", "--k", "1,10"), "--k"),
    ("eval-k-not-numbers", "eval", eval_args("--k", "one"), "--k"),
    ("eval-zero-n", "eval", eval_args("--n", "0"), "--n"),
    ("eval-zero-timeout", "eval", eval_args("--timeout", "0"), "--timeout"),
    ("eval-unknown-style", "eval", eval_args("--style", "chat"), "--style"),
    ("eval-problems-missing", "eval",
     lambda w: [str(w.run), "--problems", "nope.jsonl", "--out", "o", "--allow-code-execution"], "nope.jsonl"),
    ("eval-problems-bad-json", "eval",
     lambda w: [str(w.run), "--problems", data_file("p.jsonl", b"{oops\n"), "--out", "o", "--allow-code-execution"],
     "line 1"),
    ("eval-problems-unknown-format", "eval",
     lambda w: [str(w.run), "--problems", data_file("p.jsonl", b'{"question": "x"}\n'), "--out", "o",
                "--allow-code-execution"], "row 0"),
    ("eval-problems-deep", "eval",
     lambda w: [str(w.run), "--problems", data_file("p.jsonl", DEEP.encode()), "--out", "o", "--allow-code-execution"],
     "p.jsonl line 1"),
    ("eval-samples-5001-digit-integer", "eval",
     lambda w: ["--problems", str(PROBLEMS), "--samples",
                data_file("s.jsonl", f'{{"task_id": {LONG_INTEGER}, "completion": ""}}\n'.encode()), "--out", "o",
                "--allow-code-execution"], "s.jsonl line 1"),
    ("eval-samples-unknown-task", "eval",
     lambda w: ["--problems", str(PROBLEMS), "--samples",
                data_file("s.jsonl", b'{"task_id": "nope", "completion": ""}\n'), "--out", "o",
                "--allow-code-execution"], "nope"),
    ("eval-out-is-a-file", "eval", lambda w: [str(w.run), "--problems", str(PROBLEMS), "--out",
                                             Path("f").write_text("x") and "f", "--allow-code-execution"], "--out"),
    ("eval-out-not-an-eval", "eval",
     lambda w: [str(w.run), "--problems", str(PROBLEMS), "--out", (Path("o").mkdir(), Path("o/x").write_text("x"))
                and "o", "--allow-code-execution"], "--out"),
    ("merge-bad-hub-repo", "merge", lambda w: [str(w.run), "--output", "m", "--push-to-hub", "no-namespace"],
     "--push-to-hub"),
    ("export-bad-hub-repo", "export", lambda w: [str(w.run), "--output", "x", "--push-to-hub", "a/b/c"],
     "--push-to-hub"),
    ("export-unknown-outtype", "export", lambda w: [str(w.run), "--output", "x", "--outtype", "q4"], "--outtype"),
    ("export-output-is-the-run", "export", lambda w: [str(w.run), "--output", str(w.run)], "--output"),
    ("report-not-a-run", "report", lambda w: [Path("adir").mkdir() or "adir"], "adir"),
    ("report-bad-suffix", "report", lambda w: [str(w.run), "--output", "r.pdf"], "--output"),
    ("tiny-unknown-arch", "tiny", lambda w: ["gpt5", "t"], "gpt5"),
    ("tiny-onto-a-file", "tiny", lambda w: ["gemma", Path("f").write_text("x") and "f"], "f"),
    ("tiny-onto-cwd", "tiny", lambda w: [Path("x").write_text("x") and "gemma", "."], "."),
    ("tiny-onto-cwd-overwrite", "tiny", lambda w: [Path("x").write_text("x") and "gemma", ".", "--overwrite"], "."),
    ("tiny-not-empty", "tiny", lambda w: ["gemma", (Path("t").mkdir(), Path("t/x").write_text("x")) and "t"], "t"),
    ("tiny-overwrite-not-a-twin", "tiny",
     lambda w: ["gemma", (Path("t").mkdir(), Path("t/x").write_text("x")) and "t", "--overwrite"], "t"),
    ("import-gguf-missing", "import-gguf", lambda w: ["missing.gguf", "out"], "FILE: missing.gguf does not exist"),
    ("import-gguf-text", "import-gguf", lambda w: [data_file("not.gguf", b"hello\n"), "out"], "not a GGUF file"),
    ("import-gguf-safetensors", "import-gguf",
     lambda w: [data_file("w.gguf", (w.model / "model.safetensors").read_bytes()[:4096]), "out"], "not a GGUF file"),
    ("import-gguf-cut-short", "import-gguf", lambda w: [data_file("cut.gguf", GGUF_HEADER_CUT), "out"],
     "not a readable GGUF file"),
    ("import-gguf-unsupported-architecture", "import-gguf", lambda w: [rwkv_gguf(), "out"], "holds a 'rwkv6' model"),
    ("import-gguf-not-empty", "import-gguf",
     lambda w: [rwkv_gguf(), (Path("t").mkdir(), Path("t/x").write_text("x")) and "t"], "OUT: t exists and is not empty"),
    ("import-gguf-onto-a-file", "import-gguf", lambda w: [rwkv_gguf(), a_file()], "OUT: f is a file"),
    ("fetch-unknown-model", "fetch", lambda w: ["smollm3", "out"], "NAME: 'smollm3' is not a model qlora fetches"),
    ("fetch-not-empty", "fetch",
     lambda w: ["smollm2-135m", (Path("t").mkdir(), Path("t/x").write_text("x")) and "t"], "DIR: t exists"),
    ("fetch-overwrite-not-fetched", "fetch",
     lambda w: ["smollm2-135m", (Path("t").mkdir(), Path("t/x").write_text("x")) and "t", "--overwrite"],
     "not a directory `qlora fetch` wrote"),
    # outputs under a regular file, files qlora did not write, evals of something else (issue 28, items 1-3, 7)
    ("generate-output-under-a-file", "generate",
     lambda w: [*prompts_file(PROMPT)(w)[:-1], a_file() + "/out.jsonl"], "f/out.jsonl"),
    ("merge-output-under-a-file", "merge", lambda w: [str(w.run), "--output", a_file() + "/m"], "f/m"),
    ("export-output-under-a-file", "export", lambda w: [str(w.run), "--output", a_file() + "/x"], "f/x"),
    ("tiny-under-a-file", "tiny", lambda w: ["gemma", a_file() + "/t"], "f/t"),
    ("eval-out-under-a-file", "eval", lambda w: eval_args()(w)[:4] + [a_file() + "/o", "--allow-code-execution"],
     "f"),
    ("report-under-a-file", "report", lambda w: [str(w.run), "--output", a_file() + "/r.png"], "f"),
    ("report-onto-a-users-png", "report",
     lambda w: [str(w.run), "--output", data_file("mine.png", b"\x89PNG\r\n\x1a\nmy own picture")], "mine.png"),
    ("report-onto-a-users-html", "report",
     lambda w: [str(w.run), "--output", data_file("notes.html", b"<html>notes</html>")], "notes.html"),
    ("report-onto-a-directory", "report", lambda w: [str(w.run), "--output", Path("r.png").mkdir() or "r.png"],
     "r.png"),
    ("eval-out-of-another-model", "eval", lambda w: eval_args()(w) if eval_out(
        {"source": "weights sha256 0", "path": "/elsewhere/run"}) else [], "/elsewhere/run"),
    ("eval-out-of-other-problems", "eval",
     lambda w: eval_args()(w) if eval_out({"source": made(w)["source"], "path": str(w.run),
                                           "problems": "sha256 0"}) else [], "problems sha256 0 there"),
    ("eval-out-at-another-temperature", "eval",
     lambda w: eval_args()(w) if eval_out({**made(w), "temperature": 0.8}) else [], "temperature 0.8 there"),
    ("eval-out-with-another-seed", "eval",
     lambda w: eval_args()(w) if eval_out({**made(w), "seed": 7}) else [], "seed 7 there"),
    ("eval-samples-into-a-runs-eval", "eval",
     lambda w: ["--problems", str(PROBLEMS), "--samples",
                data_file("s.jsonl", b'{"task_id": "qlora/0", "completion": ""}\n'), "--out", "o",
                "--allow-code-execution"] if eval_out(made(w)) else [], "weights sha256"),
    # every flag of every command, one line before a model loads (issue 28, item 6)
    ("eval-negative-temperature", "eval", eval_args("--temperature", "-1"), "--temperature"),
    ("eval-nan-temperature", "eval", eval_args("--temperature", "nan"), "--temperature"),
    ("eval-temperature-1e-300", "eval", eval_args("--temperature", "1e-300"), "--temperature"),
    ("eval-zero-top-p", "eval", eval_args("--top-p", "0"), "--top-p"),
    ("eval-nan-top-p", "eval", eval_args("--top-p", "nan"), "--top-p"),
    ("eval-zero-new-tokens", "eval", eval_args("--max-new-tokens", "0"), "--max-new-tokens"),
    ("eval-negative-seed", "eval", eval_args("--seed", "-1"), "--seed"),
    ("eval-huge-seed", "eval", eval_args("--seed", str(2**32)), "--seed"),
    ("eval-timeout-1e300", "eval", eval_args("--timeout", "1e300"), "--timeout"),
    ("eval-nan-timeout", "eval", eval_args("--timeout", "nan"), "--timeout"),
    ("generate-temperature-1e-300", "generate", generate_args("--temperature", "1e-300"), "--temperature"),
    ("generate-repetition-penalty-1e-300", "generate", generate_args("--repetition-penalty", "1e-300"),
     "--repetition-penalty"),
    ("generate-nan-repetition-penalty", "generate", generate_args("--repetition-penalty", "nan"),
     "--repetition-penalty"),
    ("generate-200000-beams", "generate", generate_args("--num-beams", "200000"), "--num-beams 200000"),
    ("generate-more-beams-than-tokens", "generate", generate_args("--num-beams", "1025"), "1,024 tokens"),
    ("generate-file-beams", "generate", prompts_file(PROMPT, "--num-beams", str(10**12)), "--num-beams"),
    ("train-master-port-99999", "train", launch("--master-port", "99999"), "--master-port"),
    ("train-nnodes-abc", "train", launch("--nnodes", "abc"), "--nnodes"),
    ("train-nnodes-backwards", "train", launch("--nnodes", "3:2"), "--nnodes"),
    ("train-node-rank-past-nnodes", "train", launch("--nnodes", "2", "--node-rank", "2"), "--node-rank"),
    ("train-rdzv-endpoint-without-port", "train", launch("--rdzv-endpoint", "host"), "--rdzv-endpoint"),
    ("train-empty-master-addr", "train", launch("--master-addr", ""), "--master-addr"),
    ("train-a-million-processes", "train", launch("--nproc-per-node", "1000000"), "--nproc-per-node"),
]

CASES = ([pytest.param(command, build, culprit, id=f"{command}-{name}")
          for name, build, culprit in RECIPE_CASES for command in ("check", "train")]
         + [pytest.param(command, build, culprit, id=name) for name, command, build, culprit in OTHER_CASES])


def test_the_table_is_large_and_every_case_is_distinct():
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("command, build, culprit", CASES)
def test_a_bad_input_exits_2_with_one_line_naming_it_and_changes_nothing(world, tmp_path, monkeypatch, command, build,
                                                                         culprit):
    monkeypatch.chdir(tmp_path)
    data_file("data.json", GOOD)
    argv = [command, *build(world)]
    before, run_before = snapshot(tmp_path), snapshot(world.run)
    result = CliRunner().invoke(app, argv)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (argv, result.stderr, result.exception)
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, TypeError))
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], lines
    assert snapshot(tmp_path) == before and snapshot(world.run) == run_before
