"""`mvit adapt` (a clinic's own heads from its labelled images) and `mvit info` (what a model file holds)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import typer

from mvit.cli.common import PRECISION_HELP, PrecisionChoice, check_writable, device_option, load_model, model_option
from mvit.cli.output import OutputFormat, print_table, say, show
from mvit.errors import MvitError


def default_cache() -> Path:
    """The user's feature cache: adapting again (another site weight, more labels) recomputes nothing."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mvit" / "features.h5"


def adapt_command(
    labels: Path = typer.Option(..., "--labels", help="CSV with the columns image,label[,group]: paths relative to the CSV; labels are diagnosis words (melanoma, nevus, basal_cell_carcinoma, ...) or a head's class names"),
    site: str = typer.Option(..., "--site", help="name of the site profile (lower case: letters, digits, - and _)"),
    out: Path = typer.Option(..., "--out", "-o", help="model file to write: the model with this site added (the input is left as it is)"),
    model_file: Optional[Path] = model_option(),
    heads: Optional[list[str]] = typer.Option(None, "--head", "-H", help="head to adapt; repeat for several (default: every head the labels give at least 5 images of each class)"),
    site_weight: float = typer.Option(1.0, "--site-weight", help="the site's images' total weight against the base head's training images"),
    sensitivity: float = typer.Option(0.9, "--sensitivity", min=0.01, max=1.0, help="binary heads: the sensitivity the site's threshold is chosen for"),
    folds: int = typer.Option(5, "--folds", min=2, help="cross-validation folds on the site's images (fewer where a class has fewer images)"),
    include_flagged: bool = typer.Option(False, "--include-flagged", help="learn from labelled images the model's out-of-distribution gate flags too (look at them first: a photograph or screenshot would teach the site nonsense)"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="HDF5 feature cache (default: ~/.cache/mvit/features.h5)"),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table for people, json for programs"),
    precision: PrecisionChoice = typer.Option(PrecisionChoice.auto, "--precision", help=PRECISION_HELP),
    device: str = device_option(),
) -> None:
    """Fit a site's own version of the heads from its labelled images; keep it only where cross-validation shows it better."""
    from mvit.runtime.files import written_aside
    from mvit.runtime.options import RunOptions
    from mvit.core import model_file as model_files
    from mvit.registry.labels_file import read_labels_file
    from mvit.registry.specs import NAME_PATTERN
    from mvit.train.adapt import AdaptOptions, adapt

    if not re.match(NAME_PATTERN, site):
        raise MvitError(f"site name {site!r} must be lower case letters, digits, - and _, starting with a letter")
    check_writable(out, "--out", folder=False)
    cache = cache or default_cache()
    check_writable(cache, "--cache", folder=False)
    samples = read_labels_file(labels)  # before the model: a wrong labels file costs nothing
    model = load_model(model_file, device)
    replaced = site in model.sites
    options = AdaptOptions(heads=heads, site_weight=site_weight, target_sensitivity=sensitivity, folds=folds,
                           include_flagged=include_flagged)
    result = adapt(model, site, samples, options, cache=cache, labels=str(labels), run=RunOptions(precision=precision.value, say=say))
    for note in result.notes:
        say(f"note: {note}")
    report = {"site": site, "images": result.images, "heads": {r.name: r.report for r in result.results}}
    if output is OutputFormat.json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(site, result)
    if not result.adopted:
        raise MvitError(f"site {site}: no head did better with the site's images than without them in cross-validation "
                        f"(see the table), so no profile was written; more labelled images may change that")
    for r in result.results:
        if not r.adopted:
            say(f"note: head {r.name} is left out of the site: its site version was not better in cross-validation")
    model_files.save(model, out, half=model_files.stored_as_half(model_file or model_files.bundled_model_path()))
    written = out.with_name(f"{out.stem}.{site}.adapt.json")
    with written_aside(written) as partial:
        partial.write_text(json.dumps(report, indent=2) + "\n")
    show(f"{'replaced' if replaced else 'added'} site {site} ({', '.join(r.name for r in result.adopted)}) in {out}; report: {written}")


def _print_report(site: str, result) -> None:
    rows = []
    for r in result.results:
        f = r.report
        binary = "threshold" in f
        rows.append([r.name, ", ".join(f"{cls} {n}" for cls, n in f["classes"].items()), f"{f['metric']} ({f['folds']}-fold)",
                     _with_interval(f["base"]), _with_interval(f["site"]),
                     f"{f['threshold']:.3g}" if binary else "-",
                     _with_interval(f["sensitivity"]) if binary else "-", _with_interval(f["specificity"]) if binary else "-",
                     "yes" if r.adopted else "NO"])
    print_table(f"Site {site}: {result.images} labelled images, cross-validated", [
        "head", "images", "measure", "base head", "site head", "threshold", "sensitivity", "specificity", "kept"], rows)


def _with_interval(figure: dict) -> str:
    low, high = figure["ci95"]
    return f"{figure['value']:.3f} ({low:.2f}-{high:.2f})"


def info_command(
    model_file: Optional[Path] = typer.Argument(None, help="model file (default: the model bundled with mvit)"),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table for people, json for programs"),
) -> None:
    """What a model file holds: its heads and their operating points, its sites, its gate."""
    model = load_model(model_file, "cpu")
    if output is OutputFormat.json:
        typer.echo(json.dumps({
            "heads": {name: info.model_dump(mode="json") for name, info in model.heads.items()},
            "sites": {name: site.info.model_dump(mode="json") for name, site in model.sites.items()},
            "ood_gate": None if model.ood_gate is None else model.ood_gate.info.model_dump(mode="json"),
            "reference": None if model.reference is None else model.reference.info.model_dump(mode="json"),
        }, indent=2))
        return
    rows = [[name, info.dataset, ", ".join(info.classes), info.positive or "-",
             "-" if info.threshold is None else f"{info.threshold:.3g}", f"{info.temperature:.3g}",
             "yes" if info.calibrated else "no"] for name, info in model.heads.items()]
    print_table("Heads", ["head", "dataset", "classes", "positive", "threshold", "temperature", "calibrated"], rows)
    if model.sites:
        rows = []
        for name, site in model.sites.items():
            for head, figures in site.info.report.items():
                rows.append([name, head, str(figures["images"]), f"{figures['metric']}",
                             _with_interval(figures["base"]), _with_interval(figures["site"]),
                             "yes" if head in site.info.heads else "no"])
        print_table("Sites (cross-validated on each site's images)", ["site", "head", "images", "measure", "base head", "site head", "kept"], rows)
        for name, site in model.sites.items():
            colour = ", ".join(f"{k}* {m:.1f} (sd {sd:.1f})" for k, (m, sd) in site.info.colour.items())
            gate = (f"its own out-of-distribution gate on its {site.info.gate.train_images} images" if site.info.gate
                    else "no gate of its own")
            show(f"site {name}: colour {colour or 'not recorded'}; {gate}")
    else:
        show("sites: none (fit one with `mvit adapt`)")
    if model.ood_gate is not None:
        g = model.ood_gate.info
        show(f"out-of-distribution gate: {g.method} on {g.train_images} training images of {', '.join(g.datasets) or 'its training data'}")
    if model.reference is not None:
        r = model.reference.info
        show(f"reference features: {r.images} training images of {', '.join(r.datasets)} for heads {', '.join(r.heads)} (what `mvit adapt` mixes in)")
