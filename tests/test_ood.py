"""The out-of-distribution gate: it accepts what it was fitted on, flags what is different, survives
the model file, and reaches predictions, the CLI and `mvit calibrate`."""

import csv
import hashlib
import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import mvit
from clirun import call_mvit
from conftest import tiny_model
from datasets_factory import ham_rows, make_ham10000
from inference_models import plugin_heads_model, saved_model
from mvit.runtime.options import RunOptions
from mvit.core import model_file
from mvit.core.model_file import read_metadata
from mvit.evaluate.gate import calibration_paths, fit_gate, pooled_features
from mvit.core.gate import METHODS
from mvit.evaluate.gate import GateRecipe, fit_gate_on_features
from mvit.infer.predict import UNKNOWN
from mvit.errors import ConfigError, ModelFileError
from mvit.datasets.splits import samples_for

# ---- generated images: "lesions" (skin with a brown blob) and things that are not ---------------


def lesion(seed, size=(40, 30)) -> Image.Image:
    rng = random.Random(f"lesion {seed}")
    w, h = size
    image = Image.new("RGB", size, tuple(int(c + rng.uniform(-20, 20)) for c in (205, 160, 135)))
    rx, ry = rng.uniform(0.15, 0.35) * w, rng.uniform(0.15, 0.35) * h
    cx, cy = w / 2 + rng.uniform(-4, 4), h / 2 + rng.uniform(-3, 3)
    brown = tuple(int(c + rng.uniform(-25, 25)) for c in (110, 70, 50))
    ImageDraw.Draw(image).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=brown)
    noisy = np.asarray(image, dtype=float) + np.random.default_rng(rng.randrange(1 << 30)).normal(0, 8, (h, w, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def screenshot(seed, size=(40, 30)) -> Image.Image:
    """Black text on white: nothing like skin."""
    rng = random.Random(f"text {seed}")
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for y in range(2, size[1], 8):
        draw.text((rng.randint(0, 4), y), "".join(rng.choice("abcdefgh ") for _ in range(8)), fill=(0, 0, 0))
    return image


def lesions(prefix, n):
    return [lesion(f"{prefix}{i}") for i in range(n)]


@pytest.fixture(scope="module")
def gated_models():
    """method -> a plugin-heads model with a gate fitted on generated lesions (150 train, 100 valid),
    reading the default feature (the middle block: block 1 of the tiny 2-block backbone); and
    "<method> pooled" -> the same reading the pooled class token."""
    models = {}
    for method in METHODS:
        for layer, name in (("middle", method), ("pooled", f"{method} pooled")):
            model = plugin_heads_model()
            model.ood_gate = fit_gate(model, lesions("train", 150), lesions("valid", 100), GateRecipe(method=method, layer=layer), datasets=["toy"])
            models[name] = model
    assert models["knn"].ood_gate.info.layer == 1 and models["knn pooled"].ood_gate.info.layer is None
    return models

ALL_GATES = [*METHODS, *(f"{method} pooled" for method in METHODS)]


# ---- the scores on features ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_threshold_accepts_the_asked_fraction_of_held_out_features_and_flags_far_ones(method):
    generator = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.5, 2.0, 16)  # an anisotropic cloud, as real features are
    train, valid, held_out = (torch.randn(n, 16, generator=generator) * scale + 3.0 for n in (2000, 400, 4000))
    gate = fit_gate_on_features(train, valid, method=method, accept=0.9)
    assert gate.info.valid_images == 400 and gate.info.train_images == 2000 and gate.info.quantile == 0.9
    assert (gate.score(valid) <= gate.threshold).float().mean() >= 0.9  # by construction on the validation split
    assert 0.86 <= gate.accepts(gate.score(held_out)).float().mean() <= 0.94  # and about that on unseen data
    far = torch.randn(200, 16, generator=generator) * scale + 3.0
    far[:, :8] *= -1  # mirrored in half the directions: another direction (knn sees angles only) and far away
    assert not gate.accepts(gate.score(far)).any()


def test_knn_score_is_the_cosine_distance_to_the_kth_neighbour():
    bank_points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    gate = fit_gate_on_features(bank_points, bank_points, method="knn", k=2)
    query = torch.tensor([[2.0, 0.0]])  # normalised: (1, 0); neighbours at distance 0, 1, 2
    assert gate.score(query).item() == pytest.approx(1.0)
    assert gate.info.k == 2


def test_mahalanobis_score_matches_numpy():
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(500, 4, generator=generator) @ torch.tensor([[2.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 3]])
    gate = fit_gate_on_features(train, train[:50], method="mahalanobis")
    from sklearn.covariance import LedoitWolf

    estimate = LedoitWolf().fit(train.double().numpy())
    x = np.array([[1.0, -2.0, 0.5, 4.0]])
    expected = np.sqrt(estimate.mahalanobis(x))  # sklearn gives the squared distance
    assert gate.score(torch.tensor(x, dtype=torch.float32)).item() == pytest.approx(expected[0], rel=1e-4)


def test_the_tap_is_the_mean_patch_token_after_its_block_in_the_same_pass():
    model = tiny_model()
    images = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():  # the in-place inference path
        pooled, tapped = model.backbone.forward_with_tap(images, 1)
        assert torch.allclose(pooled, model.backbone(images), atol=1e-6)
    with torch.no_grad():
        x, _ = model.backbone.blocks[0](model.backbone.embed(images))  # (3, T, D) after block 1
    assert torch.allclose(tapped, x[:, 1:].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="block 1 to 1"):
        model.backbone.forward_with_tap(images, 2)  # the last block computes the class token only


def test_layer_names():
    from mvit.core.gate import resolve_layer
    from mvit.core.vit import VisionTransformer, named_config

    deit = VisionTransformer(named_config("deit_tiny_patch16_224"))  # 12 blocks
    assert [resolve_layer(deit, layer) for layer in ("middle", "pooled", None, 3, "11")] == [6, None, None, 3, 11]
    for wrong in (0, 12, "top"):
        with pytest.raises(ConfigError):
            resolve_layer(deit, wrong)


def test_options_are_checked():
    features = torch.randn(10, 4)
    with pytest.raises(ConfigError, match="unknown out-of-distribution method"):
        fit_gate_on_features(features, features, method="energy")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        fit_gate_on_features(features, features, accept=95)


# ---- images, end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_GATES)
def test_gate_on_images_accepts_held_out_lesions_and_flags_screenshots(gated_models, method):
    model = gated_models[method]
    held_out = [p for p in model.predict(lesions("test", 200), head="dermmel")]
    accepted = np.mean([p.in_distribution for p in held_out])
    assert 0.88 <= accepted <= 0.995, accepted
    flagged = model.predict([screenshot(i) for i in range(40)], head="dermmel")
    assert not any(p.in_distribution for p in flagged)
    assert min(p.ood_score for p in flagged) > model.ood_gate.threshold


@pytest.mark.parametrize("method", ["knn", "mahalanobis pooled"])
def test_every_head_of_an_image_carries_the_same_verdict_and_tta_does_not_change_it(gated_models, method):
    model = gated_models[method]
    images = [*lesions("test", 3), screenshot(0)]
    plain = model.predict(images, head=["dermmel", "ham10000"])
    flipped = model.predict(images, head=["dermmel", "ham10000"], tta=True)
    for a, b in zip(plain[::2], plain[1::2]):
        assert a.image == b.image and a.ood_score == b.ood_score and a.in_distribution == b.in_distribution
    # the gate scores the un-flipped image, so its verdict is the same with flip TTA
    assert [p.ood_score for p in flipped] == pytest.approx([p.ood_score for p in plain], rel=1e-5)  # batch of 4x the size
    assert [p.in_distribution for p in flipped] == [p.in_distribution for p in plain]
    features, _, _ = pooled_features(model, images, layer=model.ood_gate.info.layer)
    assert [p.ood_score for p in plain[::2]] == pytest.approx(model.ood_gate.score(features).tolist(), abs=1e-6)


def test_abstain_labels_flagged_images_unknown_on_every_head_and_keeps_probabilities(gated_models):
    model = gated_models["knn"]
    images = [lesion("test0"), screenshot(1)]
    normal = model.predict(images, head=["dermmel", "ham10000"])
    abstained = model.predict(images, head=["dermmel", "ham10000"], abstain=True)
    for before, after in zip(normal, abstained):
        assert after.probabilities == before.probabilities
        if before.in_distribution:
            assert after.label == before.label != UNKNOWN
        else:
            assert after.label == UNKNOWN and after.probability is None
    assert [p.label for p in abstained[2:]] == [UNKNOWN, UNKNOWN]  # the screenshot, on both heads


def test_abstain_needs_a_gate():
    with pytest.raises(ConfigError, match="mvit calibrate"):
        plugin_heads_model().predict(lesion(0), abstain=True)


# ---- the model file ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_GATES)
def test_round_trip_keeps_the_gate_and_its_scores_exactly(gated_models, method, tmp_path):
    model = gated_models[method]
    path = model_file.save(model, tmp_path / "gated.safetensors", half=True)
    loaded = mvit.load(path)
    assert loaded.ood_gate is not None and loaded.ood_gate.info == model.ood_gate.info
    assert read_metadata(path).ood_gate.datasets == ["toy"]
    images = [*lesions("test", 5), screenshot(2)]
    before = model.predict(images, head="dermmel", precision="fp32")
    # half=True: the backbone is float16 in the file, so compare the gate on the same features
    features, _, _ = pooled_features(loaded, images, layer=loaded.ood_gate.info.layer, precision="fp32")
    assert torch.equal(loaded.ood_gate.score(features), model.ood_gate.score(features))
    full = mvit.load(model_file.save(model, tmp_path / "full.safetensors"))
    again = full.predict(images, head="dermmel", precision="fp32")
    assert [p.ood_score for p in again] == [p.ood_score for p in before]
    assert [p.in_distribution for p in again] == [p.in_distribution for p in before]


def test_the_knn_bank_is_stored_as_float16_under_the_ood_prefix(gated_models, tmp_path):
    from safetensors import safe_open

    path = model_file.save(gated_models["knn"], tmp_path / "gated.safetensors")
    with safe_open(str(path), framework="pt") as file:
        gate_names = [name for name in file.keys() if name.startswith("ood.")]
        assert gate_names == ["ood.bank"]
        assert file.get_tensor("ood.bank").dtype == torch.float16
        assert file.get_tensor("ood.bank").shape == (150, 48)


def test_gate_tensors_stay_out_of_the_state_dict(gated_models):
    """Training checkpoints and the feature cache's fingerprint read state_dict(): a gate must not change it."""
    gated = gated_models["mahalanobis"]
    assert gated.state_dict().keys() == plugin_heads_model().state_dict().keys()
    copy = plugin_heads_model()
    copy.load_state_dict(gated.state_dict())  # strict: no unexpected keys
    assert copy.ood_gate is None


def test_a_model_file_without_a_gate_loads_unchanged_and_predicts_null_fields(tmp_path, capsys, monkeypatch):
    path = saved_model(tmp_path)
    meta = json.loads(_header(path)["__metadata__"]["mvit"])
    assert "ood_gate" in meta and meta["ood_gate"] is None
    del meta["ood_gate"]  # as files written before the gate existed
    _rewrite_metadata(path, meta)
    model = mvit.load(path)
    assert model.ood_gate is None
    (p,) = model.predict(lesion(0), head="dermmel")
    assert p.ood_score is None and p.in_distribution is None and p.probability == p.probabilities[p.label]
    image = lesion(0)
    image.save(tmp_path / "a.png")
    done = call_mvit(capsys, monkeypatch, "predict", "-m", str(path), "-H", "dermmel", "-f", "json", str(tmp_path / "a.png"))
    assert done.code == 0, done.stderr
    (record,) = json.loads(done.stdout)
    assert record["ood_score"] is None and record["in_distribution"] is None
    done = call_mvit(capsys, monkeypatch, "predict", "-m", str(path), "-H", "dermmel", "-f", "csv", str(tmp_path / "a.png"))
    (row,) = csv.DictReader(io.StringIO(done.stdout))
    assert row["ood_score"] == "" and row["in_distribution"] == ""
    done = call_mvit(capsys, monkeypatch, "predict", "-m", str(path), "--abstain", str(tmp_path / "a.png"))
    assert done.code == 2 and "mvit calibrate" in done.stderr and "Traceback" not in done.stderr


def test_a_damaged_gate_is_a_clear_error(gated_models, tmp_path):
    path = model_file.save(gated_models["knn"], tmp_path / "gated.safetensors")
    meta = json.loads(_header(path)["__metadata__"]["mvit"])
    meta["ood_gate"]["method"] = "mahalanobis"  # its tensors are a knn bank
    _rewrite_metadata(path, meta)
    with pytest.raises(ModelFileError, match="out-of-distribution gate"):
        mvit.load(path)


def _header(path):
    import struct

    with open(path, "rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        return json.loads(file.read(size))


def _rewrite_metadata(path, meta):
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"mvit": json.dumps(meta)})


