"""The model bundled with mvit loads without arguments, has its five heads and predicts sensibly."""

import numpy as np
import pytest

import mvit
from conftest import SHARED_DATA
from training_data import paint

HEADS = {"dermmel", "ham10000", "ham10000-mel", "ph2", "ph2-mel"}


@pytest.fixture(scope="module")
def bundled():
    return mvit.load()


def test_bundled_model_has_the_five_heads(bundled):
    assert set(bundled.heads) == HEADS
    assert bundled.heads["ham10000"].classes == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    for name in ("dermmel", "ham10000-mel", "ph2-mel"):
        info = bundled.heads[name]
        assert info.positive == "melanoma" and 0 < info.threshold < 1 and info.threshold_target
    assert all(info.temperature > 0 for info in bundled.heads.values())


def test_bundled_model_predicts_probabilities_for_every_head(bundled, tmp_path):
    image = tmp_path / "lesion.jpg"
    paint(image, 0, size=160)
    predictions = bundled.predict(image, head="all")
    assert {p.head for p in predictions} == HEADS
    for p in predictions:
        values = np.array(list(p.probabilities.values()))
        assert set(p.probabilities) == set(bundled.heads[p.head].classes)
        assert np.all((values >= 0) & (values <= 1)) and abs(values.sum() - 1) < 1e-4
        assert p.label in p.probabilities


def test_bundled_model_records_its_training(bundled):
    training = bundled.provenance["training"]
    # stage 1 (the backbone), stage 2 (PH2's heads), round three (every head refitted in closed form)
    assert [[d["name"] for d in run["config"]["datasets"]] for run in training] == [
        ["ham10000", "dermmel"], ["ph2"], ["ham10000", "dermmel", "ph2"]]
    assert set(bundled.provenance["splits"]) == {"ham10000", "dermmel", "ph2"}
    # round three records what its heads were fitted on, for `mvit adapt`, and each head's penalty
    assert set(bundled.reference.info.heads) == set(bundled.heads)
    assert all(info.l2_strength is not None for info in bundled.heads.values())


def test_the_bundled_gate_flags_a_photograph(bundled):
    from sklearn.datasets import load_sample_images

    assert bundled.ood_gate is not None
    temple = load_sample_images().images[0]  # (427, 640, 3): a photograph of a Chinese temple
    predictions = bundled.predict(temple, head="all", abstain=True)
    assert all(p.in_distribution is False and p.label == "unknown" for p in predictions)
    assert predictions[0].ood_score > bundled.ood_gate.threshold


REAL_LESION = SHARED_DATA / "ham10000" / "HAM10000_images_part_1" / "ISIC_0024306.jpg"


@pytest.mark.real_data
@pytest.mark.skipif(not REAL_LESION.is_file(), reason=f"the real dermoscopic image {REAL_LESION} is absent")
def test_the_bundled_gate_accepts_a_dermoscopic_image(bundled):
    [prediction] = bundled.predict(REAL_LESION, head="dermmel", abstain=True)
    assert prediction.in_distribution is True and prediction.label != "unknown"
    assert prediction.ood_score <= bundled.ood_gate.threshold
