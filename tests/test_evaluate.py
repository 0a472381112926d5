"""Metrics against scikit-learn on known predictions, the operating point, temperature, the report."""

import csv
import json

import numpy as np
import pytest
import torch
from sklearn import metrics as sk

from datasets_factory import make_dermmel, make_ham10000, truncate
from inference_models import plugin_heads_model
from mvit.runtime.options import RunOptions
from mvit.evaluate.calibration import choose_threshold, fit_temperature
from mvit.evaluate.evaluation_set import split_settings
from mvit.evaluate.metrics import classification_metrics, expected_calibration_error
from mvit.evaluate.report import evaluate_head
from mvit.datasets.splits import samples_for

# a known binary prediction set: P(melanoma) for 10 images, 4 of them melanoma
P_MEL = np.array([0.95, 0.80, 0.55, 0.30, 0.62, 0.40, 0.20, 0.10, 0.05, 0.35])
IS_MEL = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
BINARY = np.stack([P_MEL, 1 - P_MEL], axis=1)  # classes (melanoma, not_melanoma)
TARGETS = np.where(IS_MEL == 1, 0, 1)


def test_binary_metrics_at_the_threshold_match_scikit_learn():
    m = classification_metrics(BINARY, TARGETS, ["melanoma", "not_melanoma"], positive="melanoma", threshold=0.35)
    predicted = np.where(P_MEL >= 0.35, 0, 1)  # flags 0.95 .80 .55 .62 .40 .35
    assert m["threshold"] == 0.35
    assert m["sensitivity"] == 3 / 4 and m["specificity"] == 3 / 6  # by hand: misses 0.30; flags 0.62, 0.40, 0.35
    assert m["sensitivity"] == sk.recall_score(TARGETS, predicted, pos_label=0)
    assert m["accuracy"] == sk.accuracy_score(TARGETS, predicted) == 0.6
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(TARGETS, predicted))
    assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(IS_MEL, P_MEL))
    assert m["brier"] == pytest.approx(sk.brier_score_loss(IS_MEL, P_MEL)) == pytest.approx(np.mean((P_MEL - IS_MEL) ** 2))
    assert m["confusion_matrix"] == sk.confusion_matrix(TARGETS, predicted).tolist() == [[3, 1], [3, 3]]
    precision, recall, f1, support = sk.precision_recall_fscore_support(TARGETS, predicted)
    assert m["per_class"]["melanoma"] == pytest.approx({"precision": precision[0], "recall": recall[0], "f1": f1[0], "support": 4})
    assert m["macro_f1"] == pytest.approx(sk.f1_score(TARGETS, predicted, average="macro"))
    json.dumps(m)  # JSON-ready


def test_binary_head_without_a_threshold_uses_one_half():
    m = classification_metrics(BINARY, TARGETS, ["melanoma", "not_melanoma"], positive="melanoma")
    assert m["threshold"] == 0.5 and m["sensitivity"] == 3 / 4 and m["specificity"] == 5 / 6


def test_multiclass_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    targets = np.tile(np.arange(4), 15)  # (60,)
    logits = rng.normal(size=(60, 4)) + 1.5 * np.eye(4)[targets]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    predicted = probabilities.argmax(1)
    m = classification_metrics(probabilities, targets, ["a", "b", "c", "d"])
    assert "sensitivity" not in m and "threshold" not in m
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(targets, predicted))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(targets, predicted))
    assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(targets, probabilities, multi_class="ovr", average="macro"))
    assert m["brier"] == pytest.approx(np.mean(np.sum((probabilities - np.eye(4)[targets]) ** 2, axis=1)))
    assert m["confusion_matrix"] == sk.confusion_matrix(targets, predicted).tolist()
    assert m["per_class"]["c"]["f1"] == pytest.approx(sk.f1_score(targets, predicted, average=None)[2])


def test_roc_auc_is_none_when_a_class_is_missing():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    assert classification_metrics(probabilities, np.array([0, 0, 1]), ["a", "b", "c"])["roc_auc"] is None


def test_expected_calibration_error_by_hand():
    # all at confidence 0.8 with half right: one bin, |0.5 - 0.8| = 0.3
    probabilities = np.array([[0.8, 0.2]] * 4)
    assert expected_calibration_error(probabilities, np.array([0, 0, 1, 1])) == pytest.approx(0.3)
    # two bins: 0.9 (2 of 2 right) and 0.6 (1 of 2 right): (2 * 0.1 + 2 * 0.1) / 4
    probabilities = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    assert expected_calibration_error(probabilities, np.array([0, 1, 0, 0])) == pytest.approx(0.1)