# ---- the command line ---------------------------------------------------------------------------


@pytest.fixture
def gated_file(gated_models, tmp_path):
    return model_file.save(gated_models["knn"], tmp_path / "gated.safetensors")


@pytest.fixture
def mixed_images(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    lesion("test0").save(folder / "a_lesion.png")
    screenshot(3).save(folder / "b_screenshot.png")
    return folder


def test_predict_json_csv_and_table_show_the_verdict(capsys, monkeypatch, gated_file, mixed_images, tmp_path):
    args = ["predict", "-m", str(gated_file), "-H", "dermmel", "-H", "ham10000", str(mixed_images)]
    records = json.loads(call_mvit(capsys, monkeypatch, *args, "-f", "json").stdout)
    api = mvit.load(gated_file).predict(sorted(mixed_images.iterdir()), head=["dermmel", "ham10000"])
    assert [(r["ood_score"], r["in_distribution"]) for r in records] == [
        (pytest.approx(p.ood_score), p.in_distribution) for p in api
    ]
    assert records[-1]["in_distribution"] is False and records[-1]["label"] != UNKNOWN
    rows = list(csv.DictReader(io.StringIO(call_mvit(capsys, monkeypatch, *args, "-f", "csv").stdout)))
    assert [row["in_distribution"] for row in rows] == [str(int(p.in_distribution)) for p in api]
    assert float(rows[-1]["ood_score"]) == pytest.approx(api[-1].ood_score, rel=1e-5)
    monkeypatch.chdir(tmp_path)
    table = call_mvit(capsys, monkeypatch, "predict", "-m", str(gated_file), "-H", "dermmel", "mixed/b_screenshot.png").stdout
    assert "in dist." in table and "NO" in table


def test_predict_abstain_flag_labels_flagged_images_unknown(capsys, monkeypatch, gated_file, mixed_images):
    done = call_mvit(capsys, monkeypatch, "predict", "-m", str(gated_file), "--abstain", "-f", "csv", str(mixed_images))
    assert done.code == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    screenshot_rows = [row for row in rows if row["image"].endswith("b_screenshot.png")]
    assert len(screenshot_rows) == 4  # every head of the model: mel, three, dermmel, ham10000
    assert all(row["label"] == UNKNOWN and row["probability"] == "" and row["in_distribution"] == "0" for row in screenshot_rows)
    lesion_rows = [row for row in rows if row["image"].endswith("a_lesion.png")]
    assert all(row["label"] != UNKNOWN for row in lesion_rows if row["in_distribution"] == "1")


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_calibrate_writes_a_gated_model_and_leaves_the_input_alone(capsys, monkeypatch, tmp_path):
    source = model_file.save(plugin_heads_model(), tmp_path / "model.safetensors", half=True,
                    provenance={"splits": {"ham10000": {"seed": 3}}})
    root = make_ham10000(tmp_path / "ham", ham_rows(per_class=8, images_per_lesion=1))
    before = _sha256(source)
    out = tmp_path / "out" / "gated.safetensors"
    done = call_mvit(capsys, monkeypatch, "calibrate", "-m", str(source), "--dataset", "ham10000", "--root", str(root),
                     "--output", str(out), "--method", "mahalanobis", "--accept", "0.9", "--device", "cpu")
    assert done.code == 0, done.stderr
    assert _sha256(source) == before and mvit.load(source).ood_gate is None
    gated = mvit.load(out)
    info = gated.ood_gate.info
    # the split the model file recorded (seed 3), as `mvit evaluate` reproduces it
    train, valid = (samples_for("ham10000", root, split, seed=3) for split in ("train", "valid"))
    assert (info.method, info.quantile, info.datasets, info.layer) == ("mahalanobis", 0.9, ["ham10000"], 1)  # middle of 2 blocks
    assert model_file.stored_as_half(out)  # as small as the input
    assert (info.train_images, info.valid_images) == (len(train), len(valid))
    # the same heads and weights, plus the gate; the threshold accepts 90 % of the validation split
    original = mvit.load(source)
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, gated.state_dict()[name]), name
    scores = [p.ood_score for p in gated.predict([s.path for s in valid], head="dermmel")]
    assert np.mean(np.array(scores) <= info.threshold) >= 0.9
    assert "threshold" in done.stdout and str(out) in done.stdout


