"""`mvit evaluate` and `mvit calibrate`: measure a head on a dataset split, fit the out-of-distribution gate."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from mvit.cli.common import PRECISION_HELP, PrecisionChoice, check_writable, device_option, load_model, model_option, site_option
from mvit.cli.output import print_table, say, show
from mvit.errors import MvitError


def evaluate_command(
    head: str = typer.Option(..., "--head", "-H", help="head to evaluate"),
    root: Optional[Path] = typer.Option(None, "--root", help="the folder of the dataset evaluated"),
    folder: Optional[Path] = typer.Option(None, "--folder", help="your own folder of class sub-folders, or CSV of image,label[,group], labelled with the head's class names: read without a plugin, as the head's dataset (so the split the model recorded applies)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="installed dataset to evaluate on (default: the head's own); its labels are matched with the head's classes through mvit's diagnosis vocabulary"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for metrics.json, predictions.csv and the figures (created)"),
    model_file: Optional[Path] = model_option(),
    split: str = typer.Option("test", "--split", help="split to evaluate on (test, valid, train), or all for every image of the dataset"),
    fold: Optional[int] = typer.Option(None, "--fold", help="cross-validation fold the model held out (default: as recorded in the model file)"),
    precision: PrecisionChoice = typer.Option(PrecisionChoice.auto, "--precision", help=PRECISION_HELP),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    device: str = device_option(),
    site: Optional[str] = site_option(),
) -> None:
    """Evaluate one head on a split of its dataset, or of any dataset whose labels match its classes; write the report."""
    from mvit.runtime.distributed import Processes, local_device, quiet_unless_rank_zero
    from mvit.runtime.options import RunOptions
    from mvit.evaluate.report import ALL_IMAGES, evaluate_head, leak_sentence, split_settings
    from mvit.registry import manager

    quiet_unless_rank_zero()  # under torchrun rank 0 alone prints and writes
    check_writable(out, "--out", folder=True)
    model = load_model(model_file, local_device(device), site)
    with _evaluated_registry(model, head, folder, root, dataset):
        processes = Processes.from_environment(model.device.type)
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
        with processes:  # a clean run leaves the process group here, after the last exchange (see Processes.close)
            metrics = evaluate_head(model, head, folder or root, out, dataset=dataset, split=split, splits=settings,
                                    run=RunOptions(precision.value, batch_size, processes=processes))
        if not processes.main:  # its share of the images is in rank 0's report
            return
        for message in metrics["unreadable"]:
            say(f"warning: left out: {message}")
        leaked = leak_sentence(metrics)
        for note in metrics["notes"]:
            say(f"{'warning' if note == leaked else 'note'}: {note}")
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
        print_table(f"{head}{f' (site {site})' if site else ''} on {where} ({count})", columns, rows)
        if gate is not None:
            show(f"out-of-distribution gate ({gate['method']}): accepted {gate['accepted']} of {metrics['n']} images "
                 f"({gate['accepted_fraction']:.1%}); the last column is measured on those")
        show(f"report written to {out}")


def _evaluated_registry(model, head: str, folder: Optional[Path], root: Optional[Path], dataset: Optional[str]):
    """The registry `evaluate` looks the head and its dataset up in: the installed plugins', or with
    --folder a registry of your own folder alone, as the head's dataset (named as the model recorded
    it, so the split it recorded applies, and with the head's classes and positive class)."""
    import contextlib

    from mvit.datasets.folder import recorded
    from mvit.registry import manager

    if folder is None:
        if root is None:
            raise MvitError("give --root DIR (the head's dataset folder) or --folder PATH (your own folder or CSV)")
        return contextlib.nullcontext()
    if root is not None or dataset is not None:
        raise MvitError("--folder is the dataset evaluated, in place of --root and --dataset: leave those out")
    info = model.heads[model.select_heads(head)[0]]
    # alone, so that a head trained on an installed plugin's dataset can be scored on your folder too
    return manager.temporary_plugins(recorded(info.dataset, folder, [info]), entry_points=False)


