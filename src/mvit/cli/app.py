"""The `mvit` command line: the typer app, the commands registered on it, and `main`, which turns a user
mistake (`MvitError`) into one sentence on stderr and exit status 2.

Each command lives in the module of its group (data, predict, evaluate, train) and only parses its
arguments, calls the API and prints. Heavy modules (torch above all) are imported inside the commands
that need them, so `mvit --help` and `mvit plugins` start fast.
"""

from __future__ import annotations

import sys

import typer

from mvit.cli import data, evaluate, predict, train
from mvit.cli.output import stderr
from mvit.errors import MvitError

app = typer.Typer(
    name="mvit",
    help="Classify dermoscopic skin-lesion images with one ViT backbone and many classifier heads.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# in this order in `mvit --help` (groups come after the commands)
app.command("plugins")(data.plugins_command)
app.command("predict")(predict.predict_command)
app.command("attention")(predict.attention_command)
app.command("evaluate")(evaluate.evaluate_command)
app.command("calibrate")(evaluate.calibrate_command)
app.command("train")(train.train_command)
app.command("extract")(train.extract_command)
app.add_typer(data.data_app, name="data")

EXIT_USER_ERROR = 2


def main() -> None:
    try:
        app()
    except MvitError as error:
        stderr.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)
