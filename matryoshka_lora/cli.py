"""The `matryoshka-lora` command: one subcommand per job, each built from a typed signature.

Each subcommand only parses and validates its arguments, then calls into the package; heavy imports
happen inside the command so that `--help` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="Train and serve nested-rank (Matryoshka) LoRA adapters: one adapter, every rank.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", help="Local Hugging Face model directory; default: the embedded SmolLM2-135M-Instruct."),
]


@app.callback()
def _configure(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# --- subcommands are added below, one block each -------------------------------------------------


def main() -> None:
    from matryoshka_lora.errors import MatryoshkaError

    try:
        app()
    except MatryoshkaError as exc:  # user-facing errors: one clear line, no traceback
        logging.getLogger("matryoshka_lora").error("%s", exc)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
