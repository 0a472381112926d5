"""The shift-robust recipe: mixing with per-head soft targets, colour constancy applied the same way
everywhere, acquisition-shift augmentation, torchvision's policies, and weight averaging."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import v2 as T

import mvit
from conftest import tiny_model
from mvit.train import trainer as training
from mvit.train.tasks import build_tasks
from mvit.core.model_file import save
from mvit.infer.model import load
from mvit.data.mixing import IGNORE, Mix, mix_images, mixing_active, soft_targets
from mvit.data.transforms import (
    AcquisitionShift,
    Augmentation,
    Mixing,
    Preprocessing,
    RandomVignette,
    ShadesOfGray,
    eval_transform,
    train_transform,
)
from test_train import dermmel_root, metrics, tiny_config  # noqa: F401 (a fixture)
from training_data import interrupted_run


def lesion_image(size=(60, 48), cast=(1.0, 1.0, 1.0), seed=0) -> Image.Image:
    """A brown blob on skin under an illuminant that scales each channel by `cast`."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[:h, :w]
    blob = ((x - w / 2) ** 2 + (y - h / 2) ** 2) < (min(h, w) / 3) ** 2
    pixels = np.where(blob[..., None], [110.0, 70.0, 50.0], [220.0, 180.0, 160.0]) + rng.normal(0, 6, (h, w, 3))
    pixels = np.clip(pixels * np.array(cast), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


# ---- mixing ---------------------------------------------------------------------------------------


def test_mixed_targets_sum_to_one_per_head_and_blend_the_two_images_classes():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16)
    mixed, mix = mix_images(images, Mixing(mixup_alpha=0.4))
    assert 0.0 < mix.weight < 1.0 and not torch.equal(mixed, images)
    assert torch.allclose(mixed, mix.weight * images + (1 - mix.weight) * images[mix.partner])
    # two heads of one dataset: 3 classes for every sample, and a binary head that leaves sample 0 out
    three = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    binary = torch.tensor([IGNORE, 1, 0, 1, 0, 1, 0, 1])
    for targets, classes in ((three, 3), (binary, 2)):
        soft, keep = soft_targets(targets, classes, mix, label_smoothing=0.1)
        assert torch.allclose(soft.sum(dim=1), torch.ones(len(soft)))
        rows = keep.nonzero().flatten()
        for row, index in zip(soft, rows):
            own, other = targets[index], targets[mix.partner[index]]
            expected = torch.full((classes,), 0.1 / classes)
            expected[own] += 0.9 * mix.weight
            expected[other] += 0.9 * (1 - mix.weight)
            assert torch.allclose(row, expected)
    _, keep = soft_targets(binary, 2, mix)
    partner_of_zero = (mix.partner == 0).nonzero().item()
    assert not keep[0] and not keep[partner_of_zero]  # a left-out image leaves out its mix too
    assert keep.sum() == 8 - 2 + (partner_of_zero == 0)


def test_cutmix_pastes_a_box_of_the_partner_and_weights_by_the_area_kept():
    torch.manual_seed(3)
    images = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 3, 20, 20).contiguous()  # image i is all i
    mixed, mix = mix_images(images, Mixing(cutmix_alpha=1.0))
    for i in range(4):
        own = (mixed[i] == i).float().mean().item()
        if mix.partner[i] != i:
            assert own == pytest.approx(mix.weight)  # the area left of its own pixels is its target share
            assert ((mixed[i] == mix.partner[i]) | (mixed[i] == i)).all()


def test_unmixed_batches_give_the_plain_smoothed_targets():
    targets = torch.tensor([1, 0, 2])
    soft, keep = soft_targets(targets, 3, Mix.none(3), label_smoothing=0.0)
    assert keep.all() and torch.equal(soft, torch.eye(3)[targets])
    images = torch.rand(3, 3, 8, 8)
    same, mix = mix_images(images, Mixing(mixup_alpha=0.2, probability=0.0))
    assert same is images and mix.weight == 1.0


def test_mixing_is_switched_off_for_the_last_epochs():
    mixing = Mixing(mixup_alpha=0.2, off_epochs=2)
    assert [mixing_active(mixing, epoch, 6) for epoch in range(6)] == [True] * 4 + [False] * 2
    assert not mixing_active(Mixing(), 0, 6)  # off by default: the first round's recipe


# ---- colour constancy --------------------------------------------------------------------------


def test_shades_of_gray_removes_a_colour_cast():
    neutral, warm = lesion_image(), lesion_image(cast=(1.0, 0.8, 0.6))
    sog = ShadesOfGray(6)

    def chromaticity(image):  # (H, W, 3) colour without brightness, which colour constancy keeps
        pixels = np.asarray(image, float) + 1.0
        return pixels / pixels.sum(axis=-1, keepdims=True)

    before = np.abs(chromaticity(neutral) - chromaticity(warm)).mean()
    after = np.abs(chromaticity(sog(neutral)) - chromaticity(sog(warm))).mean()
    assert after < before / 10
    grey = Image.new("RGB", (10, 10), (128, 128, 128))
    assert np.array_equal(np.asarray(sog(grey)), np.asarray(grey))  # a grey world needs no correction


