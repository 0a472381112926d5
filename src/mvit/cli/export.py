"""`mvit export`: write a model as one ONNX graph that runs without mvit, and check it against PyTorch."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from mvit.cli.common import check_writable
from mvit.cli.output import say, show
from mvit.errors import MvitError


class ExportFormat(str, Enum):
    onnx = "onnx"


BUNDLED_OUTPUT = "mvit-default.onnx"


def export_command(
    model_file: Optional[Path] = typer.Argument(None, help="model file to export (default: the model bundled with mvit)"),
    format: ExportFormat = typer.Option(ExportFormat.onnx, "--format", "-f", help="onnx: one ONNX graph (needs mvit's onnx extra: onnx and onnxruntime)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="file to write (default: the model file's name with .onnx; mvit-default.onnx for the bundled model)"),
    heads: list[str] = typer.Option(["all"], "--head", "-H", help="head to export as an output; repeat for several; `all` for every head of the model"),
    logits: bool = typer.Option(False, "--logits", help="also output each head's raw logits as logits.<head>"),
    gate: bool = typer.Option(True, "--gate/--no-gate", help="output the out-of-distribution gate's score as ood_score, when the model has a gate"),
    sidecar: bool = typer.Option(False, "--sidecar", help="also write the metadata (preprocessing, classes, thresholds, temperatures) to OUTPUT.json"),
    check: bool = typer.Option(True, "--check/--no-check", help="run the file with onnxruntime and compare it with PyTorch (when onnxruntime is installed)"),
    site: Optional[str] = typer.Option(None, "--site", help="export this site's heads (one export per site; `mvit info` lists a model's sites)"),
) -> None:
    """Export a model to ONNX: input `images`, one output of calibrated probabilities per head; preprocessing, classes, thresholds and temperatures in the file's metadata."""
    from mvit.cli.common import load_model
    from mvit.infer import export

    if output is None:
        output = Path(BUNDLED_OUTPUT) if model_file is None else model_file.with_suffix(".onnx")
    if model_file is not None and output.resolve() == model_file.resolve():
        raise MvitError(f"the export would overwrite the model file {model_file}; choose another --output")
    check_writable(output, "--output", folder=False)
    model = load_model(model_file, "cpu", site)
    names = model.select_heads(heads)  # an unknown head: one sentence, before any work
    exported = export.export_onnx(model, output, names, logits=logits, gate=gate, sidecar=sidecar)
    show(str(exported.path))
    say(f"outputs: {', '.join(exported.outputs)}; metadata in metadata_props[{export.METADATA_KEY!r}]"
        + (f" and {exported.sidecar}" if exported.sidecar else ""))
    if not check:
        return
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        say("not checked against PyTorch: onnxruntime is not installed (`pip install 'mvit[onnx]'`)")
        return
    differences = export.check_export(model, exported)
    worst = max(value for name, value in differences.items() if name.startswith("probabilities."))
    if worst > export.TOLERANCE:
        raise MvitError(
            f"the exported graph's probabilities differ from PyTorch's by up to {worst:.2g} (more than {export.TOLERANCE:g}); "
            f"this is a bug in the export, please report it"
        )
    say(f"checked with onnxruntime: probabilities within {worst:.1e} of PyTorch on 3 random images")
