"""Printing shared by the commands: the two consoles, the --format choice, tables, CSV and plain lines.

Light on purpose (rich and the standard library only): every command module imports it at start-up.
"""

from __future__ import annotations

import sys
from enum import Enum

from rich.console import Console

stdout = Console()
stderr = Console(stderr=True)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A rich table on stdout; cells are escaped, so [brackets] in file names print as they are."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left", highlight=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    stdout.print(table)


def print_csv(columns: list[str], rows: list[list[str]]) -> None:
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)


def say(message: str) -> None:
    """One plain line on stderr: file names may hold [brackets] that rich would read as markup."""
    stderr.print(message, markup=False, highlight=False, soft_wrap=True)


def show(message: str) -> None:
    """One plain line on stdout, as `say` writes on stderr."""
    stdout.print(message, markup=False, highlight=False, soft_wrap=True)