def test_without_colour_constancy_preprocessing_is_the_first_rounds():
    image = lesion_image()
    pre = Preprocessing(image_size=32)
    before = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32),
                        T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)])
    assert torch.equal(eval_transform(pre)(image), before(image))


def test_colour_constancy_is_stored_and_applied_in_predict_exactly_as_in_training(tmp_path):
    model = tiny_model()
    model.preprocessing = Preprocessing(image_size=32, color_constancy="shades_of_gray")
    path = save(model, tmp_path / "m.safetensors")
    loaded = load(path)
    assert loaded.preprocessing.color_constancy == "shades_of_gray"
    image = lesion_image(cast=(1.0, 0.7, 0.5))
    # training without augmentation and evaluation use one transform; prediction must match it
    pixels = train_transform(loaded.preprocessing, Augmentation(enabled=False))(image)
    balanced = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32),
                          T.ToImage(), T.ToDtype(torch.float32, scale=True),
                          T.Normalize(loaded.preprocessing.mean, loaded.preprocessing.std)])(ShadesOfGray(6)(image))
    assert torch.equal(pixels, balanced)
    with torch.no_grad():
        logits = loaded(pixels[None], ["three"])["three"]
    [prediction] = loaded.predict(image, head="three")
    expected = torch.softmax(logits / loaded.heads["three"].temperature, dim=-1)[0]
    assert [prediction.probabilities[c] for c in ("a", "b", "c")] == pytest.approx(expected.tolist(), abs=1e-6)
    # and a model without it sees the cast
    plain = tiny_model()
    assert not torch.equal(eval_transform(plain.preprocessing)(image), pixels)


# ---- augmentation ------------------------------------------------------------------------------


def test_every_acquisition_shift_changes_the_image_and_keeps_its_size():
    image = T.functional.pil_to_tensor(lesion_image((64, 48)))
    for part in ("resample", "jpeg", "blur", "exposure", "vignette"):
        torch.manual_seed(0)
        transform = train_transform(Preprocessing(image_size=32), Augmentation(
            crop_scale=(1.0, 1.0), flips=False, color_jitter=0.0, hue_jitter=0.0, shift=AcquisitionShift(**{part: 1.0})))
        shift = transform.transforms[1]  # after ToImage: the one switched-on shift
        assert isinstance(shift, T.RandomApply), part
        shifted = shift(image)
        assert shifted.shape == image.shape and shifted.dtype == torch.uint8, part
        assert not torch.equal(shifted, image), part
    off = train_transform(Preprocessing(image_size=32), Augmentation())
    assert not any(isinstance(t, T.RandomApply) for t in off.transforms)


def test_vignetting_darkens_the_corners_and_leaves_the_centre():
    torch.manual_seed(1)
    image = torch.full((3, 40, 60), 200, dtype=torch.uint8)
    dark = RandomVignette()(image)
    assert dark[:, 0, 0].float().mean() < 100 and torch.equal(dark[:, 20, 30], image[:, 20, 30])


@pytest.mark.parametrize("policy, kind", [("trivial_augment", T.TrivialAugmentWide), ("rand_augment", T.RandAugment)])
def test_automatic_policies_and_random_erasing_come_from_torchvision(policy, kind):
    aug = Augmentation(policy=policy, random_erasing=0.5, shift=AcquisitionShift(jpeg=0.5, vignette=0.5))
    pre = Preprocessing(image_size=32, color_constancy="shades_of_gray")
    transform = train_transform(pre, aug)
    kinds = [type(t) for t in transform.transforms]
    assert kind in kinds and kinds[-1] is T.RandomErasing and ShadesOfGray in kinds
    torch.manual_seed(0)
    out = transform(lesion_image())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


# ---- weight averaging and model selection -----------------------------------------------------------


@pytest.mark.parametrize("winner", ["ema", "trained"])
def test_the_averaged_weights_are_saved_when_they_validate_better(dermmel_root, tmp_path, monkeypatch, winner):  # noqa: F811
    real_record = training.Trainer._record

    def rigged(self, *args):
        record = real_record(self, *args)
        record["ema"]["score"] = record["score"] + (1.0 if winner == "ema" else -1.0)
        return record

    monkeypatch.setattr(training.Trainer, "_record", rigged)
    run = tmp_path / "run"
    config = tiny_config(dermmel_root, run, training={"epochs": 1, "ema_decay": 0.9, "best_metric": "roc_auc"},
                         augmentation={"mixing": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}})
    training.train(config)
    best, last = load_file(str(run / "best.safetensors")), load_file(str(run / "last.safetensors"))
    state = torch.load(run / "state.pt", weights_only=True)
    averaged = {name.removeprefix("module."): value for name, value in state["ema"].items() if name.startswith("module.")}
    name = "backbone.blocks.0.attention.qkv.weight"
    assert not torch.equal(averaged[name], last[name])  # a decay of 0.9 leaves the average behind the weights
    expected = averaged if winner == "ema" else last
    assert all(torch.equal(best[k], expected[k].to(best[k].dtype)) for k in averaged)  # best also holds the gate
    [record] = metrics(run)
    assert record["ema"]["heads"]["dermmel"]["valid"]["roc_auc"] is not None
    provenance = mvit.load(run / "best.safetensors").provenance["training"][-1]
    assert provenance["weights"] == ("exponential moving average" if winner == "ema" else "trained")


