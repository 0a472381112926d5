"""Heads fitted in closed form: the engine (`train.linear_heads`) and `mvit train` using it on a frozen backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mvit.core import model_file
from mvit.train import linear_heads
from training_data import make_learnable_dermmel, make_learnable_ph2, tiny_run_config

FROZEN = {"unfreeze": {"mode": "none"}, "augmentation": {"enabled": False}}


def blobs(n: int, classes: int, dim: int = 6, spread: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * 3 + 5  # far from the origin: standardising matters
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dim, generator=generator), y


def test_fit_is_the_l2_logistic_regression_optimum():
    """The same optimum as scikit-learn's multinomial logistic regression on the standardised features
    (C = 1 / strength, weights summing to one), folded back onto the raw features."""
    from sklearn.linear_model import LogisticRegression

    X, y = blobs(90, 3, spread=3.0)
    head = linear_heads.fit(X, y, 3, strength=0.05)
    w = linear_heads.balanced_weights(y, 3)
    w = w / w.sum()
    mean = (w[:, None] * X).sum(0)
    spread = (w[:, None] * (X - mean) ** 2).sum(0).sqrt()
    reference = LogisticRegression(C=1 / 0.05, tol=1e-10, max_iter=10_000).fit(((X - mean) / spread).numpy(), y.numpy(), sample_weight=w.numpy())
    ours = head.logits(X).softmax(-1).numpy()
    theirs = reference.predict_proba(((X - mean) / spread).numpy())
    assert np.abs(ours - theirs).max() < 2e-3
    assert head.weight.shape == (3, 6) and head.bias.shape == (3,)


def test_class_balanced_weights_give_each_class_the_same_total():
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2])
    w = linear_heads.balanced_weights(y, 4)  # class 3 absent: no weight, no division by zero
    assert w.sum().item() == pytest.approx(len(y))
    totals = [w[y == k].sum().item() for k in range(3)]
    assert totals == pytest.approx([3.0, 3.0, 3.0])


def test_the_strength_is_chosen_on_held_out_loss():
    """Labels that are noise: one of the strongest penalties (close to predicting the base rate) has
    the lowest held-out loss; labels the features tell: a much weaker one."""
    X, _ = blobs(200, 2, seed=1)
    noise = torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(2))
    chosen = linear_heads.choose_and_fit((X[:150], noise[:150]), (X[150:], noise[150:]), 2)
    assert chosen.strength >= 1.0
    X, y = blobs(200, 2, spread=2.0, seed=3)
    told = linear_heads.choose_and_fit((X[:150], y[:150]), (X[150:], y[150:]), 2)
    assert told.strength < 0.1 and told.held_out_loss < 0.5


def test_an_anchor_pulls_the_head_towards_it():
    X, y = blobs(60, 2, seed=4)
    anchor = (torch.randn(2, 6), torch.randn(2))
    pulled = linear_heads.fit(X, y, 2, strength=1e4, anchor=anchor)
    assert torch.allclose(pulled.weight, anchor[0], atol=1e-2)
    free = linear_heads.fit(X, y, 2, strength=1e-3)
    assert not torch.allclose(free.weight, anchor[0], atol=1e-1)


def test_train_fits_a_frozen_backbones_heads_in_closed_form(tmp_path):
    from mvit.train.trainer import train

    root = make_learnable_dermmel(tmp_path / "data")
    best = train(tiny_run_config(root, tmp_path / "run", FROZEN))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and set(records[0]["closed_form"]) == {"dermmel"}
    assert records[0]["heads"]["dermmel"]["valid"]["balanced_accuracy"] > 0.9  # the discs' colours are learnable
    model = model_file.load(best)
    assert model.heads["dermmel"].l2_strength == records[0]["closed_form"]["dermmel"]["l2_strength"]
    assert model.heads["dermmel"].calibrated and model.heads["dermmel"].threshold is not None
    # the bank the head was fitted on: each training image once (the flipped AUG copies are images too)
    features, targets = model.reference.rows("dermmel")
    assert len(features) == 24 * 2 + 2 and set(targets.tolist()) == {0, 1}


def test_epochs_still_train_a_frozen_backbones_heads_when_asked(tmp_path):
    from mvit.train.trainer import train

    root = make_learnable_dermmel(tmp_path / "data", per_class_train=8, per_class_eval=4)
    train(tiny_run_config(root, tmp_path / "run", FROZEN, {"training": {"head_fit": "epochs", "epochs": 2}}))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and "closed_form" not in records[0]


def test_a_dataset_borrows_the_images_another_datasets_labels_give_its_heads(tmp_path):
    """PH2's heads also learn from DermMel's training images: `ph2-mel` from all of them (NotMelanoma is
    no melanoma), the three-class `ph2` from its melanomas only (NotMelanoma is either nevus class)."""
    from mvit.train.config import validate_config
    from mvit.train.trainer import train
    from training_data import merged, tiny_settings, IN_PROCESS

    dermmel = make_learnable_dermmel(tmp_path / "dermmel", per_class_train=6, per_class_eval=3)
    ph2 = make_learnable_ph2(tmp_path / "ph2", per_class=10)
    raw = merged(tiny_settings(dermmel, tmp_path / "run"), IN_PROCESS, FROZEN)
    raw["datasets"] = [{"name": "dermmel", "root": str(dermmel)},
                       {"name": "ph2", "root": str(ph2), "borrow_from": ["dermmel"]}]
    model = model_file.load(train(validate_config(raw)))
    dermmel_targets = model.reference.rows("dermmel")[1]
    own = len(dermmel_targets)  # DermMel's training images
    not_melanoma = int((dermmel_targets == model.heads["dermmel"].classes.index("not_melanoma")).sum())
    ph2_mel, ph2_three = model.reference.rows("ph2-mel")[1], model.reference.rows("ph2")[1]
    assert len(ph2_mel) > own  # every DermMel image, and PH2's own
    assert len(ph2_mel) - len(ph2_three) == not_melanoma  # the three-class head left those out
    assert len(model.reference.rows("dermmel")[0]) == own  # DermMel does not borrow


def test_borrowing_needs_closed_form_and_a_dataset_of_the_run(tmp_path):
    from mvit.errors import ConfigError
    from mvit.train.config import validate_config
    from training_data import merged, tiny_settings

    raw = merged(tiny_settings(tmp_path, tmp_path / "run"), FROZEN)
    raw["datasets"][0]["borrow_from"] = ["ph2"]
    with pytest.raises(ConfigError, match="borrows from ph2, which is not another dataset of this run"):
        validate_config(raw)
