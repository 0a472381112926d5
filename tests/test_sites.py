"""Site profiles: `mvit adapt` fits a clinic's own heads from its labelled images, the model file keeps
them beside the base heads, and every way of predicting answers the same with `site=`.

The model is a tiny frozen random backbone whose `dermmel` head was fitted in closed form on discs
of two colours, red melanomas and blue naevi; the clinic's melanomas are blue and its naevi red
(its images look like the training images, its lesions do not), so the base head is wrong there
and a site head has something to learn."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import mvit
from clirun import call_mvit
from training_data import make_learnable_dermmel, paint, tiny_run_config

FROZEN = {"unfreeze": {"mode": "none"}, "augmentation": {"enabled": False}}
SITE = "clinic-a"


def clinic(folder: Path, colours: tuple[int, int], per_class: int = 12, labels: tuple[str, str] = ("melanoma", "nevus")) -> Path:
    """`folder/labels.csv` over `per_class` painted images of each label, paths relative to the CSV."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for label, colour in zip(labels, colours):
        for k in range(per_class):
            name = f"images/{label}-{k}.png"
            paint(folder / name, colour, format="PNG")
            rows.append([name, label])
    return write_labels(folder / "labels.csv", rows)


def write_labels(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows([["image", "label"], *rows])
    return path


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    from mvit.train.trainer import train

    folder = tmp_path_factory.mktemp("base")
    root = make_learnable_dermmel(folder / "data", per_class_train=16, per_class_eval=8)
    return train(tiny_run_config(root, folder / "run", FROZEN))


@pytest.fixture(scope="module")
def adapted(base_model, tmp_path_factory) -> dict:
    """The base model with site `clinic-a`, fitted from blue melanomas and red naevi."""
    folder = tmp_path_factory.mktemp("clinic")
    labels = clinic(folder, colours=(1, 0))
    out = folder / "adapted.safetensors"
    done = _adapt(base_model, labels, out, folder / "cache.h5")
    assert done.code == 0, done.stderr
    return {"model": out, "labels": labels, "images": sorted((folder / "images").glob("*.png")), "stdout": done.stdout,
            "stderr": done.stderr}


def _adapt(model: Path, labels: Path, out: Path, cache: Path, *extra: str):
    import _pytest.capture  # noqa: F401  (call_mvit takes the fixtures; this runs it with fresh ones)

    # the tiny model's gate, fitted on 34 images, flags many of any clinic's: the tests look at them
    # (except the one about a photograph) and say so with --include-flagged
    flagged = [] if "--refuse-flagged" in extra else ["--include-flagged"]
    extra = tuple(arg for arg in extra if arg != "--refuse-flagged")
    return _call(["adapt", "-m", str(model), "--site", SITE, "--labels", str(labels), "-o", str(out), "--cache", str(cache),
                  "--device", "cpu", *flagged, *extra])


def _call(args: list[str]):
    """The CLI in this process, outside a test's capsys (module fixtures have none)."""
    import contextlib
    import io
    import sys

    from mvit.cli.app import main
    from mvit.registry import manager

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["mvit", *args]
    manager.reset()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = argv
        manager.reset()
    from clirun import Result

    return Result(code, out.getvalue(), err.getvalue())


# ---- what adapt writes ------------------------------------------------------------------------------


def test_adapt_keeps_a_site_head_that_cross_validation_shows_better(adapted):
    model = mvit.load(adapted["model"])
    assert list(model.sites) == [SITE]
    site = model.sites[SITE].info
    assert set(site.heads) == {"dermmel"} and site.images == 24
    report = site.report["dermmel"]
    assert report["adopted"] and report["site"]["value"] > report["base"]["value"] >= 0
    assert report["classes"] == {"melanoma": 12, "not_melanoma": 12}
    low, high = report["site"]["ci95"]
    assert 0 <= low <= report["site"]["value"] <= high <= 1
    assert {"threshold", "sensitivity", "specificity"} <= set(report)
    head = site.heads["dermmel"]
    assert head.calibrated and head.threshold == report["threshold"] and "site's cross-validated images" in head.threshold_target
    written = json.loads(adapted["model"].with_name(f"adapted.{SITE}.adapt.json").read_text())
    assert written["heads"]["dermmel"]["site"] == report["site"]
    assert "dermmel" in adapted["stdout"] and "kept" in adapted["stdout"]


def test_a_site_profile_round_trips_through_the_model_file(adapted, tmp_path):
    model = mvit.load(adapted["model"])
    again = mvit.load(mvit.save(model, tmp_path / "again.safetensors"))
    assert again.sites[SITE].info == model.sites[SITE].info
    for name, parameter in model.sites[SITE].classifiers["dermmel"].state_dict().items():
        assert torch.equal(parameter, again.sites[SITE].classifiers["dermmel"].state_dict()[name])
    images = adapted["images"][:6]
    first = model.predict(images, head="dermmel", site=SITE)
    assert first == again.predict(images, head="dermmel", site=SITE)
    assert all(p.site == SITE and p.as_dict()["site"] == SITE for p in first)


def test_a_file_without_sites_predicts_exactly_as_before(adapted, base_model, capsys, monkeypatch):
    """The base heads are untouched by a site: the same probabilities to the bit, and the same CSV bytes."""
    images = adapted["images"][:6]
    before, after = mvit.load(base_model), mvit.load(adapted["model"])
    assert before.sites == {} and before.predict(images) == after.predict(images)
    assert all(p.site is None and "site" not in p.as_dict() for p in after.predict(images))
    outputs = [call_mvit(capsys, monkeypatch, "predict", "-m", str(path), "-f", "csv", "--device", "cpu", *map(str, images))
               for path in (base_model, adapted["model"])]
    assert outputs[0].code == 0 and outputs[0].stdout == outputs[1].stdout
    assert "site" not in outputs[0].stdout.splitlines()[0].split(",")


def test_a_site_answers_differently_from_the_base_heads_and_says_so(adapted, capsys, monkeypatch):
    model = mvit.load(adapted["model"])
    images = adapted["images"]
    base = [p.probabilities["melanoma"] for p in model.predict(images, head="dermmel")]
    site = [p.probabilities["melanoma"] for p in model.predict(images, head="dermmel", site=SITE)]
    assert base != site
    done = call_mvit(capsys, monkeypatch, "predict", "-m", str(adapted["model"]), "--site", SITE, "-H", "dermmel", "-f", "csv",
                     "--device", "cpu", str(images[0]))
    header, row = done.stdout.splitlines()
    assert header.split(",")[:3] == ["image", "head", "site"] and row.split(",")[2] == SITE


def test_the_same_site_gives_the_same_answers_everywhere(adapted, tmp_path, capsys, monkeypatch):
    """API, `mvit predict`, `mvit evaluate`, `mvit attention` (the class its map explains) and `mvit serve`."""
    from mvit.infer.attention import attention_maps

    model = mvit.load(adapted["model"])
    images = adapted["images"][::3]
    api = model.predict(images, head="dermmel", site=SITE)
    cli = call_mvit(capsys, monkeypatch, "predict", "-m", str(adapted["model"]), "--site", SITE, "-H", "dermmel", "-f", "json",
                    "--device", "cpu", *map(str, images))
    assert cli.code == 0, cli.stderr
    records = json.loads(cli.stdout)
    assert [r["site"] for r in records] == [SITE] * len(images)
    for record, prediction in zip(records, api):
        assert record["label"] == prediction.label and record["threshold"] == prediction.threshold
        assert record["probabilities"]["melanoma"] == pytest.approx(prediction.probabilities["melanoma"], abs=1e-6)
    maps = attention_maps(model.with_site(SITE), [Image.open(path) for path in images], "dermmel")
    assert [m.target for m in maps] == [p.label for p in api]
    evaluated = _evaluate_on_clinic(adapted, tmp_path, capsys, monkeypatch)  # image path -> p(melanoma)
    copies = sorted(evaluated)
    for path, prediction in zip(copies, model.predict(copies, head="dermmel", site=SITE)):
        assert evaluated[path] == pytest.approx(prediction.probabilities["melanoma"], abs=1e-5)
    served = _served(adapted["model"], images, tmp_path)
    assert [r["site"] for r in served] == [SITE] * len(images)
    for record, prediction in zip(served, api):
        assert record["label"] == prediction.label
        assert record["probabilities"]["melanoma"] == pytest.approx(prediction.probabilities["melanoma"], abs=1e-5)


def _evaluate_on_clinic(adapted, tmp_path, capsys, monkeypatch) -> dict[str, float]:
    """`mvit evaluate --site` over JPEG copies of the clinic's images laid out as a DermMel test
    split: each copy's p(melanoma) in the report."""
    root = tmp_path / "clinic-dermmel"
    for split in ("train_sep", "valid", "test"):
        for label in ("Melanoma", "NotMelanoma"):
            (root / "DermMel" / split / label).mkdir(parents=True)
    for path in adapted["images"][::3]:
        label = "Melanoma" if path.name.startswith("melanoma") else "NotMelanoma"
        Image.open(path).convert("RGB").save(root / "DermMel" / "test" / label / f"{path.stem}.jpg", quality=95)
    done = call_mvit(capsys, monkeypatch, "evaluate", "-m", str(adapted["model"]), "--site", SITE, "-H", "dermmel",
                     "--root", str(root), "--out", str(tmp_path / "report"), "--device", "cpu", "--split", "test")
    assert done.code == 0, done.stderr
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["site"] == SITE
    return {row["image"]: float(row["p_melanoma"]) for row in csv.DictReader(open(tmp_path / "report" / "predictions.csv"))}


def _served(model: Path, images: list[Path], tmp_path: Path) -> list[dict]:
    pytest.importorskip("fastapi", reason="`mvit serve` needs the serve extra")
    httpx = pytest.importorskip("httpx")
    from serving import start_server

    server = start_server("--model", str(model), log=tmp_path / "server.log")
    try:
        heads = httpx.get(f"{server.url}/v1/heads").json()
        assert heads["sites"] == [{"name": SITE, "images": 24, "heads": ["dermmel"]}]
        files = [("images", (path.name, path.read_bytes(), "image/png")) for path in images]
        response = httpx.post(f"{server.url}/v1/predict", files=files, data={"head": "dermmel", "site": SITE}, timeout=60)
        assert response.status_code == 200, response.text
        unknown = httpx.post(f"{server.url}/v1/predict", files=files[:1], data={"site": "nowhere"}, timeout=60)
        assert unknown.status_code == 422 and "no site 'nowhere'" in unknown.json()["error"]
        return response.json()
    finally:
        server.stop()


def test_a_sites_images_are_judged_against_the_site_too(adapted):
    """The site's own gate widens the training images' gate for that site's view: its images pass
    where the training gate alone flags them, and a flagged image's record says which checks it failed."""
    model = mvit.load(adapted["model"])
    site = model.sites[SITE]
    assert site.gate is not None and site.info.gate.train_images == 24 and site.info.gate.layer == model.ood_gate.info.layer
    assert set(site.info.colour) == {"L", "a", "b"}
    images = adapted["images"]
    alone = model.predict(images, head="dermmel")
    widened = model.predict(images, head="dermmel", site=SITE)
    assert sum(p.in_distribution for p in widened) > sum(p.in_distribution for p in alone)
    assert all(w.in_distribution for a, w in zip(alone, widened) if a.in_distribution)  # a site only widens
    assert all(p.ood_reason is None for p in alone)  # records without a site are as they were
    gate = model.with_site(SITE).ood_gate
    assert gate.reason(gate.threshold) is None and f"site {SITE}" in gate.reason(2 * gate.threshold)
    for prediction in widened:  # an image both gates flag says so in its record
        assert (prediction.ood_reason is None) == prediction.in_distribution
        if prediction.ood_reason is not None:
            assert prediction.as_dict()["ood_reason"] == prediction.ood_reason


def test_info_lists_the_sites_with_their_figures(adapted, capsys, monkeypatch):
    done = call_mvit(capsys, monkeypatch, "info", str(adapted["model"]), "-f", "json")
    assert done.code == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["sites"][SITE]["images"] == 24 and "dermmel" in found["sites"][SITE]["report"]
    assert found["reference"]["heads"] == ["dermmel"]
    table = call_mvit(capsys, monkeypatch, "info", str(adapted["model"]))
    assert SITE in table.stdout and "roc_auc" in table.stdout


def test_an_unknown_site_is_one_sentence(adapted, capsys, monkeypatch):
    done = call_mvit(capsys, monkeypatch, "predict", "-m", str(adapted["model"]), "--site", "clinic-b", "--device", "cpu",
                     str(adapted["images"][0]))
    assert done.code == 2 and done.stderr.count("\n") == 1
    assert "no site 'clinic-b' (it has: clinic-a)" in done.stderr


# ---- what adapt refuses -----------------------------------------------------------------------------


def test_a_site_no_better_than_the_base_heads_is_refused_and_writes_nothing(base_model, tmp_path):
    """The clinic paints its lesions as the training images were painted: the base head is already
    right, so no site head can be better, and no file appears."""
    labels = clinic(tmp_path, colours=(0, 1))
    out = tmp_path / "out.safetensors"
    done = _adapt(base_model, labels, out, tmp_path / "cache.h5")
    assert done.code == 2 and "no profile was written" in done.stderr
    assert done.stderr.count("error") == 1 and "Traceback" not in done.stderr
    assert "NO" in done.stdout  # the table says which heads were not better, and by how much
    assert not out.exists() and not list(tmp_path.glob("*.adapt.json"))


def _photograph(path: Path) -> None:
    """A large bright picture with hard edges: nothing like a lesion under a dermatoscope."""
    image = Image.new("RGB", (160, 120), (250, 250, 250))
    for x in range(0, 160, 20):
        image.paste((0, 0, 0), (x, 0, x + 10, 120))
    image.save(path)


MISTAKES = {
    "no labels file": (lambda folder: folder / "missing.csv", "no labels file at"),
    "missing images": (lambda folder: write_labels(folder / "labels.csv", [["images/melanoma-0.png", "melanoma"],
                                                                           ["images/gone.png", "nevus"]]),
                       "1 image listed in"),
    "unknown labels": (lambda folder: write_labels(folder / "labels.csv", [["images/melanoma-0.png", "melanomma"]]),
                       "unknown label 'melanomma'"),
    "labels no head can use": (lambda folder: write_labels(folder / "labels.csv", [
        [f"images/melanoma-{k}.png", "basal_cell_carcinoma"] for k in range(12)]), "no head of the model can learn"),
    "one class only": (lambda folder: write_labels(folder / "labels.csv", [
        [f"images/melanoma-{k}.png", "melanoma"] for k in range(12)]), "not_melanoma: 0"),
    "three images": (lambda folder: write_labels(folder / "labels.csv", [
        ["images/melanoma-0.png", "melanoma"], ["images/nevus-0.png", "nevus"], ["images/nevus-1.png", "nevus"]]),
        "at least 5 labelled images of each"),
    "no header": (lambda folder: (folder / "labels.csv").write_text("images/melanoma-0.png,melanoma\n") and folder / "labels.csv",
                  "has no image or label column"),
    "another modality": (lambda folder: (_photograph(folder / "images" / "nevus-0.png"), folder / "labels.csv")[1],
                         "look unlike the images the model was trained on (its out-of-distribution gate flags them"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_bad_input_to_adapt_is_one_sentence_and_writes_nothing(mistake, base_model, tmp_path):
    clinic(tmp_path, colours=(1, 0))
    make, says = MISTAKES[mistake]
    labels = make(tmp_path)
    out = tmp_path / "out.safetensors"
    extra = {"one class only": ["-H", "dermmel"], "three images": ["-H", "dermmel"], "another modality": ["--refuse-flagged"]}
    done = _adapt(base_model, labels, out, tmp_path / "cache.h5", *extra.get(mistake, []))
    assert done.code == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("error") == 1
    assert says.format(folder=tmp_path) in done.stderr
    assert not out.exists() and not list(tmp_path.glob("*.adapt.json"))


def test_an_onnx_export_is_one_site_or_the_base_heads(adapted, tmp_path, capsys, monkeypatch):
    """`mvit export --site`: the site's heads and thresholds in the graph and its metadata, checked
    against mvit; the graph's gate is the training images' (the site's gate widens it in mvit only)."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'mvit[onnx]')")
    from mvit.infer.export import read_export_metadata

    out = tmp_path / "clinic.onnx"
    done = call_mvit(capsys, monkeypatch, "export", str(adapted["model"]), "--site", SITE, "-H", "dermmel", "-o", str(out))
    assert done.code == 0, done.stderr
    metadata = read_export_metadata(out)
    site_head = mvit.load(adapted["model"]).with_site(SITE).heads["dermmel"]
    assert metadata["site"] == SITE and metadata["heads"]["dermmel"]["threshold"] == site_head.threshold
    base = tmp_path / "base.onnx"
    assert call_mvit(capsys, monkeypatch, "export", str(adapted["model"]), "-H", "dermmel", "-o", str(base)).code == 0
    assert read_export_metadata(base)["site"] is None
