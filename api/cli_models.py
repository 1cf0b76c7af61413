"""`loopstream models add|list`: the base models this machine's workers serve.

A base model is a Hugging Face folder under the model root (`LOOPSTREAM_MODEL_ROOT`, default
`~/.cache/loopstream/models`), named by its path there (`<name>` or `<org>/<name>`); the tiny
model is made there on first use. The workers and the API on this machine read the same root,
so a model added here can be used by a session at once (docs/models.md).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from infra.cli_output import OUTPUT, Column, Listing, OutputFormat, emit, fail
from infra.settings import get_settings

models_app = typer.Typer(no_args_is_help=True, help="Base models: add a local folder, list.")


@models_app.command("add")
def models_add(
    path: Path = typer.Argument(
        ..., help="a Hugging Face model folder (config.json, weights, tokenizer)"
    ),
    name: str | None = typer.Option(
        None,
        help="the base model name sessions will use, e.g. my-org/llama-3.2-1b "
        "(default: the folder's name)",
    ),
    link: bool = typer.Option(
        False, help="link to the folder instead of copying it (it must then stay where it is)"
    ),
    output: OutputFormat = OUTPUT,
) -> None:
    """Register a local Hugging Face folder as a base model (copied into the model root)."""
    from gpu_workers.models import add_base_model

    settings = get_settings()
    try:
        target = add_base_model(settings, path, name=name, link=link)
    except (ValueError, OSError) as exc:
        fail(str(exc))
        return
    added = target.relative_to(settings.model_root).as_posix()
    emit(
        output,
        {"name": added, "path": str(target), "linked": link},
        [Text(f"added base model {added} ({target})")],
    )


@models_app.command("list")
def models_list(output: OutputFormat = OUTPUT) -> None:
    """The base models sessions may use on this machine, with their folders."""
    from gpu_workers.models import available_base_models

    settings = get_settings()
    folders = {name: settings.model_root / name for name in available_base_models(settings)}
    models = [
        {"name": name, "path": str(folder), "linked": folder.is_symlink()}
        for name, folder in folders.items()
    ]
    rows = [
        [name, f"{folder}{' (link)' if folder.is_symlink() else ''}"]
        for name, folder in folders.items()
    ]
    emit(output, models, [Listing([Column("name"), Column("folder")], rows, title="base models")])
