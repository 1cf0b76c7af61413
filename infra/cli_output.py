"""How `loopstream` commands print: data on stdout, diagnostics on stderr.

Every listing and show command takes `-o/--output table|json` (kubectl's spelling; the `tinker`
CLI's `--format` has the same two values). `table` is for a person: Rich tables whose ids, URIs
and numbers are never cut; when a table cannot fit the terminal with every such value whole, the
rows are printed one record at a time (`field  value` lines) instead. `json` is for a script: the
API's objects as they come (a listing is a JSON array), indented, on stdout.

User text (names, reasons, ids) goes into `rich.text.Text`, never into markup: a session named
`exp [v2]` or `x:train:0` prints as written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


OUTPUT = typer.Option(
    OutputFormat.table,
    "-o",
    "--output",
    help="table (for a person) or json (for a script: the API's objects on stdout)",
)


def stdout_console() -> Console:
    """Made per call, so the width is the terminal's (or $COLUMNS) when the command runs."""
    return Console(emoji=False, highlight=False)


def stderr_console() -> Console:
    return Console(stderr=True, emoji=False, highlight=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def fail(message: str, *, code: int = 1) -> None:
    """Print `error: message` on stderr and exit with `code`."""
    err = stderr_console()
    err.print(Text.assemble(("error:", "bold red"), " ", message))
    raise typer.Exit(code=code)


@dataclass(frozen=True)
class Column:
    header: str
    # id: ids, URIs, URLs, byte counts, times: printed whole on one line, never wrapped or cut.
    # text: free text (names, reasons): may wrap between words.
    kind: Literal["id", "text"] = "id"
    justify: Literal["left", "right"] = "left"


Cell = str | int | float | None


def _cell(value: Cell) -> str:
    if value is None or value == "":
        return "-"
    return str(value)


@dataclass(frozen=True)
class Listing:
    """A table's columns and rows, printed as a table or, when it cannot fit, as records."""

    columns: Sequence[Column]
    rows: Sequence[Sequence[Cell]]
    title: str | None = None

    def width_needed(self) -> int:
        """Columns at their whole width (free text at its longest word), plus borders and
        padding: `│ a │ b │` is 3 characters per column and 1."""
        total = 1
        for i, column in enumerate(self.columns):
            cells = [_cell(row[i]) for row in self.rows]
            if column.kind == "text":
                words = [w for c in cells for w in c.split()] + column.header.split()
                widest = max((cell_len(w) for w in words), default=1)
            else:
                widest = max((cell_len(c) for c in [*cells, column.header]), default=1)
            total += widest + 3
        return total

    def table(self) -> Table:
        table = Table(title=self.title)
        for column in self.columns:
            if column.kind == "id":
                table.add_column(
                    column.header, no_wrap=True, overflow="fold", justify=column.justify
                )
            else:
                table.add_column(column.header, overflow="fold", justify=column.justify)
        for row in self.rows:
            table.add_row(*(Text(_cell(value)) for value in row))
        return table

    def records(self) -> Table:
        """One `field  value` block per row: every value whole, however narrow the terminal."""
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, style="bold")
        grid.add_column(overflow="fold")
        for n, row in enumerate(self.rows):
            if n:
                grid.add_row("", "")
            for column, value in zip(self.columns, row, strict=True):
                grid.add_row(Text(column.header), Text(_cell(value)))
        return grid

    def print(self, console: Console | None = None) -> None:
        console = console or stdout_console()
        if self.width_needed() <= console.width:
            console.print(self.table())
            return
        if self.title:
            console.print(Text(self.title, style="italic"))
        if not self.rows:
            console.print(Text("(none)"))
            return
        console.print(self.records())


def emit(output: OutputFormat, data: Any, listings: Iterable[Listing | Text]) -> None:
    """`-o json`: `data` as JSON; `-o table`: the listings (and lines of text) in order."""
    if output == OutputFormat.json:
        print_json(data)
        return
    console = stdout_console()
    for item in listings:
        if isinstance(item, Listing):
            item.print(console)
        else:
            console.print(item)


def when(value: str | None) -> str:
    """An ISO 8601 time as `YYYY-MM-DD HH:MM:SS` (UTC, as the API gives it)."""
    return value[:19].replace("T", " ") if value else "-"
