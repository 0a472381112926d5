"""`mvit export --format onnx`: the ONNX graph gives mvit's probabilities, for any batch size and head subset.

The images are preprocessed by the Python code in docs/prediction.md ("Export to ONNX"), the code a
user runs without mvit, so the documentation is tested too: its preprocessing must equal mvit's
`eval_transform`, and its probabilities and labels must equal `model.predict`'s.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'mvit[onnx]')")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'mvit[onnx]')")

from clirun import call_mvit  # noqa: E402
from conftest import SHARED_DATA, TINY, tiny_model  # noqa: E402
from mvit.core.preprocessing import Preprocessing  # noqa: E402
from mvit.data.transforms import eval_transform  # noqa: E402
from mvit.core import model_file  # noqa: E402
from mvit.infer.export import GATE_OUTPUT, METADATA_KEY, check_export, export_onnx, read_export_metadata  # noqa: E402
from mvit.core.heads import HeadInfo  # noqa: E402
from mvit.infer.model import Model, load  # noqa: E402
from mvit.evaluate.gate import fit_gate_on_features  # noqa: E402
from mvit.core.vit import VisionTransformer  # noqa: E402
from mvit.registry.specs import HeadConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = SHARED_DATA
TOLERANCE = 1e-4  # max |p_onnx - p_torch| per head, as the issue asks


def documented_code() -> dict:
    """The functions of the Python block in docs/prediction.md's "Export to ONNX" section."""
    text = (ROOT / "docs" / "prediction.md").read_text()
    section = text.split("## Export to ONNX", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"__name__": "documented"}
    exec(compile(block, "docs/prediction.md", "exec"), namespace)
    return namespace


DOC = documented_code()


def write_images(folder: Path, sizes=((40, 30), (30, 45), (37, 37), (61, 29), (33, 50))) -> list[Path]:
    """Lesion-like images of awkward sizes (odd, portrait, landscape: the resize and crop rounding
    matter), as JPEG and PNG."""
    rng = np.random.default_rng(7)
    paths = []
    for k, (width, height) in enumerate(sizes):
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        blob = np.exp(-(((x - width / 2) ** 2 + (y - height / 2) ** 2) / (2 * (min(width, height) / 4) ** 2)))[..., None]
        tint = rng.uniform(0.6, 1.0, 3)  # a different illuminant per image, for colour constancy
        pixels = (np.array([220, 170, 150]) * tint * (1 - blob) + np.array([80, 45, 30]) * blob + rng.normal(0, 8, (height, width, 3)))
        path = folder / f"lesion_{k}.{'jpg' if k % 2 else 'png'}"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def spread(model: Model, seed: int) -> Model:
    """Random weights large enough that probabilities are far from uniform (default init gives ~equal logits)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15)
    return model


def tiny_gated_model(variant: str) -> Model:
    """The conftest tiny heads (binary with threshold 0.3, three-class with a hidden layer) with
    temperatures, on a preprocessing and gate that differ by variant."""
    if variant == "crop+colour+knn":
        pre = Preprocessing(image_size=32, crop_fraction=0.875, color_constancy="shades_of_gray")
    else:  # "squash+mahalanobis"
        pre = Preprocessing(image_size=32, resize="squash", interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.3, 0.2))
    torch.manual_seed(0)
    model = Model(VisionTransformer(TINY), pre)
    model.add_head(HeadInfo(name="mel", dataset="toy", classes=("melanoma", "other"), positive="melanoma", threshold=0.3, temperature=1.7))
    model.add_head(HeadInfo(name="three", dataset="toy", classes=("a", "b", "c"), config=HeadConfig(hidden=[16]), temperature=0.6))
    spread(model.eval(), seed=1)
    features = torch.randn(64, TINY.width, generator=torch.Generator().manual_seed(2))
    method, layer = ("knn", 1) if variant == "crop+colour+knn" else ("mahalanobis", None)
    model.ood_gate = fit_gate_on_features(features[:48], features[48:], method=method, k=3, layer=layer)
    return model


def onnx_outputs(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session, _ = DOC["load"](str(path))
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": images})))


def assert_matches_mvit(model: Model, onnx_file: Path, paths: list[Path], heads: list[str]) -> float:
    """The documented preprocessing equals mvit's; the graph's probabilities equal `model.predict`'s
    within TOLERANCE for every head, and the documented labels equal mvit's. Returns the worst difference."""
    session, meta = DOC["load"](str(onnx_file))
    transform = eval_transform(model.preprocessing)
    for path in paths:
        ours = DOC["preprocess"](path, meta["preprocessing"])
        with Image.open(path) as image:
            theirs = transform(image.convert("RGB")).numpy()
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    documented = DOC["predict"](session, meta, [str(p) for p in paths])
    predictions = model.predict(paths, head=heads)
    worst = 0.0
    for prediction in predictions:
        row = paths.index(prediction.image) if prediction.image in paths else [str(p) for p in paths].index(str(prediction.image))
        mine = documented[row][prediction.head]
        difference = max(abs(mine["probabilities"][c] - p) for c, p in prediction.probabilities.items())
        assert difference <= TOLERANCE, (prediction.head, difference)
        worst = max(worst, difference)
        values = sorted(prediction.probabilities.values())
        margin = abs(values[-1] - prediction.threshold) if prediction.threshold is not None else values[-1] - values[-2]
        if margin > TOLERANCE:  # (a probability within 1e-4 of the threshold, or of a tie, may tip either way)
            assert mine["label"] == prediction.label
        if "ood_score" in documented[row]:
            assert documented[row]["ood_score"] == pytest.approx(prediction.ood_score, rel=1e-4, abs=1e-4)
            if abs(prediction.ood_score - model.ood_gate.threshold) > 1e-3:
                assert documented[row]["in_distribution"] == prediction.in_distribution
    return worst