def test_calibration_uses_the_splits_the_model_recorded(tmp_path):
    model = plugin_heads_model()
    model.provenance = {"splits": {"ham10000": {"seed": 3}}}
    root = make_ham10000(tmp_path / "ham", ham_rows(per_class=4, images_per_lesion=1))
    train_paths, valid_paths = calibration_paths(model, {"ham10000": root})
    assert train_paths == [s.path for s in samples_for("ham10000", root, "train", seed=3)]
    assert valid_paths == [s.path for s in samples_for("ham10000", root, "valid", seed=3)]
    assert train_paths != [s.path for s in samples_for("ham10000", root, "train", seed=0)]  # the seed mattered


def test_calibration_keeps_images_shared_with_another_dataset_out_of_the_bank(tmp_path):
    """DermMel is built from HAM10000 images: one dataset's validation image must not sit in the bank."""
    from datasets_factory import make_dermmel

    model = plugin_heads_model()
    ham = make_ham10000(tmp_path / "ham", ham_rows(per_class=4, images_per_lesion=1))
    dermmel = make_dermmel(tmp_path / "dermmel", augmented=2)
    train_paths, valid_paths = calibration_paths(model, {"ham10000": ham, "dermmel": dermmel})
    ids = lambda paths: {p.stem for p in paths}
    evaluation = {s.path.stem for name, root in (("ham10000", ham), ("dermmel", dermmel))
                  for split in ("valid", "test") for s in samples_for(name, root, split)}
    assert evaluation and not ids(train_paths) & evaluation
    assert not any(p.name.startswith("AUG_") for p in train_paths)  # augmented copies are not real images
    assert ids(valid_paths) <= evaluation


