"""The `mvit` command line: parses arguments, calls the API, prints results.

Heavy modules (torch above all) are imported inside the commands that need them, so `mvit --help`
and `mvit plugins` start fast. A user mistake (`MvitError`) is one sentence on stderr and exit 2.
"""

from __future__ import annotations

import contextlib
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from mvit.errors import MvitError
from mvit.nn.precision import PRECISIONS

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


PrecisionChoice = Enum("PrecisionChoice", {name: name for name in PRECISIONS}, type=str)


DEVICE_HELP = "auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N"


def _load_model(model_file: Optional[Path], device: str):
    """The model file given, else the bundled one (a clear error until it exists), on `device`."""
    import torch

    from mvit.infer import model_file as model_files
    from mvit.nn.precision import resolve_device

    try:
        chosen = resolve_device(device)
    except RuntimeError:
        raise MvitError(f"unknown device {device!r}; use {DEVICE_HELP}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise MvitError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return model_files.load(model_file if model_file is not None else model_files.bundled_model_path(), device=chosen)


def _say(message: str) -> None:
    """One plain line on stderr: file names may hold [brackets] that rich would read as markup."""
    stderr.print(message, markup=False, highlight=False, soft_wrap=True)


def _format_of(output: OutputFormat, output_file: Optional[Path]) -> OutputFormat:
    """--output FILE with no --format: the format its suffix names (a table is for the terminal)."""
    if output_file is None or output is not OutputFormat.table:
        return output
    by_suffix = {".json": OutputFormat.json, ".csv": OutputFormat.csv}
    if output_file.suffix.lower() not in by_suffix:
        raise MvitError(f"cannot tell the format of {output_file} from its suffix; add --format json or --format csv")
    return by_suffix[output_file.suffix.lower()]


@app.command("predict")
def predict_command(
    paths: list[str] = typer.Argument(..., help="image files, folders (searched recursively) and globs such as 'lesions/*.jpg'"),
    heads: list[str] = typer.Option(["all"], "--head", "-H", help="head to predict with; repeat for several; `all` for every head of the model"),
    model_file: Optional[Path] = typer.Option(None, "--model", "-m", help="model file (default: the model bundled with mvit)"),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table for people; json or csv (one record per image and head) for programs"),
    output_file: Optional[Path] = typer.Option(None, "--output", "-o", help="write the json or csv here instead of to stdout"),
    tta: bool = typer.Option(False, "--tta", help="average over the four flips of each image (4x the work)"),
    precision: PrecisionChoice = typer.Option(PrecisionChoice.auto, "--precision", help="auto: bfloat16 where the hardware runs it fast (CUDA, CPUs with AMX), else fp32"),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0, help="decision threshold for binary heads instead of the stored one"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="images per backbone pass"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="decoding processes (default: by file count and CPUs)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    abstain: bool = typer.Option(False, "--abstain", help="label `unknown` on every head for an image the model's out-of-distribution gate flags (see `mvit calibrate`)"),
) -> None:
    """Predict images with one or more heads. Files that cannot be read are reported, the rest predicted; exit 1 when any failed."""
    from mvit.data.images import find_image_files
    from mvit.data.dataset import loader_workers
    from mvit.infer.predict import predict_stream
    from mvit.progress import progress_bar

    output = _format_of(output, output_file)
    files = find_image_files(paths)
    if not files:
        raise MvitError(f"no image files in {', '.join(paths)}; pass image files, folders holding .jpg/.png/.bmp/.tif files, or globs")
    model = _load_model(model_file, device)
    names = model.select_heads(heads)
    stream = predict_stream(
        model, files, names, threshold=threshold, tta=tta, precision=precision.value, batch_size=batch_size,
        workers=loader_workers(len(files), batch_size, next(model.parameters()).device) if workers is None else workers,
        abstain=abstain,
    )
    failed = 0
    with (_open_for_writing(output_file) if output_file else contextlib.nullcontext(sys.stdout)) as sink:
        writer = _PredictionWriter(output, sink, {name: model.heads[name].classes for name in names}, gate=model.ood_gate is not None)
        with progress_bar(stderr, disable=not stderr.is_terminal) as progress:
            task = progress.add_task("predicting", total=len(files))
            for result in stream:
                if result.error is not None:
                    failed += 1
                    _say(f"error: {result.error}")
                else:
                    writer.add(result.predictions)
                progress.advance(task)
        writer.close()
    if failed:
        _say(f"{failed} of {len(files)} images could not be read (see above); the other {len(files) - failed} were predicted")
        raise typer.Exit(1)


def _open_for_writing(path: Path):
    try:
        return open(path, "w", newline="")
    except OSError as error:
        raise MvitError(f"cannot write {path}: {error.strerror}; choose another --output") from None


class _PredictionWriter:
    """Writes predictions as they come: json and csv stream record by record; the table waits for all.

    json and csv always carry `ood_score` and `in_distribution` (null / empty without a gate); the
    table gets an `in dist.` column only when the model has a gate.
    """

    def __init__(self, output: OutputFormat, sink, classes: dict[str, tuple[str, ...]], gate: bool = False):
        import csv

        self.output, self.sink, self.gate = output, sink, gate
        self.rows: list[list[str]] = []
        self.first = True
        # one probability column per class name, shared by heads that have the class
        self.classes = list(dict.fromkeys(name for names in classes.values() for name in names))
        if output is OutputFormat.csv:
            self.csv = csv.writer(sink, lineterminator="\n")
            self.csv.writerow(["image", "head", "label", "probability", "threshold", "ood_score", "in_distribution",
                               *(f"p_{name}" for name in self.classes)])
        elif output is OutputFormat.json:
            sink.write("[")

    def add(self, predictions) -> None:
        import json

        if self.output is OutputFormat.table:
            # a row per head, the image named once: stays readable however many heads are asked for
            for k, p in enumerate(predictions):
                row = [str(p.image) if k == 0 else "", p.head, p.label, _number(p.probability, ".3f"), _number(p.threshold, ".3g")]
                if self.gate:
                    row.insert(1, ("yes" if p.in_distribution else "NO") if k == 0 else "")
                self.rows.append(row)
        for p in predictions:
            if self.output is OutputFormat.csv:
                in_distribution = "" if p.in_distribution is None else str(int(p.in_distribution))
                self.csv.writerow([p.image, p.head, p.label, _number(p.probability, ".6f"), _number(p.threshold, ".6g"),
                                   _number(p.ood_score, ".6g"), in_distribution,
                                   *(f"{p.probabilities[c]:.6f}" if c in p.probabilities else "" for c in self.classes)])
            elif self.output is OutputFormat.json:
                self.sink.write(("\n" if self.first else ",\n") + "  " + json.dumps(p.as_dict()))
                self.first = False

    def close(self) -> None:
        if self.output is OutputFormat.json:
            self.sink.write("\n]\n")
        elif self.output is OutputFormat.table and self.rows:
            columns = ["image", "head", "label", "probability", "threshold"]
            if self.gate:
                columns.insert(1, "in dist.")
            _print_table("Predictions", columns, self.rows)


def _number(value: Optional[float], spec: str) -> str:
    """A number for a table or csv cell; empty for None (no threshold, no gate, an abstained label)."""
    return "" if value is None else format(value, spec)


def _unique_stems(files: list[Path]) -> list[str]:
    """A file-name stem per input for the PNGs, made unique when two inputs share a name."""
    seen: dict[str, int] = {}
    stems = []
    for path in files:
        count = seen[path.stem] = seen.get(path.stem, 0) + 1
        stems.append(path.stem if count == 1 else f"{path.stem}-{count}")
    return stems


@app.command("attention")
def attention_command(
    images: list[str] = typer.Argument(..., help="image files, folders and globs"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the PNGs (created)"),
    head: Optional[str] = typer.Option(None, "--head", "-H", help="head whose class-specific (gradient-weighted) map to draw"),
    target: Optional[str] = typer.Option(None, "--class", help="class of --head to explain (default: the head's prediction)"),
    model_file: Optional[Path] = typer.Option(None, "--model", "-m", help="model file (default: the model bundled with mvit)"),
    max_size: int = typer.Option(1024, "--max-size", min=32, help="longest side of the drawn images, in pixels"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Draw where the model looked: last-layer attention, rollout, the class-specific map, and grids per attention head and per layer. Exit 1 when any image failed."""
    from mvit import plots
    from mvit.infer.attention import DEFAULT_BATCH_SIZE, attention_maps
    from mvit.data.images import find_image_files, load_image
    from mvit.errors import ImageError

    files = find_image_files(images)
    if not files:
        raise MvitError(f"no image files in {', '.join(images)}; pass image files, folders holding .jpg/.png/.bmp/.tif files, or globs")
    model = _load_model(model_file, device)
    out.mkdir(parents=True, exist_ok=True)
    stems = _unique_stems(files)
    failed = 0
    for start in range(0, len(files), DEFAULT_BATCH_SIZE):
        decoded = []  # (position, image): a bad file is reported and left out of the batch
        for index in range(start, min(start + DEFAULT_BATCH_SIZE, len(files))):
            try:
                decoded.append((index, load_image(files[index])))
            except ImageError as error:
                failed += 1
                _say(f"error: {error}")
        if not decoded:
            continue
        maps = attention_maps(model, [image for _, image in decoded], head, target=target, max_size=max_size)
        for (index, _), found in zip(decoded, maps):
            for path in plots.attention_figures(found, out, stems[index], title=str(files[index])):
                stdout.print(str(path), markup=False, highlight=False, soft_wrap=True)
    if failed:
        _say(f"{failed} of {len(files)} images could not be read (see above); maps for the others are in {out}")
        raise typer.Exit(1)


@app.command("evaluate")
def evaluate_command(
    head: str = typer.Option(..., "--head", "-H", help="head to evaluate"),
    root: Path = typer.Option(..., "--root", help="the folder of the dataset evaluated"),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="installed dataset to evaluate on (default: the head's own); its labels are matched with the head's classes through mvit's diagnosis vocabulary"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for metrics.json, predictions.csv and the figures (created)"),
    model_file: Optional[Path] = typer.Option(None, "--model", "-m", help="model file (default: the model bundled with mvit)"),
    split: str = typer.Option("test", "--split", help="split to evaluate on (test, valid, train), or all for every image of the dataset"),
    fold: Optional[int] = typer.Option(None, "--fold", help="cross-validation fold the model held out (default: as recorded in the model file)"),
    precision: PrecisionChoice = typer.Option(PrecisionChoice.auto, "--precision", help="auto, fp32 or bf16"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Evaluate one head on a split of its dataset, or of any dataset whose labels match its classes; write the report."""
    from mvit.evaluate.report import ALL_IMAGES, evaluate_head, split_settings
    from mvit.registry import manager

    model = _load_model(model_file, device)
    model.select_heads(head)
    dataset = manager.get_head(head).dataset if dataset is None else manager.get_dataset(dataset).name
    settings = split_settings(model.provenance, dataset)
    if fold is not None and split == ALL_IMAGES:
        raise MvitError(f"--split {ALL_IMAGES} evaluates every image, so a fold means nothing; leave out --fold")
    if fold is not None:
        trained = settings["fold"]
        recorded = dataset in (model.provenance.get("splits") or {})
        if recorded and trained != fold and not manager.get_dataset(dataset).official_splits:
            held = "no fold (it was trained without cross-validation)" if trained is None else f"fold {trained}"
            raise MvitError(f"the model held out {held} of {dataset}, so fold {fold} holds training images; leave out --fold")
        settings["fold"] = fold
    metrics = evaluate_head(
        model, head, root, out, dataset=dataset, split=split, splits=settings, precision=precision.value, batch_size=batch_size
    )
    for message in metrics["unreadable"]:
        _say(f"warning: left out: {message}")
    for note in metrics["notes"]:
        _say(f"note: {note}")
    shown = ["n", "accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "threshold",
             "ece_before_temperature", "ece_after_temperature", "brier"]
    rows = [[key, "n/a" if metrics[key] is None else f"{metrics[key]:.4g}"] for key in shown if key in metrics]
    columns, gate = ["metric", "value"], metrics.get("ood")
    if gate is not None:  # a column of the same metrics on the images the out-of-distribution gate accepts
        accepted = gate["metrics_on_accepted"] or {}
        columns.append("on accepted")
        for row in rows:
            value = accepted.get({"ece_after_temperature": "ece"}.get(row[0], row[0]))
            row.append("n/a" if value is None else f"{value:.4g}")
    where = f"all images of {dataset}" if split == ALL_IMAGES else f"the {split} split of {dataset}"
    unmapped = sum(metrics["left_out"].values())
    count = f"{metrics['n']} images" + (f", {unmapped} left out as unmapped" if unmapped else "")
    _print_table(f"{head} on {where} ({count})", columns, rows)
    if gate is not None:
        stdout.print(f"out-of-distribution gate ({gate['method']}): accepted {gate['accepted']} of {metrics['n']} images "
                     f"({gate['accepted_fraction']:.1%}); the last column is measured on those", markup=False, highlight=False, soft_wrap=True)
    stdout.print(f"report written to {out}", markup=False, highlight=False, soft_wrap=True)


class GateMethod(str, Enum):
    knn = "knn"
    mahalanobis = "mahalanobis"


@app.command("calibrate")
def calibrate_command(
    datasets: list[str] = typer.Option(..., "--dataset", "-d", help="dataset the model was trained on; repeat for several, each with its --root"),
    roots: list[Path] = typer.Option(..., "--root", help="the folder of each --dataset, in the same order"),
    output_file: Path = typer.Option(..., "--output", "-o", help="model file to write (the input is left as it is unless this names it)"),
    model_file: Optional[Path] = typer.Option(None, "--model", "-m", help="model file to add the gate to (default: the model bundled with mvit)"),
    # the defaults are ood.DEFAULT_METHOD, DEFAULT_LAYER, DEFAULT_ACCEPT and DEFAULT_K, written out so `mvit --help` need not import torch
    method: GateMethod = typer.Option(GateMethod.mahalanobis, "--method", help="mahalanobis: distance from the training features' mean; knn: distance to the k-th nearest training image"),
    layer: str = typer.Option("middle", "--layer", help="feature the gate reads: middle (mean patch token halfway up the backbone), pooled (the heads' feature) or a block number"),
    accept: float = typer.Option(0.95, "--accept", help="fraction of validation images the gate lets through; it sets the threshold"),
    k: int = typer.Option(10, "--k", min=1, help="knn: which nearest neighbour's distance is the score"),
    precision: PrecisionChoice = typer.Option(PrecisionChoice.auto, "--precision", help="auto, fp32 or bf16"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="decoding processes (default: by image count and CPUs)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    cache: Optional[Path] = typer.Option(None, "--cache", help="HDF5 feature cache to keep the features in, so calibrating again (another --method or --accept) skips the backbone"),
) -> None:
    """Fit an out-of-distribution gate onto a trained model, without retraining: training images make the reference, the validation split sets the threshold."""
    from mvit.infer import model_file as model_files
    from mvit.evaluate.gate import calibration_paths, fit_gate
    from mvit.infer.ood import check_options, resolve_layer

    check_options(method.value, accept, k)
    if len(datasets) != len(roots):
        raise MvitError(f"give one --root per --dataset (got {len(datasets)} datasets and {len(roots)} roots), in the same order")
    if len(set(datasets)) != len(datasets):
        raise MvitError(f"each dataset once, please: {', '.join(datasets)}")
    source = model_file if model_file is not None else model_files.bundled_model_path()
    model = _load_model(source, device)
    block = resolve_layer(model.backbone, layer)
    train_paths, valid_paths = calibration_paths(model, dict(zip(datasets, roots)))
    if model.ood_gate is not None:
        _say(f"replacing the model's {model.ood_gate.method} gate")
    gate = fit_gate(model, train_paths, valid_paths, method=method.value, accept=accept, k=k, layer=block, datasets=datasets,
                    precision=precision.value, batch_size=batch_size, workers=workers, cache=cache, say=_say)
    model.ood_gate = gate
    model_files.save(model, output_file, half=model_files.stored_as_half(source))  # as small as the input was
    info = gate.info
    rows = [["method", info.method], *([["k", str(info.k)]] if info.k else []),
            ["feature", "pooled class token" if info.layer is None else f"mean patch token after block {info.layer}"],
            ["threshold", f"{info.threshold:.4g}"],
            ["accepts (validation)", f"{info.quantile:.3g}"], ["training images", str(info.train_images)],
            ["validation images", str(info.valid_images)], ["datasets", ", ".join(info.datasets)]]
    _print_table("Out-of-distribution gate", ["", "value"], rows)
    stdout.print(f"model with the gate written to {output_file}", markup=False, highlight=False, soft_wrap=True)


# ---- commands: train, extract (training) ----------------------------------------------------


@app.command("train")
def train_command(
    config: Path = typer.Argument(None, help="Training config (TOML); see configs/ for examples."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this folder where it stopped."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: --set training.epochs=5 (repeatable)."),
    epochs: int = typer.Option(None, help="Shortcut for --set training.epochs=N."),
    output: Path = typer.Option(None, help="Shortcut for --set output=DIR."),
    device: str = typer.Option(None, help="Shortcut for --set training.device=NAME (auto, cpu, cuda, mps)."),
) -> None:
    """Train heads (and fine-tune the backbone) on one or more datasets."""
    from mvit.train import trainer as train
    from mvit.train.config import load_config

    if resume is not None:
        if config is not None:
            raise MvitError("give either a config or --resume RUN, not both")
        train.resume(resume, console=stderr)
        return
    if config is None:
        raise MvitError("give a training config (TOML), or --resume RUN to continue a run")
    overrides = list(set_)
    if epochs is not None:
        overrides.append(f"training.epochs={epochs}")
    if output is not None:
        overrides.append(f'output="{output.absolute()}"')  # relative to where the user is, not the config
    if device is not None:
        overrides.append(f'training.device="{device}"')
    train.train(load_config(config, overrides), console=stderr)


@app.command("extract")
def extract_command(
    config: Path = typer.Argument(..., help="Training config (TOML) whose datasets, backbone and preprocessing to use."),
    cache: Path = typer.Option(None, help="HDF5 feature cache (default: the config's training.feature_cache, else OUTPUT/features.h5)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field (repeatable)."),
) -> None:
    """Fill the HDF5 feature cache with the backbone features of every image of the config's datasets."""
    from mvit.train.config import load_config
    from mvit.train.trainer import extract

    overrides = list(set_) + ([f'training.feature_cache="{cache.absolute()}"'] if cache is not None else [])
    extract(load_config(config, overrides), console=stderr)
