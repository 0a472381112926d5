"""The prediction API: every input type, head selection, thresholds, temperature, TTA, streaming."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import mvit
from bad_images import truncated_jpeg
from conftest import tiny_model
from datasets_factory import write_image
from mvit.core import model_file
from mvit.runtime import precision
from mvit.errors import UnknownHeadError
from mvit.infer.predict import ImageResult, Prediction, predict_stream
from mvit.runtime.options import RunOptions
from mvit.data.transforms import eval_transform
from mvit.errors import ConfigError, ImageError


@pytest.fixture(autouse=True)
def auto_means_fp32(monkeypatch):
    """These tests compare with float32 arithmetic, so `auto` must not pick bfloat16 on an AMX CPU."""
    monkeypatch.setattr(precision, "cpu_has_fast_bfloat16", lambda: False)


@pytest.fixture
def images(tmp_path):
    return [write_image(tmp_path / f"lesion{k}.jpg", size=(40 + 8 * k, 32)) for k in range(3)]


def _probabilities(predictions, head):
    return np.array([list(p.probabilities.values()) for p in predictions if p.head == head])


def _logits(model, path, head):
    pixels = eval_transform(model.preprocessing)(Image.open(path).convert("RGB"))[None]  # (1, 3, S, S)
    with torch.no_grad():
        return model(pixels, head)[head][0]  # (K,)


def test_every_input_type_gives_the_same_prediction(model, images):
    path = images[0]
    pixels = np.array(Image.open(path).convert("RGB"))  # (H, W, 3) uint8
    inputs = {
        "str": str(path),
        "path": path,
        "pil": Image.open(path),
        "uint8 array": pixels,
        "float array": pixels.astype(np.float32) / 255,
        "tensor": torch.from_numpy(pixels).permute(2, 0, 1).float() / 255,
    }
    expected = model.predict(path, head="mel")[0]
    for name, value in inputs.items():
        (got,) = model.predict(value, head="mel")
        assert got.label == expected.label, name
        assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-6), name
    assert model.predict(path, head="mel")[0].image == str(path)
    assert model.predict(pixels, head="mel")[0].image == 0  # in-memory images are named by position


def test_batches_of_arrays_and_tensors_are_many_images(model):
    batch = torch.rand(5, 3, 32, 32)
    assert [p.image for p in model.predict(batch, head="mel")] == [0, 1, 2, 3, 4]
    assert len(model.predict(np.zeros((4, 32, 32, 3), np.uint8), head="mel")) == 4


def test_one_pass_for_several_heads_equals_each_head_alone(model, images):
    both = model.predict(images, head=["mel", "three"], batch_size=2)
    assert [(p.image, p.head) for p in both] == [(str(i), h) for i in images for h in ("mel", "three")]
    for head in ("mel", "three"):
        alone = model.predict(images, head=head)
        assert [p.label for p in both if p.head == head] == [p.label for p in alone]
        np.testing.assert_allclose(_probabilities(both, head), _probabilities(alone, head), atol=1e-6)
    assert {p.head for p in model.predict(images[0], head="all")} == {"mel", "three"}
    assert {p.head for p in model.predict(images[0])} == {"mel", "three"}


def test_batch_size_does_not_change_predictions(model, images):
    one = model.predict(images, head="three", batch_size=1)
    many = model.predict(images, head="three", batch_size=8)
    np.testing.assert_allclose(_probabilities(one, "three"), _probabilities(many, "three"), atol=1e-5)


def test_probabilities_are_temperature_scaled_softmax(model, images):
    model.update_head("three", temperature=2.5)
    logits = _logits(model, images[0], "three")
    (got,) = model.predict(images[0], head="three")
    assert list(got.probabilities) == ["a", "b", "c"]
    np.testing.assert_allclose(list(got.probabilities.values()), (logits / 2.5).softmax(-1).numpy(), atol=1e-6)
    assert got.threshold is None and got.label == max(got.probabilities, key=got.probabilities.get)


def test_binary_head_decides_with_its_threshold(model, images):
    predictions = model.predict(images, head="mel")
    assert all(p.threshold == 0.3 for p in predictions)  # conftest stores 0.3
    for p in predictions:
        assert p.label == ("melanoma" if p.probabilities["melanoma"] >= 0.3 else "other")
    # the same image alone (a batch of one may differ from a batch of five in the last float bits)
    p_melanoma = model.predict(images[0], head="mel")[0].probabilities["melanoma"]
    assert model.predict(images[0], head="mel", threshold=p_melanoma)[0].label == "melanoma"  # at the threshold counts
    assert model.predict(images[0], head="mel", threshold=min(1.0, p_melanoma + 1e-4))[0].label == "other"
    model.update_head("mel", threshold=None)
    assert model.predict(images[0], head="mel")[0].threshold == 0.5  # no stored threshold: 0.5


def test_threshold_is_refused_where_it_means_nothing(model, images):
    with pytest.raises(ConfigError, match="binary heads only"):
        model.predict(images[0], head="three", threshold=0.5)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        model.predict(images[0], head="mel", threshold=1.5)
    mixed = model.predict(images[0], head="all", threshold=0.9)  # applies to the binary heads among them
    assert {p.head: p.threshold for p in mixed} == {"mel": 0.9, "three": None}


def test_threshold_and_temperature_round_trip_through_the_model_file(model, images, tmp_path):
    model.update_head("mel", threshold=0.42, temperature=1.7, threshold_target="sensitivity >= 0.9 on valid")
    model.update_head("three", temperature=0.6)
    before = model.predict(images, head="all")
    loaded = mvit.load(model_file.save(model, tmp_path / "m.safetensors"))
    assert loaded.heads["mel"].threshold == 0.42 and loaded.heads["mel"].temperature == 1.7
    assert loaded.heads["three"].temperature == 0.6
    after = loaded.predict(images, head="all")
    assert [(p.label, p.threshold) for p in after] == [(p.label, p.threshold) for p in before]
    for head in ("mel", "three"):
        np.testing.assert_allclose(_probabilities(after, head), _probabilities(before, head), atol=1e-6)


def test_unknown_head_lists_the_heads_and_how_to_train(model, images):
    with pytest.raises(UnknownHeadError, match=r"no head 'ph2' \(it has: mel, three\).*mvit train"):
        model.predict(images[0], head="ph2")


def test_flip_tta_averages_the_four_flips(model, images):
    pixels = eval_transform(model.preprocessing)(Image.open(images[0]).convert("RGB"))[None]  # (1, 3, S, S)
    flips = torch.cat([pixels, pixels.flip(-1), pixels.flip(-2), pixels.flip(-1, -2)])
    with torch.no_grad():
        expected = model(flips, "three")["three"].mean(0).softmax(-1)  # mean logits of the 4 flips
    (got,) = model.predict(images[0], head="three", tta=True)
    np.testing.assert_allclose(list(got.probabilities.values()), expected.numpy(), atol=1e-6)


def test_bf16_stays_close_to_fp32(model, images):
    fp32 = model.predict(images, head="three", precision="fp32")
    bf16 = model.predict(images, head="three", precision="bf16")
    np.testing.assert_allclose(_probabilities(bf16, "three"), _probabilities(fp32, "three"), atol=0.02)
    with pytest.raises(ConfigError, match="unknown precision"):
        model.predict(images[0], head="three", precision="fp8")


def test_auto_precision_is_bf16_only_where_it_is_fast(monkeypatch):
    assert precision.autocast_dtype("auto", torch.device("cpu")) is None
    assert precision.autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_fast_bfloat16", lambda: True)  # a CPU with AMX
    assert precision.autocast_dtype("auto", torch.device("cpu")) is torch.bfloat16
    assert precision.autocast_dtype("fp32", torch.device("cuda")) is None


def test_api_raises_naming_the_bad_input(model, images, tmp_path):
    bad = truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="cut.jpg is damaged or incomplete"):
        model.predict([images[0], bad], head="mel")
    with pytest.raises(ImageError, match="image 1:"):
        model.predict([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 2), np.uint8)], head="mel")


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_reports_bad_files_in_place_and_predicts_the_rest(model, images, tmp_path, workers):
    bad = truncated_jpeg(tmp_path / "cut.jpg")
    files = [images[0], bad, images[1], tmp_path / "missing.jpg", images[2]]
    results = list(predict_stream(model, files, ["mel", "three"], run=RunOptions(batch_size=2, workers=workers)))
    assert [r.image for r in results] == [str(f) for f in files]  # input order, failures included
    assert [r.error is None for r in results] == [True, False, True, False, True]
    assert "damaged or incomplete" in results[1].error and "does not exist" in results[3].error
    good = [p for r in results for p in r.predictions]
    np.testing.assert_allclose(
        _probabilities(good, "three"), _probabilities(model.predict(images, head="three"), "three"), atol=1e-6
    )
    assert all(isinstance(r, ImageResult) for r in results)


def test_prediction_is_a_typed_frozen_record_that_serialises(model, images):
    (p,) = model.predict(images[0], head="mel")
    assert isinstance(p, Prediction) and isinstance(p, mvit.Prediction)
    decided = p.label
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'label'"):
        p.label = "other" if decided == "melanoma" else "melanoma"
    assert p.label == decided
    record = json.loads(json.dumps(p.as_dict()))
    assert record == {"image": str(images[0]), "head": "mel", "label": p.label, "probability": pytest.approx(p.probability),
                      "probabilities": pytest.approx(dict(p.probabilities)), "threshold": 0.3,
                      "ood_score": None, "in_distribution": None}
    assert p.probability == p.probabilities[p.label]


def test_predict_leaves_a_model_in_eval_mode_and_dropout_off(images):
    model = tiny_model().train()  # "three" has dropout: a training-mode model would be random
    first = model.predict(images, head="three")
    assert not model.training
    assert _probabilities(model.predict(images, head="three"), "three") == pytest.approx(_probabilities(first, "three"))