def _register_own_folders(model, roots: dict[str, Path]) -> None:
    """Each --dataset no plugin offers but the model was trained on from your own folder or CSV
    (`[datasets.folder]`), made a dataset of this process from its --root and the model's head."""
    from mvit.datasets import folder
    from mvit.registry import manager

    installed = manager.registry().datasets
    own = [folder.recorded(name, root, model.heads.values()) for name, root in roots.items() if name not in installed]
    folder.register(*[dataset for dataset in own if dataset is not None])


class GateMethod(str, Enum):
    knn = "knn"
    mahalanobis = "mahalanobis"


def calibrate_command(
    datasets: list[str] = typer.Option(..., "--dataset", "-d", help="dataset the model was trained on; repeat for several, each with its --root"),
    roots: list[Path] = typer.Option(..., "--root", help="the folder of each --dataset, in the same order"),
    output_file: Path = typer.Option(..., "--output", "-o", help="model file to write (the input is left as it is unless this names it)"),
    model_file: Optional[Path] = typer.Option(None, "--model", "-m", help="model file to add the gate to (default: the model bundled with mvit)"),
    # the defaults are mvit.evaluate.gate.DEFAULT_METHOD, DEFAULT_LAYER, DEFAULT_ACCEPT and DEFAULT_K, written out so `mvit --help` need not import torch
    method: GateMethod = typer.Option(GateMethod.mahalanobis, "--method", help="mahalanobis: distance from the training features' mean; knn: distance to the k-th nearest training image"),
    layer: str = typer.Option("middle", "--layer", help="feature the gate reads: middle (mean patch token halfway up the backbone), pooled (the heads' feature) or a block number"),
    accept: float = typer.Option(0.95, "--accept", help="fraction of validation images the gate lets through; it sets the threshold"),
    k: int = typer.Option(10, "--k", min=1, help="knn: which nearest neighbour's distance is the score"),
    precision: PrecisionChoice = typer.Option(PrecisionChoice.auto, "--precision", help=PRECISION_HELP),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="decoding processes (default: by image count and CPUs)"),
    device: str = device_option(),
    cache: Optional[Path] = typer.Option(None, "--cache", help="HDF5 feature cache to keep the features in, so calibrating again (another --method or --accept) skips the backbone"),
) -> None:
    """Fit an out-of-distribution gate onto a trained model, without retraining: training images make the reference, the validation split sets the threshold."""
    from mvit.runtime.files import written_aside
    from mvit.evaluate.gate import calibration_paths, fit_gate
    from mvit.core import model_file as model_files
    from mvit.core.gate import resolve_layer
    from mvit.evaluate.gate import GateRecipe, check_options
    from mvit.runtime.options import RunOptions

    check_options(method.value, accept, k)
    check_writable(output_file, "--output", folder=False)
    if len(datasets) != len(roots):
        raise MvitError(f"give one --root per --dataset (got {len(datasets)} datasets and {len(roots)} roots), in the same order")
    if len(set(datasets)) != len(datasets):
        raise MvitError(f"each dataset once, please: {', '.join(datasets)}")
    source = model_file if model_file is not None else model_files.bundled_model_path()
    model = load_model(source, device)
    block = resolve_layer(model.backbone, layer)
    _register_own_folders(model, dict(zip(datasets, roots)))
    train_paths, valid_paths = calibration_paths(model, dict(zip(datasets, roots)))
    if model.ood_gate is not None:
        say(f"replacing the model's {model.ood_gate.method} gate")
    gate = fit_gate(model, train_paths, valid_paths, GateRecipe(method.value, accept, k, block), datasets=datasets, cache=cache,
                    run=RunOptions(precision.value, batch_size, workers, say))
    model.ood_gate = gate
    with written_aside(output_file) as partial:  # an interrupted save leaves no temporary file, and the input whole
        model_files.save(model, partial, half=model_files.stored_as_half(source))  # as small as the input was
    info = gate.info
    rows = [["method", info.method], *([["k", str(info.k)]] if info.k else []),
            ["feature", "pooled class token" if info.layer is None else f"mean patch token after block {info.layer}"],
            ["threshold", f"{info.threshold:.4g}"],
            ["accepts (validation)", f"{info.quantile:.3g}"], ["training images", str(info.train_images)],
            ["validation images", str(info.valid_images)], ["datasets", ", ".join(info.datasets)]]
    print_table("Out-of-distribution gate", ["", "value"], rows)
    show(f"model with the gate written to {output_file}")
