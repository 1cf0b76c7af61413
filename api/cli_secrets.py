"""`loopstream secrets create|list|update|delete`: the secrets store, through the REST API.

Unlike `keys`, these go through the API (with `LOOPSTREAM_API_KEY` or the default key file):
the API is the one place that encrypts a value and stores it before the command goes to the
log. A value is read from a hidden prompt (or `--value-file`, `-` for stdin), never from the
command line, where it would land in the shell's history and the process list.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import typer

from api.config import get_api_settings
from infra.cli_output import OUTPUT, Column, Listing, OutputFormat, emit, fail, when
from infra.settings import get_settings

secrets_app = typer.Typer(no_args_is_help=True, help="Secrets: create, list, update, delete.")

ValueFile = typer.Option(
    None, "--value-file", help="read the value from this file ('-': stdin); default: a prompt"
)


def _call(method: str, path: str, **kwargs: Any) -> Any:
    from api.bootstrap import default_api_key

    key = default_api_key(get_settings())
    if key is None:
        fail("no API key: set LOOPSTREAM_API_KEY")
    try:
        response = httpx.request(
            method,
            f"{get_api_settings().base_url}{path}",
            headers={"Authorization": f"Api-Key {key}"},
            timeout=60,
            **kwargs,
        )
    except httpx.HTTPError as exc:
        fail(f"the API did not answer: {exc}")
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        fail(f"({response.status_code}) {detail}")
    return response.json()


def _read_value(value_file: Path | None) -> str:
    if value_file is None:
        return str(typer.prompt("value", hide_input=True, confirmation_prompt=True))
    text = sys.stdin.read() if str(value_file) == "-" else value_file.read_text()
    return text.removesuffix("\n")


@secrets_app.command("create")
def secrets_create(name: str, value_file: Path | None = ValueFile) -> None:
    """Create a secret (its value is never shown again)."""
    made = _call("POST", "/v1/secrets", json={"name": name, "value": _read_value(value_file)})
    typer.echo(f"{made['name']} version {made['version']}")


@secrets_app.command("update")
def secrets_update(name: str, value_file: Path | None = ValueFile) -> None:
    """Give a secret a new value (a new version; the old value is destroyed)."""
    made = _call("PUT", f"/v1/secrets/{name}", json={"value": _read_value(value_file)})
    typer.echo(f"{made['name']} version {made['version']}")


@secrets_app.command("list")
def secrets_list(output: OutputFormat = OUTPUT) -> None:
    """Names, versions and timestamps; never a value."""
    secrets = _call("GET", "/v1/secrets")["secrets"]
    columns = [Column("name"), Column("version", justify="right"), Column("created"),
               Column("updated")]  # fmt: skip
    rows = [
        [s["name"], s["version"], when(s["created_at"]), when(s["updated_at"])] for s in secrets
    ]
    emit(output, secrets, [Listing(columns, rows, title="secrets")])


@secrets_app.command("delete")
def secrets_delete(name: str) -> None:
    """Delete a secret: every stored version of its value is destroyed."""
    gone = _call("DELETE", f"/v1/secrets/{name}")
    typer.echo(f"{gone['name']} deleted (last version {gone['version']})")