@pytest.mark.parametrize(
    "args, says",
    [
        (["--dataset", "ham10000", "--dataset", "dermmel", "--root", "X"], "one --root per --dataset"),
        (["--dataset", "ham10000", "--root", "X", "--accept", "1.5"], "between 0 and 1"),
    ],
)
def test_calibrate_mistakes_are_one_sentence(capsys, monkeypatch, tmp_path, args, says):
    source = saved_model(tmp_path)
    done = call_mvit(capsys, monkeypatch, "calibrate", "-m", str(source), "-o", str(tmp_path / "o.safetensors"), *args)
    assert done.code == 2 and says in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_evaluate_reports_the_accepted_fraction_and_the_metrics_on_accepted_images(capsys, monkeypatch, gated_models, tmp_path):
    from datasets_factory import make_dermmel
    from mvit.core.gate import OODGate

    counts = {"train_sep": {"Melanoma": 1, "NotMelanoma": 1}, "valid": {"Melanoma": 1, "NotMelanoma": 1},
              "test": {"Melanoma": 6, "NotMelanoma": 6}}
    root = make_dermmel(tmp_path / "data", counts, augmented=0)
    model = plugin_heads_model()  # the backbone the gate was fitted with
    gate = gated_models["knn"].ood_gate
    features, _, _ = pooled_features(model, [s.path for s in samples_for("dermmel", root, "test")], layer=gate.info.layer)
    threshold = float(gate.score(features).median())  # about half the test images pass
    model.ood_gate = OODGate(gate.info.model_copy(update={"threshold": threshold}), gate.tensors)
    path = model_file.save(model, tmp_path / "gated.safetensors")
    done = call_mvit(capsys, monkeypatch, "evaluate", "-m", str(path), "-H", "dermmel", "--root", str(root),
                     "--out", str(tmp_path / "out"), "--device", "cpu")
    assert done.code == 0, done.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    accepted = [row for row in rows if row["in_distribution"] == "1"]
    assert 0 < len(accepted) < len(rows) == m["n"] == 12
    assert (m["ood"]["method"], m["ood"]["threshold"]) == ("knn", threshold)
    assert m["ood"]["accepted"] == len(accepted) and m["ood"]["accepted_fraction"] == len(accepted) / 12
    on_accepted = m["ood"]["metrics_on_accepted"]
    assert on_accepted["n"] == len(accepted)
    assert on_accepted["accuracy"] == pytest.approx(np.mean([row["correct"] == "1" for row in accepted]))
    assert all(float(row["ood_score"]) <= threshold * (1 + 1e-5) for row in accepted)
    assert "on accepted" in done.stdout and f"accepted {len(accepted)} of 12 images" in done.stdout
    # without a gate the report has no such entry
    from mvit.evaluate.report import evaluate_head

    assert "ood" not in evaluate_head(plugin_heads_model(), "dermmel", root, tmp_path / "plain", run=RunOptions(workers=0))
    assert "ood_score" not in (tmp_path / "plain" / "predictions.csv").read_text().splitlines()[0]