def test_choose_threshold_is_the_highest_that_meets_the_sensitivity_target():
    # the melanomas' probabilities: 0.95 0.80 0.55 0.30
    assert choose_threshold(P_MEL, IS_MEL, 0.75) == 0.55  # 3 of 4
    assert choose_threshold(P_MEL, IS_MEL, 0.9) == 0.30  # needs all 4
    assert choose_threshold(P_MEL, IS_MEL, 0.5) == 0.80
    rng = np.random.default_rng(1)
    p, y = rng.random(200), rng.random(200) < 0.3
    for target in (0.8, 0.9, 0.95):
        t = choose_threshold(p, y, target)
        assert (p[y] >= t).mean() >= target
        assert (p[y] > t).mean() < target  # any higher threshold misses the target
    assert choose_threshold(np.array([0.2] * 10), np.ones(10), 0.9) == 0.2  # 0.9 * 10 is 9, not 9.000000000000002
    with pytest.raises(ValueError, match="positive"):
        choose_threshold(P_MEL, np.zeros(10), 0.9)


def test_fit_temperature_recovers_an_overconfident_scale():
    torch.manual_seed(0)
    scores = torch.randn(4000, 3) * 1.5  # the true log-probabilities, up to a constant
    targets = torch.multinomial(scores.softmax(-1), 1)[:, 0]
    fitted = fit_temperature(scores * 3.0, targets)  # a model three times too confident
    assert fitted == pytest.approx(3.0, rel=0.1)
    grid = torch.linspace(2.0, 4.0, 401)
    best = grid[torch.stack([torch.nn.functional.cross_entropy(scores * 3.0 / g, targets) for g in grid]).argmin()]
    assert fitted == pytest.approx(best.item(), abs=0.01)
    with torch.no_grad():  # training calls it inside no_grad
        assert fit_temperature(scores * 3.0, targets) == pytest.approx(fitted)


def test_split_settings_come_from_the_model_file():
    assert split_settings({}, "ham10000") == {"seed": 0, "fold": None, "folds": 5, "fractions": None}
    stored = {"splits": {"ham10000": {"seed": 7, "fold": 2, "folds": 4, "fractions": {"train": 0.6, "valid": 0.2, "test": 0.2}}}}
    assert split_settings(stored, "ham10000") == {"seed": 7, "fold": 2, "folds": 4, "fractions": stored["splits"]["ham10000"]["fractions"]}
    assert split_settings({"splits": {"dermmel": {"seed": 1, "fold": 3, "folds": 5}}}, "dermmel")["fold"] is None  # official splits


def test_report_files_agree_with_each_other(tmp_path):
    model = plugin_heads_model()
    model.update_head("dermmel", temperature=2.0, threshold=0.45)
    root = make_dermmel(tmp_path / "data")
    cut = next((root / "DermMel" / "test" / "Melanoma").iterdir())
    truncate(cut)  # one unreadable image is left out and listed, not fatal
    m = evaluate_head(model, "dermmel", root, tmp_path / "out", run=RunOptions(workers=0))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "confidence.png", "confusion_matrix.png", "metrics.json", "predictions.csv", "reliability.png", "roc.png"
    ]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    assert m["n"] == 5 and len(m["unreadable"]) == 1 and str(cut) in m["unreadable"][0]
    assert m["threshold"] == 0.45 and m["temperature"] == 2.0
    assert m["ece_after_temperature"] == m["ece"] and m["ece_before_temperature"] != m["ece"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 5
    p_mel = np.array([float(r["p_melanoma"]) for r in rows])
    true_mel = np.array([r["true"] == "melanoma" for r in rows])
    assert [r["predicted"] for r in rows] == ["melanoma" if p >= 0.45 else "not_melanoma" for p in p_mel]
    assert true_mel.sum() == 2  # the test split's 3 melanomas less the cut one, and 3 others: both classes, so AUC exists
    assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(true_mel, p_mel), abs=1e-5)
    assert m["sensitivity"] == pytest.approx(np.mean(p_mel[true_mel] >= 0.45))


def test_multiclass_report_uses_the_split_the_model_recorded(tmp_path):
    root = make_ham10000(tmp_path / "ham")
    model = plugin_heads_model()
    model.provenance = {"splits": {"ham10000": {"seed": 3, "fold": None, "folds": 5}}}  # as a loaded model file has it
    m = evaluate_head(model, "ham10000", root, tmp_path / "out", run=RunOptions(workers=0))
    expected = samples_for("ham10000", root, "test", seed=3)
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert sorted(r["image"] for r in rows) == sorted(str(s.path) for s in expected)
    assert m["split_settings"]["seed"] == 3 and "sensitivity" not in m and len(m["per_class"]) == 7
