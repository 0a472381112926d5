"""The `mvit` command line: parses arguments, calls the API, prints results.

Heavy modules (torch above all) are imported inside the commands that need them, so `mvit --help`
and `mvit plugins` start fast. A user mistake (`MvitError`) is one sentence on stderr and exit 2.
"""

from __future__ import annotations

import sys
from enum import Enum

import typer
from rich.console import Console

from mvit.errors import MvitError

app = typer.Typer(
    name="mvit",
    help="Classify dermoscopic skin-lesion images with one ViT backbone and many classifier heads.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect dataset folders.", no_args_is_help=True)
app.add_typer(data_app, name="data")

stdout = Console()
stderr = Console(stderr=True)

EXIT_USER_ERROR = 2


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def main() -> None:
    try:
        app()
    except MvitError as error:
        stderr.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)


# ---- commands: plugins and data (registry) --------------------------------------------------

# ---- commands: predict, attention, evaluate (inference) -------------------------------------

# ---- commands: train, extract (training) ----------------------------------------------------
