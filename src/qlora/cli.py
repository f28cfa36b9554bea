"""The `qlora` command: parse flags, load the recipe, call one library function.

Nothing heavy is imported at module level so `qlora --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

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


def _run(action):
    """Run a command body: user errors exit 2 with one line, no traceback."""
    from qlora.errors import UserError

    try:
        return action()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="The YAML recipe.")],
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Start over in an output_dir that already holds a run.")] = False,
) -> None:
    """Train LoRA adapters on a 4-bit base model as the recipe says; writes the run directory."""

    def body():
        from qlora.config import load_recipe
        from qlora.train import train as train_recipe

        train_recipe(load_recipe(recipe, set_ or []), overwrite=overwrite)

    _run(body)


@app.command()
def tiny(
    arch: Annotated[str, typer.Argument(help="gemma, llama, mistral or phi.")],
    output: Annotated[Path, typer.Argument(help="Directory to save the model and tokenizer in.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing directory.")] = False,
) -> None:
    """Save a tiny random model of a real architecture with a locally trained tokenizer (demo, tests)."""

    def body():
        from qlora.tiny import build_tiny_model

        typer.echo(f"saved {build_tiny_model(arch, output, overwrite=overwrite)}", err=True)

    _run(body)


def main() -> None:  # pragma: no cover - `python -m qlora.cli`
    sys.exit(app())


if __name__ == "__main__":
    main()