def test_resume_continues_the_average(dermmel_root, tmp_path, monkeypatch):  # noqa: F811
    sections = dict(training={"epochs": 2, "ema_decay": 0.9})
    training.train(tiny_config(dermmel_root, tmp_path / "straight", **sections))
    training.resume(interrupted_run(tiny_config(dermmel_root, tmp_path / "interrupted", **sections), 1, monkeypatch))
    straight = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)["ema"]
    resumed = torch.load(tmp_path / "interrupted" / "state.pt", weights_only=True)["ema"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_recipe_switches_are_validated(dermmel_root, tmp_path):  # noqa: F811
    from mvit.errors import ConfigError

    with pytest.raises(ConfigError, match="augmentation.shift.jpeg"):
        tiny_config(dermmel_root, tmp_path, augmentation={"shift": {"jpeg": 2.0}})
    with pytest.raises(ConfigError, match="preprocessing.color_constancy"):
        tiny_config(dermmel_root, tmp_path, preprocessing={"image_size": 32, "color_constancy": "grey_world"})
    with pytest.raises(ConfigError, match="training.ema_decay"):
        tiny_config(dermmel_root, tmp_path, training={"ema_decay": 1.0})
    config = tiny_config(dermmel_root, tmp_path, augmentation={"policy": "rand_augment"})
    assert json.loads(config.model_dump_json())["augmentation"]["policy"] == "rand_augment"


# ---- the out-of-distribution gate at the end of a run --------------------------------------------


def test_a_run_ends_with_a_gate_fitted_on_its_training_images(dermmel_root, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    best = training.train(tiny_config(dermmel_root, run, training={"epochs": 1}))
    model = mvit.load(best)
    gate = model.ood_gate
    assert gate is not None and gate.info.datasets == ["dermmel"] and gate.method == "mahalanobis"
    task = build_tasks(tiny_config(dermmel_root, run), print)[0]
    assert gate.info.train_images == len(task.splits["train"]) and gate.info.valid_images == len(task.splits["valid"])
    valid = [s.path for s in task.splits["valid"]]
    accepted = [p.in_distribution for p in model.predict(valid, head="dermmel")]
    assert sum(accepted) / len(accepted) >= 0.95  # the threshold accepts 95 % of these very images
    flagged = model.predict(np.full((40, 40, 3), 255, dtype=np.uint8), head="dermmel")[0]
    assert flagged.in_distribution is False and flagged.ood_score > gate.threshold


def test_a_frozen_backbone_keeps_the_init_models_gate(dermmel_root, tmp_path):  # noqa: F811
    first = training.train(tiny_config(dermmel_root, tmp_path / "first", training={"epochs": 1}))
    init = {**tiny_config(dermmel_root, tmp_path).backbone.model_dump(), "init": str(first)}
    frozen = dict(backbone=init, unfreeze={"mode": "none"}, augmentation={"enabled": False}, training={"epochs": 1})
    kept = training.train(tiny_config(dermmel_root, tmp_path / "kept", **frozen))
    before, after = mvit.load(first).ood_gate, mvit.load(kept).ood_gate
    assert after.info == before.info
    assert all(torch.equal(before.tensors[k], after.tensors[k]) for k in before.tensors)
    off = training.train(tiny_config(dermmel_root, tmp_path / "off", calibration={"ood_gate": {"enabled": False}}, **frozen))
    assert mvit.load(off).ood_gate is None
    tuned = mvit.load(training.train(tiny_config(dermmel_root, tmp_path / "tuned", backbone=init, training={"epochs": 1})))
    assert not torch.equal(tuned.ood_gate.tensors["mean"], before.tensors["mean"])  # a fine-tuned backbone gets a new gate


def test_training_curves_leave_matplotlibs_backend_alone_and_show_the_average(dermmel_root, tmp_path):  # noqa: F811
    import importlib

    import matplotlib

    from mvit import plots

    previous = matplotlib.get_backend()
    matplotlib.use("svg")  # a user's notebook backend, say
    try:
        importlib.reload(plots)
        run = tmp_path / "run"
        training.train(tiny_config(dermmel_root, run, training={"epochs": 2, "ema_decay": 0.5, "best_metric": "roc_auc"}))
        assert matplotlib.get_backend() == "svg"
        assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(previous)
