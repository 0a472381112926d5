"""Printing shared by the commands: the two consoles, the --format choice, tables, CSV and plain lines.

Everything printed for people (messages on stderr and stdout, tables) goes through `printable`:
text from the user (paths, file names, labels, plugin names) is never read as rich markup, so
`[train]` prints as it is and `[/]` cannot crash the printing, and terminal control characters
(an ESC sequence in a file name that would clear the screen, a carriage return that would
overwrite the line) are shown as `\\x1b`, `\\x0d` instead of being obeyed. JSON and CSV keep the
data exact: they are for programs.

Light on purpose (rich and the standard library only): every command module imports it at start-up.
"""

from __future__ import annotations

import os
import re
import sys
from enum import Enum
from typing import Optional, Union

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

# C0 controls (newline and tab included: a message is one line), DEL, C1 controls, the Unicode
# bidirectional overrides (they reorder what follows on the line), and lone surrogates (the bytes of a
# file name that is not UTF-8, which would make printing fail)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _visible(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: object) -> str:
    """`text` safe to show on a terminal: each control character replaced by its \\x.. (or \\u....) form."""
    return _UNPRINTABLE.sub(_visible, str(text))


class _SafeConsole(Console):
    """A rich console that shows control characters in any string it prints instead of sending them
    to the terminal, whoever calls it (the trainer prints through the one the CLI hands it)."""

    def print(self, *objects, **options) -> None:  # type: ignore[override]
        super().print(*(printable(o) if isinstance(o, str) else o for o in objects), **options)


stdout = _SafeConsole()
stderr = _SafeConsole(stderr=True)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def plain(text: object, style: str = "") -> Text:
    """User-controlled text as a rich Text: printed as it is, never read as markup, controls made visible."""
    return Text(printable(text), style=style)


Cell = Union[str, Text]  # a table cell: a str is plain text; a Text (built with `plain`) keeps its style and lines


def print_table(title: str, columns: list[Cell], rows: list[list[Cell]], *, caption: Optional[Text] = None,
                fit: Optional[int] = None) -> None:
    """A rich table on stdout; title, headers and cells are plain text, so [brackets] in file names
    and labels print as they are and control characters are made visible. caption: a line under
    the table. fit: the column of paths to shorten (`shorten_path`) to two lines of what the other
    columns leave of the terminal's width."""
    from rich.table import Table

    if fit is not None:
        rows = _fitted(columns, rows, fit)
    table = Table(title=plain(title), title_justify="left", highlight=False, caption=caption, caption_justify="left")
    for k, column in enumerate(columns):
        # beside a column of paths, names and numbers are never split: the paths give way
        table.add_column(_cell(column), overflow="fold", no_wrap=fit is not None and k != fit)
    for row in rows:
        table.add_row(*map(_cell, row))
    stdout.print(table)


def _cell(cell: Cell) -> Text:
    return cell if isinstance(cell, Text) else plain(cell)


def _width(cell: Cell) -> int:
    """The terminal cells the longest line of `cell` takes."""
    return max(cell_len(line) for line in _cell(cell).plain.split("\n"))


def _fitted(columns: list[Cell], rows: list[list[Cell]], at: int) -> list[list[Cell]]:
    """`rows` with the paths in column `at` shortened to two lines of the width the other columns
    leave: rich would fold a deep path over six lines at 80 columns, burying the rows around it."""
    others = sum(max(_width(cell) for cell in [column, *(row[k] for row in rows)])
                 for k, column in enumerate(columns) if k != at)
    room = stdout.width - others - (3 * len(columns) + 1)  # rich's box: a rule and a space each side of every cell
    return [[shorten_path(cell, 2 * room) if k == at and isinstance(cell, str) else cell for k, cell in enumerate(row)]
            for row in rows]


def shorten_path(path: str, width: int) -> str:
    """`path` made printable in at most `width` cells where it can be: the file name kept whole (it
    tells the images apart) and the middle of the folders replaced by "…"; as it is when it fits."""
    shown = printable(path)
    cut = max(shown.rfind("/"), shown.rfind(os.sep))  # the file name starts after the last separator
    if cell_len(shown) <= width or cut < 0:
        return shown
    folder, name = shown[:cut], shown[cut:]
    keep = width - cell_len(name) - 1  # characters of the folder part left beside the "…"
    if keep <= 0:
        return "…" + name
    start = keep // 2  # the top of the tree (which disk, which project) and the folders nearest the file
    return folder[:start] + "…" + folder[len(folder) - (keep - start):] + name


def print_csv(columns: list[str], rows: list[list[str]]) -> None:
    """CSV on stdout, exact: a program reads it."""
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)


def say(message: str) -> None:
    """One plain line on stderr: never markup, control characters made visible, never wrapped."""
    stderr.print(plain(message), highlight=False, soft_wrap=True)


def show(message: str) -> None:
    """One plain line on stdout, as `say` writes on stderr."""
    stdout.print(plain(message), highlight=False, soft_wrap=True)


def error_line(message: str) -> None:
    """The one line `error: MESSAGE` on stderr, the word `error:` in red on a terminal."""
    stderr.print(Text.assemble(("error:", "bold red"), " ", plain(message)), highlight=False, soft_wrap=True)