# ---- a tiny random model -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["crop+colour+knn", "squash+mahalanobis"])
def test_tiny_model_gives_mvits_probabilities_through_the_documented_code(tmp_path, variant):
    model = tiny_gated_model(variant)
    exported = export_onnx(model, tmp_path / "tiny.onnx")
    assert exported.outputs == ["probabilities.mel", "probabilities.three", GATE_OUTPUT]
    paths = write_images(tmp_path)
    assert_matches_mvit(model, exported.path, paths, ["mel", "three"])
    # the probabilities are not trivially uniform: the comparison above had something to compare
    outputs = onnx_outputs(exported.path, np.stack([DOC["preprocess"](p, read_export_metadata(exported.path)["preprocessing"]) for p in paths]))
    assert outputs["probabilities.three"].max() > 0.5


def test_the_batch_axis_is_dynamic_and_rows_do_not_mix(tmp_path):
    model = tiny_gated_model("crop+colour+knn")
    exported = export_onnx(model, tmp_path / "tiny.onnx", logits=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    together = onnx_outputs(exported.path, images.numpy())
    for size in (1, 3):
        differences = check_export(model, exported, images[:size])
        assert max(differences.values()) <= TOLERANCE * 10, differences  # logits and gate scores too
    for row in range(3):  # one image alone gives what it gave in a batch of three
        alone = onnx_outputs(exported.path, images[row : row + 1].numpy())
        for name, value in alone.items():
            assert value.shape[0] == 1
            np.testing.assert_allclose(value[0], together[name][row], atol=1e-5)


def test_a_head_subset_exports_only_those_heads_and_their_metadata(tmp_path):
    model = tiny_gated_model("squash+mahalanobis")
    exported = export_onnx(model, tmp_path / "three.onnx", ["three"], gate=False, logits=True)
    assert exported.outputs == ["probabilities.three", "logits.three"]
    session, meta = DOC["load"](str(exported.path))
    assert [o.name for o in session.get_outputs()] == exported.outputs
    assert list(meta["heads"]) == ["three"] and meta["ood_gate"] is None
    paths = write_images(tmp_path)
    assert_matches_mvit(model, exported.path, paths, ["three"])


def test_the_metadata_says_how_to_prepare_the_input_and_read_the_outputs(tmp_path):
    model = tiny_gated_model("crop+colour+knn")
    exported = export_onnx(model, tmp_path / "tiny.onnx", sidecar=True)
    meta = read_export_metadata(exported.path)
    assert json.loads(exported.sidecar.read_text()) == meta == exported.metadata
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY]) == meta
    assert session.get_inputs()[0].name == "images"
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32] and isinstance(session.get_inputs()[0].shape[0], str)
    pre = meta["preprocessing"]
    assert pre == {**model.preprocessing.model_dump(mode="json"), "resize_shorter_side": 37, "steps": pre["steps"]}
    assert meta["heads"]["mel"] == {
        **meta["heads"]["mel"],
        "output": "probabilities.mel", "classes": ["melanoma", "other"], "positive": "melanoma", "threshold": 0.3, "temperature": 1.7,
    }
    assert meta["heads"]["three"]["positive"] is None and meta["heads"]["three"]["threshold"] is None
    assert meta["heads"]["three"]["classes"] == ["a", "b", "c"] and meta["heads"]["three"]["temperature"] == 0.6
    assert meta["ood_gate"]["output"] == GATE_OUTPUT and meta["ood_gate"]["threshold"] == model.ood_gate.threshold
    assert meta["ood_gate"]["method"] == "knn" and meta["ood_gate"]["layer"] == 1


