"""The `mvit` command line: parses arguments, calls the API, prints results.

Heavy modules (torch above all) are imported inside the commands that need them, so `mvit --help`
and `mvit plugins` start fast. A user mistake (`MvitError`) is one sentence on stderr and exit 2.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

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


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left", highlight=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    stdout.print(table)


def _print_csv(columns: list[str], rows: list[list[str]]) -> None:
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)


@app.command("plugins")
def plugins_command(
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table, json or csv (one row per head)"),
) -> None:
    """List installed plugins with their distribution and version, the datasets and heads they offer, and plugins skipped as broken."""
    import json

    from mvit.registry import manager

    summary = manager.registry().as_dict()
    if output is OutputFormat.json:
        typer.echo(json.dumps(summary, indent=2))
        return
    head_rows = [
        [h["name"], h["dataset"], ", ".join(h["classes"]), h["positive"] or "", h["plugin"]] for h in summary["heads"]
    ]
    if output is OutputFormat.csv:
        _print_csv(["head", "dataset", "classes", "positive", "plugin"], head_rows)
    else:
        _print_table(
            "Plugins",
            ["plugin", "distribution", "version", "datasets", "heads"],
            [
                [p["name"], p["distribution"], p["version"], ", ".join(p["datasets"]), ", ".join(p["heads"])]
                for p in summary["plugins"]
            ],
        )
        _print_table(
            "Datasets",
            ["dataset", "title", "labels", "splits", "plugin"],
            [
                [d["name"], d["title"], ", ".join(d["labels"]),
                 ", ".join(d["splits"]) + (" (official)" if d["official_splits"] else ""), d["plugin"]]
                for d in summary["datasets"]
            ],
        )
        _print_table("Heads", ["head", "dataset", "classes", "positive", "plugin"], head_rows)
    for warning in summary["warnings"]:
        source = f" ({warning['distribution']})" if warning["distribution"] else ""
        stderr.print(f"warning: plugin {warning['plugin']!r}{source} skipped: {warning['message']}",
                      markup=False, highlight=False, soft_wrap=True)


@data_app.command("check")
def data_check_command(
    name: str = typer.Argument(..., help="dataset name, as `mvit plugins` lists it"),
    root: Path = typer.Option(..., "--root", help="the dataset's folder"),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table, json or csv (counts)"),
    # 0 is splits.DEFAULT_SEED, written out so `mvit --help` need not import the registry
    seed: int = typer.Option(0, help="seed of the split, for datasets without official splits"),
) -> None:
    """Check a dataset folder: counts per split and class, missing, unreadable or unlabelled images, duplicates across splits. Exit 0 only when usable."""
    from mvit.registry.check import check_dataset

    report = check_dataset(name, root, seed=seed)
    if output is OutputFormat.json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        labels = sorted({label for counts in report.counts.values() for label in counts})
        rows = [
            [split, *(str(counts.get(label, 0)) for label in labels), str(sum(counts.values())),
             str(report.augmented.get(split, 0))]
            for split, counts in report.counts.items()
        ]
        columns = ["split", *labels, "total", "augmented"]
        if output is OutputFormat.csv:
            _print_csv(columns, rows)
        else:
            _print_table(f"{report.dataset} at {report.root}", columns, rows)
            for line in [*(f"error: {e}" for e in report.errors), *(f"warning: {w}" for w in report.warnings)]:
                stdout.print(line, markup=False, highlight=False, soft_wrap=True)
            verdict = "usable" if report.usable else "NOT usable: fix the errors above"
            stdout.print(f"{report.dataset}: {report.images} images, {verdict}", markup=False, highlight=False)
    raise typer.Exit(0 if report.usable else 1)


@data_app.command("leaks")
def data_leaks_command(
    datasets: list[str] = typer.Argument(..., help="NAME=DIR for each dataset used together"),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table, json or csv (shared images)"),
    # 0 is splits.DEFAULT_SEED, written out so `mvit --help` need not import the registry
    seed: int = typer.Option(0, help="seed of the split, for datasets without official splits"),
) -> None:
    """Find images shared by datasets used together (same bytes or same ISIC id) and the training images they take out."""
    import json

    from mvit.errors import ConfigError
    from mvit.registry.leakage import leak_free_splits

    roots = {}
    for item in datasets:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"expected NAME=DIR (for example ph2=~/data/PH2Dataset), got {item!r}")
        roots[name] = Path(folder)
    _, report = leak_free_splits(roots, seed=seed)
    rows = [
        [image.isic_id or "", "+".join(image.by), " ; ".join(f"{m.dataset}/{m.split}: {m.path}" for m in image.members)]
        for image in report.shared
    ]
    if output is OutputFormat.json:
        summary = {
            "shared": [
                {"isic_id": image.isic_id, "by": list(image.by),
                 "members": [{"dataset": m.dataset, "split": m.split, "path": str(m.path)} for m in image.members]}
                for image in report.shared
            ],
            "excluded_from_training": [{"dataset": m.dataset, "path": str(m.path)} for m in report.excluded],
        }
        typer.echo(json.dumps(summary, indent=2))
    elif output is OutputFormat.csv:
        _print_csv(["isic_id", "by", "files"], rows)
    else:
        pairs = report.pair_counts()
        _print_table("Images shared between datasets", ["datasets", "shared images"],
                     [[f"{a} + {b}", str(n)] for (a, b), n in sorted(pairs.items())])
        excluded: dict[str, int] = {}
        for member in report.excluded:
            excluded[member.dataset] = excluded.get(member.dataset, 0) + 1
        _print_table("Training images left out (leaking into an evaluation split)",
                     ["dataset", "images"], [[name, str(excluded.get(name, 0))] for name in roots])


# ---- commands: predict, attention, evaluate (inference) -------------------------------------

# ---- commands: train, extract (training) ----------------------------------------------------