def test_fitting_through_the_feature_cache_gives_the_same_gate_and_reuses_the_features(tmp_path, monkeypatch):
    model = plugin_heads_model()
    train, valid = [], []
    for name, n, into in (("train", 30, train), ("valid", 12, valid)):
        for i in range(n):
            into.append(tmp_path / f"{name}{i}.png")
            lesion(f"{name}{i}").save(into[-1])
    for layer in ("pooled", "middle"):  # both kinds of feature in one cache file, under keys of their own
        direct = fit_gate(model, train, valid, GateRecipe(method="knn", layer=layer))
        cached = fit_gate(model, train, valid, GateRecipe(method="knn", layer=layer), cache=tmp_path / "features.h5")
        assert cached.info == direct.info.model_copy(update={"threshold": cached.threshold})
        assert cached.threshold == pytest.approx(direct.threshold, abs=1e-6)
        assert torch.allclose(cached.tensors["bank"], direct.tensors["bank"], atol=1e-3)  # float16 rounding of equal features

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran although every feature is cached")

    monkeypatch.setattr(model.backbone, "forward", no_backbone)
    again = fit_gate(model, train, valid, GateRecipe(method="mahalanobis", accept=0.9), cache=tmp_path / "features.h5")
    assert again.method == "mahalanobis" and again.info.train_images == 30