# ---- the bundled model, and real images ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    model = load()
    return model, export_onnx(model, tmp_path_factory.mktemp("bundled") / "bundled.onnx")


def test_the_bundled_model_exports_every_head_and_its_gate(bundled, tmp_path):
    model, exported = bundled
    assert exported.outputs == [*(f"probabilities.{h}" for h in model.heads), GATE_OUTPUT]
    assert read_export_metadata(exported.path)["heads"]["dermmel"]["threshold"] == model.heads["dermmel"].threshold
    worst = assert_matches_mvit(model, exported.path, write_images(tmp_path, sizes=((300, 225), (225, 300), (161, 149))), list(model.heads))
    assert worst <= TOLERANCE


def real_images(count_per_folder: int = 4) -> list[Path]:
    folders = [DATA / "dermmel" / "DermMel" / "test", DATA / "ham10000", DATA / "ph2"]
    found = []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".bmp"))
        found += files[:: max(1, len(files) // count_per_folder)][:count_per_folder]
    return found


@pytest.mark.real_data
@pytest.mark.skipif(not (DATA / "README.md").is_file(), reason=f"the real-data folder {DATA} is absent")
def test_the_bundled_model_agrees_with_mvit_on_real_images(bundled):
    model, exported = bundled
    paths = real_images()
    assert len(paths) >= 9  # DermMel and HAM10000 JPEGs (300 x 225 and 600 x 450), PH2 BMPs
    assert assert_matches_mvit(model, exported.path, paths, list(model.heads)) <= TOLERANCE


# ---- the command line ---------------------------------------------------------------------------------


def test_the_command_writes_a_checked_file(capsys, monkeypatch, tmp_path):
    source = model_file.save(tiny_gated_model("squash+mahalanobis"), tmp_path / "tiny.safetensors")
    done = call_mvit(capsys, monkeypatch, "export", str(source), "--format", "onnx", "-H", "mel", "--sidecar")
    assert done.code == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "tiny.onnx")
    assert "checked with onnxruntime" in done.stderr and (tmp_path / "tiny.onnx.json").is_file()
    assert list(read_export_metadata(tmp_path / "tiny.onnx")["heads"]) == ["mel"]


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["--format", "tflite"], "'tflite' is not one of 'onnx'"),
        (["-H", "nope"], "has no head 'nope'"),
        (["-o", "{source}"], "would overwrite the model file"),
    ],
)
def test_a_mistake_is_one_sentence(capsys, monkeypatch, tmp_path, arguments, words):
    source = model_file.save(tiny_model(), tmp_path / "tiny.safetensors")
    arguments = [a.replace("{source}", str(source)) for a in arguments]
    done = call_mvit(capsys, monkeypatch, "export", str(source), *arguments)
    assert done.code == 2
    assert done.stderr.startswith("error: ") and words in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "tiny.onnx").exists()


def test_without_the_onnx_extra_the_command_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    source = model_file.save(tiny_model(), tmp_path / "tiny.safetensors")
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError, as when it is not installed
    done = call_mvit(capsys, monkeypatch, "export", str(source))
    assert done.code == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "needs the onnx package" in done.stderr and "pip install 'mvit[onnx]'" in done.stderr
    assert not (tmp_path / "tiny.onnx").exists()
