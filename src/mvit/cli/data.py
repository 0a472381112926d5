"""`mvit plugins` and `mvit data check|leaks`: what the registry offers and whether dataset folders are usable.

These commands never import torch: they read the registry and the files only (`data leaks` with a
model file reads its record of training images, and so imports torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mvit.cli.output import OutputFormat, print_csv, print_table, say, show, stdout

data_app = typer.Typer(help="Inspect dataset folders.", no_args_is_help=True)
plugins_app = typer.Typer(
    help="List installed plugins with their distribution and version, the datasets and heads they offer, "
    "and plugins skipped as broken; `mvit plugins new NAME` writes a new plugin package.",
    invoke_without_command=True,
)

# 0 is splits.DEFAULT_SEED, written out so `mvit --help` need not import the registry
SEED_HELP = "seed of the split, for datasets without official splits"


@plugins_app.callback()
def plugins_command(
    context: typer.Context,
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table, json or csv (one row per head)"),
) -> None:
    """List installed plugins with their distribution and version, the datasets and heads they offer, and plugins skipped as broken."""
    if context.invoked_subcommand is not None:
        return
    import json

    from mvit.registry import manager
    from mvit.registry.catalog import debugging

    registry = manager.registry()
    summary = registry.as_dict()
    if output is OutputFormat.json:
        typer.echo(json.dumps(summary, indent=2))
        return
    head_rows = [
        [h["name"], h["dataset"], ", ".join(h["classes"]), h["positive"] or "", h["plugin"]] for h in summary["heads"]
    ]
    if output is OutputFormat.csv:
        print_csv(["head", "dataset", "classes", "positive", "plugin"], head_rows)
    else:
        print_table(
            "Plugins",
            ["plugin", "distribution", "version", "datasets", "heads"],
            [
                [p["name"], p["distribution"], p["version"], ", ".join(p["datasets"]), ", ".join(p["heads"])]
                for p in summary["plugins"]
            ],
        )
        print_table(
            "Datasets",
            ["dataset", "title", "labels", "splits", "plugin"],
            [
                [d["name"], d["title"], ", ".join(d["labels"]),
                 ", ".join(d["splits"]) + (" (official)" if d["official_splits"] else ""), d["plugin"]]
                for d in summary["datasets"]
            ],
        )
        print_table("Heads", ["head", "dataset", "classes", "positive", "plugin"], head_rows)
    for warning in registry.warnings:
        say(f"{warning.level}: {warning.sentence()}")
        if warning.traceback and debugging():
            for line in warning.traceback.rstrip().splitlines():
                say(f"    {line}")


@plugins_app.command("new")
def plugins_new_command(
    name: str = typer.Argument(..., help="the dataset's name: lower-case letters, digits, '-' and '_'"),
    output: Path = typer.Option(None, "--output", "-o", help="the package folder to write (default: ./mvit-NAME)"),
) -> None:
    """Write a working dataset plugin package to start from: pyproject, plugin module, a test, a README."""
    from mvit.datasets.scaffold import name_clash, write_plugin

    folder = write_plugin(name, output if output is not None else Path(f"mvit-{name}"))
    show(f"wrote {folder}; next: cd {folder} && pip install -e '.[test]' && pytest, then edit its loader")
    # written all the same: the author may mean to rename it, and the warning says what would clash
    clash = name_clash(name, folder)
    if clash:
        say(f"warning: {clash}")


@data_app.command("check")
def data_check_command(
    name: Optional[str] = typer.Argument(None, help="dataset name, as `mvit plugins` lists it (with --folder: a name for your own dataset)"),
    root: Optional[Path] = typer.Option(None, "--root", help="the dataset's folder"),
    folder: Optional[Path] = typer.Option(None, "--folder", help="your own folder of class sub-folders, or CSV of image,label[,group]: checked without a plugin"),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table, json or csv (counts)"),
    seed: int = typer.Option(0, help=SEED_HELP),
) -> None:
    """Check a dataset folder: counts per split and class, missing, unreadable or unlabelled images, duplicates across splits. Exit 0 only when usable."""
    from mvit.datasets.check import check_dataset
    from mvit.datasets.folder import own_root

    name, root = own_root(name, root, folder)  # with --folder, your own dataset joins the registry
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
            print_csv(columns, rows)
        else:
            print_table(f"{report.dataset} at {report.root}", columns, rows)
            for line in [*(f"error: {e}" for e in report.errors), *(f"warning: {w}" for w in report.warnings)]:
                show(line)
            verdict = "usable" if report.usable else "NOT usable: fix the errors above"
            stdout.print(f"{report.dataset}: {report.images} images, {verdict}", markup=False, highlight=False)
    raise typer.Exit(0 if report.usable else 1)


def _leak_sides(arguments: list[str], model: Optional[Path]) -> tuple[dict[str, Path], Optional[Path]]:
    """`mvit data leaks`' arguments as {dataset: folder} and the model file compared with them (one
    named among the arguments or by --model), or one sentence for what cannot be read so."""
    from mvit.errors import ConfigError

    roots = {}
    for item in arguments:
        name, sep, folder = item.partition("=")
        if not sep and item.endswith(".safetensors"):  # a model file as one side
            if model is not None:
                raise ConfigError(f"give one model file to compare with, got {model} and {item}")
            model = Path(item)
            continue
        if not sep or not name or not folder:
            raise ConfigError(f"expected NAME=DIR (for example ph2=~/data/PH2Dataset) or a model file, got {item!r}")
        roots[name] = Path(folder)
    if not roots:
        raise ConfigError("give at least one NAME=DIR to compare with the model file")
    return roots, model


def _leaks_summary(report, model: Optional[Path], record, trained: list) -> dict:
    """`mvit data leaks --format json`: the shared images, the training images left out and, with a
    model file, the images of these datasets it trained on."""
    summary = {
        "shared": [
            {"isic_id": image.isic_id, "by": list(image.by),
             "members": [{"dataset": m.dataset, "split": m.split, "path": str(m.path)} for m in image.members]}
            for image in report.shared
        ],
        "excluded_from_training": [{"dataset": m.dataset, "path": str(m.path)} for m in report.excluded],
    }
    if record is not None:
        summary["model"] = {
            "path": str(model), "training_images": len(record), "complete": record.complete,
            "trained_on": [{"dataset": m.dataset, "split": m.split, "path": str(m.path), "by": list(by)} for m, by in trained],
        }
    return summary


@data_app.command("leaks")
def data_leaks_command(
    datasets: list[str] = typer.Argument(..., help="NAME=DIR for each dataset used together; a model file (.safetensors) as one more side is the same as --model"),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table, json or csv (shared images)"),
    seed: int = typer.Option(0, help=SEED_HELP),
    model: Path = typer.Option(None, "--model", "-m", help="a model file: also find the images of these datasets it trained on (as its file records them)"),
) -> None:
    """Find images shared by datasets used together (same bytes or same ISIC id) and the training images they take out; with a model file, the images of the datasets that model trained on."""
    import json

    from mvit.errors import ConfigError
    from mvit.core.training_images import isic_id
    from mvit.datasets.leakage import Member, leak_free_splits

    roots, model = _leak_sides(datasets, model)
    record = None
    if model is not None:
        from mvit.core.model_file import read_training_images

        record = read_training_images(model)
        if record is None:
            raise ConfigError(f"{model} does not record its training images (it was written before mvit recorded "
                              f"them), so no dataset can be compared with it")
    cleaned, report = leak_free_splits(roots, seed=seed)
    rows = [
        [image.isic_id or "", "+".join(image.by), " ; ".join(f"{m.dataset}/{m.split}: {m.path}" for m in image.members)]
        for image in report.shared
    ]
    trained: list[tuple[Member, tuple[str, ...]]] = []  # files of the datasets the model trained on, and how they match
    if record is not None:
        members = [Member(d, split, s.path) for d, per_split in cleaned.items() for split, samples in per_split.items()
                   for s in samples] + list(report.excluded)
        found = record.matches(m.path for m in members)
        trained = [(m, found[m.path]) for m in members if m.path in found]
        rows += [[isic_id(m.path) or "", "+".join(by), f"model: {model} ; {m.dataset}/{m.split}: {m.path}"] for m, by in trained]
    if output is OutputFormat.json:
        typer.echo(json.dumps(_leaks_summary(report, model, record, trained), indent=2))
    elif output is OutputFormat.csv:
        print_csv(["isic_id", "by", "files"], rows)
    else:
        pairs = report.pair_counts()
        print_table("Images shared between datasets", ["datasets", "shared images"],
                    [[f"{a} + {b}", str(n)] for (a, b), n in sorted(pairs.items())])
        excluded: dict[str, int] = {}
        for member in report.excluded:
            excluded[member.dataset] = excluded.get(member.dataset, 0) + 1
        print_table("Training images left out (leaking into an evaluation split)",
                    ["dataset", "images"], [[name, str(excluded.get(name, 0))] for name in roots])
        if record is not None:
            counts: dict[tuple[str, str], int] = {}
            for member, _ in trained:
                counts[(member.dataset, member.split)] = counts.get((member.dataset, member.split), 0) + 1
            print_table(f"Images the model file trained on ({len(record)} recorded)", ["dataset", "split", "images"],
                        [[name, split, str(counts.get((name, split), 0))] for name in roots for split in cleaned[name]])
            if not record.complete:
                say(f"warning: {model} records the training images of only some of its training runs, so more of "
                    f"these images may have been trained on")
