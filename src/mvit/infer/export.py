"""Export a model to one ONNX graph that runs without mvit (onnxruntime, numpy and Pillow suffice).

The graph: input `images`, normalised (N, 3, S, S) float32 with a dynamic batch axis N; outputs
`probabilities.<head>` (N, K) for each chosen head, the head's calibrated probabilities (softmax of
logits / temperature, exactly what `mvit predict` reports); `logits.<head>` (N, K), raw logits, when
asked for; and `ood_score` (N,), the out-of-distribution gate's score of the same backbone pass, when
the model has a gate. An image is in distribution when its score is at most the gate's threshold.

Everything else a user needs to get the same answers as `mvit predict` goes into the ONNX file's
`metadata_props` under the key `mvit`, as one JSON object (`METADATA_KEY`; the optional sidecar is
a copy of it): the preprocessing that turns a file into the input, each head's classes, positive
class, decision threshold and temperature, and the gate's threshold. The metadata travels inside the
one file, so it cannot drift from the graph it describes. docs/prediction.md, "Export to ONNX", shows
how to read it and reproduce the preprocessing with numpy and Pillow.

Over 300 lines because the export and its check belong together: the graph, its metadata, and the
comparison with PyTorch that every export runs before it is trusted.

The exporter is PyTorch's TorchScript-based one (`torch.onnx.export(..., dynamo=False)`): it needs
only the `onnx` package, runs offline, and handles every operation of the backbone. The
torch.export-based exporter (PyTorch's default since 2.9) needs `onnxscript` as well.

The graph is traced through the backbone's out-of-place path (`forward_intermediates(..., in_place=False)`): the
in-place updates its inference path makes under `no_grad` give the same numbers in PyTorch but are
not something a trace should rely on. `check_export` compares the file against PyTorch.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from mvit.runtime.files import written_aside
from mvit.errors import MvitError
from mvit.core.model import Model


METADATA_KEY = "mvit"
METADATA_FORMAT = "mvit-onnx/1"
INPUT_NAME = "images"
GATE_OUTPUT = "ood_score"
OPSET = 17  # LayerNormalization as one operator; onnxruntime >= 1.14 runs it
TOLERANCE = 1e-4  # the largest |probability difference| against PyTorch that `check_export` accepts


def probabilities_output(head: str) -> str:
    return f"probabilities.{head}"


def logits_output(head: str) -> str:
    return f"logits.{head}"


def missing_onnx_sentence(package: str) -> str:
    return f"exporting to ONNX needs the {package} package, which is not installed; install it with `pip install 'mvit[onnx]'`"


class ExportGraph(nn.Module):
    """What the ONNX graph computes: normalised images (N, 3, S, S) -> the outputs named in the
    module's docstring, in the order of `output_names`, from one backbone pass."""

    def __init__(self, model: Model, heads: list[str], *, logits: bool = False, gate: bool = True):
        super().__init__()
        self.backbone = copy.deepcopy(model.backbone).cpu().float().eval()
        self.classifiers = nn.ModuleList(copy.deepcopy(model.classifiers[name]).cpu().float().eval() for name in heads)
        self.temperatures = [float(model.heads[name].temperature) for name in heads]
        self.logits = logits
        # a site's view exports the training images' gate (its site gate widens acceptance in mvit only)
        self.gate = getattr(model.ood_gate, "base", model.ood_gate) if gate else None
        self.gate_layer = None if self.gate is None else self.gate.info.layer
        if self.gate is not None:
            for name, tensor in self.gate.tensors.items():
                self.register_buffer(f"gate_{name}", tensor.detach().cpu().float().clone())
        self.output_names = []
        for name in heads:
            self.output_names.append(probabilities_output(name))
            if logits:
                self.output_names.append(logits_output(name))
        if self.gate is not None:
            self.output_names.append(GATE_OUTPUT)

    def features(self, images: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(pooled class token (N, D), the gate's feature (N, D) or None): the backbone's `forward` and
        `forward_with_tap`, from one out-of-place pass."""
        found = self.backbone.forward_intermediates(images, tap=self.gate_layer, in_place=False)
        pooled, tapped = found.pooled, found.tap
        if self.gate is None:
            return pooled, None
        return pooled, pooled if self.gate_layer is None else tapped

    def gate_score(self, features: Tensor) -> Tensor:
        """The gate's score (N,), as `OODGate.score` computes it (without its chunking)."""
        if self.gate.method == "knn":
            bank = self.gate_bank  # (M, D), L2-normalised
            k = min(self.gate.info.k or 10, bank.shape[0])
            similarity = nn.functional.normalize(features, dim=1) @ bank.T  # (N, M)
            return 1.0 - similarity.topk(k, dim=1).values[:, -1]
        centred = features - self.gate_mean  # (N, D)
        return ((centred @ self.gate_precision) * centred).sum(dim=1).clamp_min(0).sqrt()

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        pooled, looked_at = self.features(images)
        outputs = []
        for head, temperature in zip(self.classifiers, self.temperatures):
            logits = head(pooled)  # (N, K)
            outputs.append((logits / temperature).softmax(dim=-1))
            if self.logits:
                outputs.append(logits)
        if self.gate is not None:
            outputs.append(self.gate_score(looked_at))
        return tuple(outputs)


def export_metadata(model: Model, heads: list[str], *, logits: bool = False, gate: bool = True) -> dict:
    """The JSON object stored in the ONNX file under `METADATA_KEY`: how to prepare the input and read the outputs."""
    from mvit import __version__
    from mvit.infer.prediction import thresholds_for

    pre = model.preprocessing
    thresholds = thresholds_for(model.heads, heads, None)
    described = {}
    for name in heads:
        info = model.heads[name]
        described[name] = {
            "output": probabilities_output(name),
            **({"logits_output": logits_output(name)} if logits else {}),
            "classes": list(info.classes),
            "positive": info.positive if info.is_binary else None,
            "threshold": thresholds[name],  # binary heads: the stored one, 0.5 when none was stored
            "threshold_target": info.threshold_target,
            "temperature": info.temperature,
            "calibrated": info.calibrated,
            "dataset": info.dataset,
            "description": info.description,
            "metrics": dict(info.metrics),
        }
    ood = None
    if gate and model.ood_gate is not None:
        ood = {
            "output": GATE_OUTPUT,
            "threshold": model.ood_gate.threshold,  # the training images' gate, a site's view included
            "rule": "an image is in distribution when ood_score <= threshold; higher = less like the training images",
            **model.ood_gate.info.model_dump(mode="json"),
        }
    return {
        "format": METADATA_FORMAT,
        "mvit_version": __version__,
        "input": {
            "name": INPUT_NAME,
            "shape": ["N", 3, pre.image_size, pre.image_size],
            "dtype": "float32",
            "layout": "NCHW, RGB channels, normalised: (pixel / 255 - mean) / std",
        },
        "preprocessing": {
            **pre.model_dump(mode="json"),
            "resize_shorter_side": round(pre.image_size / pre.crop_fraction) if pre.resize == "crop" else None,
            "steps": _steps(pre),
        },
        "decision": "a head with a positive class predicts it when its probability is at least the head's threshold, "
        "any other head its most probable class",
        "heads": described,
        # the site profile whose heads these are (one export per site: `mvit export --site`); None: the base heads
        "site": model.site,
        "ood_gate": ood,
    }


def _steps(pre) -> list[str]:
    steps = ["decode as 8-bit RGB"]
    if pre.color_constancy == "shades_of_gray":
        steps.append(f"shades-of-grey colour constancy with p = {pre.color_constancy_power}, rounded back to 8 bits")
    if pre.resize == "crop":
        steps += [
            f"resize (Pillow, {pre.interpolation}) so the shorter side is {round(pre.image_size / pre.crop_fraction)} px, "
            "the longer side scaled in proportion and truncated to an integer",
            f"centre crop to {pre.image_size} x {pre.image_size}",
        ]
    else:
        steps.append(f"resize (Pillow, {pre.interpolation}) to {pre.image_size} x {pre.image_size}")
    steps.append("divide by 255, subtract mean, divide by std, per channel; channels first")
    return steps


@dataclass(frozen=True)
class Exported:
    """What `export_onnx` wrote."""

    path: Path
    outputs: list[str]
    metadata: dict
    sidecar: Optional[Path] = None


def export_onnx(
    model: Model,
    path: Union[str, Path],
    heads: Union[None, str, Iterable[str]] = None,
    *,
    logits: bool = False,
    gate: bool = True,
    sidecar: bool = False,
    opset: int = OPSET,
) -> Exported:
    """Write `model` with `heads` (default: all) to `path` as one ONNX graph, atomically.

    logits: add each head's raw logits as `logits.<head>`. gate: add the out-of-distribution gate's
    score as `ood_score` (when the model has a gate). sidecar: also write the metadata JSON to
    `<path>.json`. Needs the `onnx` package (`pip install 'mvit[onnx]'`).
    """
    try:
        import onnx
    except ImportError:
        raise MvitError(missing_onnx_sentence("onnx")) from None

    names = model.select_heads(heads)
    graph = ExportGraph(model, names, logits=logits, gate=gate)
    metadata = export_metadata(model, names, logits=logits, gate=gate)
    size = model.preprocessing.image_size
    example = torch.zeros(2, 3, size, size)  # batch 2: no size-1 dimension for the trace to take as fixed
    path = Path(path)
    with written_aside(path) as partial:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation notice and trace warnings
            torch.onnx.export(
                graph,
                (example,),
                str(partial),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=graph.output_names,
                dynamic_axes={name: {0: "N"} for name in [INPUT_NAME, *graph.output_names]},
                opset_version=opset,
                do_constant_folding=True,
            )
        proto = onnx.load(str(partial))
        proto.producer_name = "mvit"
        from mvit import __version__

        proto.producer_version = __version__
        proto.doc_string = (
            f"mvit model: input {INPUT_NAME} (N, 3, {size}, {size}) float32, normalised; outputs {', '.join(graph.output_names)}. "
            f"Preprocessing, classes, thresholds and temperatures: metadata_props[{METADATA_KEY!r}] (JSON)."
        )
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(partial))
    written = None
    if sidecar:
        written = path.with_name(path.name + ".json")
        with written_aside(written) as partial:
            partial.write_text(json.dumps(metadata, indent=2) + "\n")
    return Exported(path, graph.output_names, metadata, written)


def read_export_metadata(path: Union[str, Path]) -> dict:
    """The mvit metadata of an exported ONNX file (with onnxruntime alone, the same is
    `json.loads(session.get_modelmeta().custom_metadata_map["mvit"])`)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    raise MvitError(f"{path} holds no mvit metadata; was it written by `mvit export`?")


def onnx_session(path: Union[str, Path], threads: Optional[int] = None):
    """An onnxruntime CPU session for an exported file."""
    try:
        import onnxruntime
    except ImportError:
        raise MvitError(missing_onnx_sentence("onnxruntime")) from None
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_outputs(model: Model, images: Tensor, heads: list[str], *, logits: bool = False, gate: bool = True) -> dict[str, Tensor]:
    """What `mvit predict` computes for normalised images (N, 3, S, S) in fp32, under the export's output names."""
    from mvit.infer.predict import forward_images
    from mvit.infer.prediction import calibrated

    model.eval()
    device = model.device
    found, scores = forward_images(model, images.to(device), heads, tta=False, dtype=None)
    outputs: dict[str, Tensor] = {}
    for name in heads:
        outputs[probabilities_output(name)] = calibrated(found[name], model.heads[name])
        if logits:
            outputs[logits_output(name)] = found[name]
    if gate and scores is not None:
        base = getattr(model.ood_gate, "base", None)  # a site's view: the graph holds the training images' gate
        if base is not None:
            with torch.inference_mode():
                scores = base.score(base.features(model.backbone, images.to(device))[1].float()).cpu()
        outputs[GATE_OUTPUT] = scores
    return outputs


def check_export(model: Model, exported: Exported, images: Optional[Tensor] = None) -> dict[str, float]:
    """Max |onnxruntime - PyTorch| of each output on `images` (default: 3 seeded random normalised
    images): the probabilities are what `TOLERANCE` bounds; logits and gate scores are reported too."""
    import numpy as np

    heads = list(exported.metadata["heads"])
    logits = any("logits_output" in head for head in exported.metadata["heads"].values())
    if images is None:
        size = model.preprocessing.image_size
        images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    session = onnx_session(exported.path)
    got = dict(zip(exported.outputs, session.run(exported.outputs, {INPUT_NAME: images.numpy().astype(np.float32)})))
    want = torch_outputs(model, images, heads, logits=logits, gate=GATE_OUTPUT in exported.outputs)
    return {name: float(np.abs(got[name] - want[name].numpy()).max()) for name in exported.outputs}
