"""Training: learns, freezes, unfreezes in order, balances, resumes exactly, stops on NaN."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import mvit
from mvit.errors import TrainingDiverged
from mvit.train import trainer as training
from mvit.train.model_setup import build_model
from mvit.train.tasks import build_tasks
from mvit.train.config import load_config, validate_config
from mvit.data.sampling import balanced_batches, batches_per_dataset, interleave
from mvit.errors import ConfigError
from training_data import interrupted_run, make_learnable_dermmel, make_learnable_ph2, tiny_run_config


@pytest.fixture(scope="module")
def dermmel_root(tmp_path_factory):
    return make_learnable_dermmel(tmp_path_factory.mktemp("dermmel"))


def tiny_config(root, output, **sections):
    augmentation = {"crop_scale": [0.8, 1.0], "color_jitter": 0.0, "hue_jitter": 0.0}
    return tiny_run_config(root, output, {"augmentation": augmentation, "training": {"epochs": 4}}, sections)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_small_run_learns_and_writes_its_run_folder(dermmel_root, tmp_path):
    run = tmp_path / "run"
    best = training.train(tiny_config(dermmel_root, run, training={"epochs": 5}))
    history = metrics(run)
    assert len(history) == 5
    assert max(h["heads"]["dermmel"]["valid"]["balanced_accuracy"] for h in history) >= 0.85  # chance is 0.5
    for name in ("best.safetensors", "last.safetensors", "config.json", "curves.png", "metrics.jsonl"):
        assert (run / name).is_file(), name
    model = mvit.load(best)
    info = model.heads["dermmel"]
    assert info.classes == ("melanoma", "not_melanoma") and info.positive == "melanoma"
    assert info.threshold is not None and info.temperature > 0  # calibrated on validation data
    assert "valid_balanced_accuracy" in info.metrics


def test_frozen_epoch_leaves_the_backbone_bit_identical(dermmel_root, tmp_path):
    config = tiny_config(dermmel_root, tmp_path / "run", unfreeze={"mode": "gradual", "frozen_epochs": 1},
                         training={"epochs": 1})
    trainer = training.Trainer(config)
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    heads_before = {k: v.clone() for k, v in trainer.model.classifiers.state_dict().items()}
    trainer.run()
    after = trainer.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(heads_before[k], v) for k, v in trainer.model.classifiers.state_dict().items())
    frozen = [p for params in trainer.model.backbone.parameter_groups().values() for p in params]
    assert all(p not in trainer.optimizer.state for p in frozen)  # no optimizer state for frozen weights


def test_unfreezing_follows_the_configured_order(dermmel_root, tmp_path):
    config = tiny_config(dermmel_root, tmp_path / "run", unfreeze={"mode": "gradual", "frozen_epochs": 1, "every": 1},
                         training={"epochs": 3})
    trainer = training.Trainer(config)
    assert trainer.order == ["final_norm", "block.1", "block.0", "position", "patch_embed"]
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    assert [h["unfrozen_groups"] for h in metrics(tmp_path / "run")] == [[], ["final_norm"], ["final_norm", "block.1"]]
    last = load_file(str(tmp_path / "run" / "last.safetensors"))

    def unchanged(prefix):
        return all(torch.equal(initial[k], last[k]) for k in initial if k.startswith(prefix))

    assert unchanged("backbone.blocks.0.") and unchanged("backbone.patch_embed.")
    assert not unchanged("backbone.blocks.1.") and not unchanged("backbone.final_norm.")


def test_custom_unfreeze_order_is_validated(dermmel_root, tmp_path):
    config = tiny_config(dermmel_root, tmp_path / "run", unfreeze={"mode": "gradual", "order": ["block.7"]})
    with pytest.raises(ConfigError, match="block.7"):
        training.Trainer(config)


def test_balanced_batches_on_a_nine_to_one_dataset():
    targets = [0] * 90 + [1] * 10
    batches = balanced_batches(targets, batch_size=10, num_batches=20, generator=torch.Generator().manual_seed(0))
    for batch in batches:
        assert sum(targets[i] for i in batch) == 5
    minority = [i for batch in batches for i in batch if targets[i] == 1]
    assert set(minority) == set(range(90, 100))  # every rare image is used, not a few repeated


def test_datasets_are_interleaved_without_starving_the_small_one():
    counts = batches_per_dataset([1000, 40], batch_size=10, weighting="sqrt")
    assert counts[1] >= 0.15 * sum(counts)
    order = interleave(counts)
    first_half = order[: len(order) // 2]
    assert abs(first_half.count(1) - counts[1] / 2) <= 1


def test_resume_gives_the_same_result_as_an_uninterrupted_run(dermmel_root, tmp_path, monkeypatch):
    sections = dict(unfreeze={"mode": "gradual", "frozen_epochs": 1}, training={"epochs": 3})
    training.train(tiny_config(dermmel_root, tmp_path / "straight", **sections))
    interrupted = tmp_path / "interrupted"
    training.resume(interrupted_run(tiny_config(dermmel_root, interrupted, **sections), 2, monkeypatch))

    straight, resumed = load_file(str(tmp_path / "straight" / "last.safetensors")), load_file(str(interrupted / "last.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [h["epoch"] for h in metrics(interrupted)] == [1, 2, 3]


def folder_digests(run):
    """Each file in the run folder -> the sha256 of its bytes."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir()) if p.is_file()}


def without_timings(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def test_a_run_interrupted_in_the_middle_of_an_epoch_resumes_to_the_uninterrupted_result(dermmel_root, tmp_path):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    # validation loss improves every epoch here, so each epoch rewrites the best model
    training_section = {"epochs": 3, "ema_decay": 0.9, "best_metric": "loss"}
    sections = dict(unfreeze={"mode": "gradual", "frozen_epochs": 1}, training=training_section)
    straight = tmp_path / "straight"
    training.train(tiny_config(dermmel_root, straight, **sections))

    run = tmp_path / "interrupted"
    seen = {"steps": 0}

    def ctrl_c_in_epoch_2(optimizer, args, kwargs):
        """Before every optimizer step: in epoch 2 (one metrics line written), a Ctrl-C before its third step."""
        if not (run / "metrics.jsonl").is_file() or len(metrics(run)) != 1:
            return
        if seen["steps"] == 0:  # the first step of epoch 2: what epoch 1 left in the run folder
            seen["at_epoch_start"] = folder_digests(run)
        seen["steps"] += 1
        if seen["steps"] == 3:  # two optimizer steps of epoch 2 have changed the weights in memory
            raise KeyboardInterrupt

    hook = register_optimizer_step_pre_hook(ctrl_c_in_epoch_2)
    try:
        with pytest.raises(KeyboardInterrupt):
            training.train(tiny_config(dermmel_root, run, **sections))
    finally:
        hook.remove()
    assert seen["steps"] == 3  # it stopped mid-epoch, not between epochs

    # nothing epoch 1 wrote was touched by the half-done epoch 2, and what it wrote still loads
    assert folder_digests(run) == seen["at_epoch_start"]
    assert {"best.safetensors", "last.safetensors", "metrics.jsonl"} <= set(seen["at_epoch_start"])
    assert [h["epoch"] for h in metrics(run)] == [1]
    assert mvit.load(run / "best.safetensors").provenance["epoch"] == 1

    training.resume(run)
    for name in ("last.safetensors", "best.safetensors"):
        expected, resumed = load_file(str(straight / name)), load_file(str(run / name))
        assert expected.keys() == resumed.keys(), name
        assert all(torch.equal(expected[k], resumed[k]) for k in expected), name
    assert mvit.load(run / "best.safetensors").heads == mvit.load(straight / "best.safetensors").heads  # calibration too
    assert without_timings(metrics(run)) == without_timings(metrics(straight))


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_model(dermmel_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_epoch = training.Trainer._train_epoch

    def poison(self, epoch, *args):
        if epoch == 1:
            self.model.classifiers["dermmel"].layers[-1].weight.data.fill_(math.nan)
        return real_epoch(self, epoch, *args)

    monkeypatch.setattr(training.Trainer, "_train_epoch", poison)
    with pytest.raises(TrainingDiverged, match="diverged.*epoch 2"):
        training.train(tiny_config(dermmel_root, run))
    good = mvit.load(run / "last.safetensors")
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert len(metrics(run)) == 1


def test_config_errors_name_the_field(tmp_path, dermmel_root):
    path = tmp_path / "bad.toml"
    path.write_text(f'output = "out"\n[[datasets]]\nname = "dermmel"\nroot = "{dermmel_root}"\n[training]\nbatch_size = "big"\n')
    with pytest.raises(ConfigError, match="training.batch_size"):
        load_config(path)
    path.write_text('output = "out"\n[[datasets]]\nname = "dermmel"\n')
    with pytest.raises(ConfigError, match="datasets.0.root"):
        load_config(path)
    with pytest.raises(ConfigError, match="not valid TOML"):
        path.write_text("this is = = not toml")
        load_config(path)


def test_overrides_and_relative_paths(tmp_path):
    path = tmp_path / "configs" / "c.toml"
    path.parent.mkdir()
    path.write_text('output = "../runs/x"\n[[datasets]]\nname = "ph2"\nroot = "data/ph2"\n[backbone]\ninit = "m.safetensors"\n')
    config = load_config(path, ["training.epochs=7", "runtime.device=cpu", "datasets.0.fold=2"])
    assert config.training.epochs == 7 and config.runtime.device == "cpu" and config.datasets[0].fold == 2
    with pytest.raises(ConfigError, match="no '3'"):
        load_config(path, ["datasets.3.root=x"])
    assert config.datasets[0].root == tmp_path / "configs" / "data" / "ph2"
    assert config.output == tmp_path / "runs" / "x"
    assert config.backbone.init == str(tmp_path / "configs" / "m.safetensors")


def test_a_frozen_backbone_gains_heads_and_keeps_the_old_ones(dermmel_root, tmp_path):
    first = training.train(tiny_config(dermmel_root, tmp_path / "first", training={"epochs": 1}))
    ph2_root = make_learnable_ph2(tmp_path / "ph2")
    config = tiny_config(dermmel_root, tmp_path / "second", unfreeze={"mode": "none"}, augmentation={"enabled": False},
                         backbone={"init": str(first)}, datasets=[{"name": "ph2", "root": str(ph2_root)}],
                         training={"epochs": 3})
    second = mvit.load(training.train(config))
    assert set(second.heads) == {"dermmel", "ph2", "ph2-mel"}
    before = load_file(str(first))
    reloaded = load_file(str(tmp_path / "second" / "best.safetensors"))
    for name, tensor in before.items():  # backbone and the dermmel head are untouched
        if not name.startswith("training_images."):  # the record of training images grows with PH2's
            assert torch.equal(tensor, reloaded[name]), name
    assert second.heads["dermmel"] == mvit.load(first).heads["dermmel"]
    assert [run["config"]["datasets"][0]["name"] for run in second.provenance["training"]] == ["dermmel", "ph2"]
    assert set(second.provenance["splits"]) == {"dermmel", "ph2"}


def test_an_mvit_init_keeps_its_architecture_and_takes_the_configs_regularisation(dermmel_root, tmp_path):
    first = training.train(tiny_config(dermmel_root, tmp_path / "first", training={"epochs": 1}))
    init = {"init": str(first), "drop_path": 0.3}  # neither name nor shape: they are the init model's
    config = tiny_config(dermmel_root, tmp_path / "second", backbone=init, training={"epochs": 1})
    config = validate_config({**config.model_dump(mode="json"), "backbone": init})
    tasks = build_tasks(config, print)
    model = build_model(config, tasks, print)
    before = mvit.load(first).backbone
    assert model.backbone.config.drop_path == 0.3 and model.backbone.config.width == before.config.width
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(), before.state_dict().values()))
    second = mvit.load(training.train(config))
    assert second.provenance["training"][-1]["backbone"]["drop_path"] == 0.3
    wider = validate_config({**config.model_dump(mode="json"), "backbone": {**init, "width": 64}})
    with pytest.raises(ConfigError, match="backbone.width"):
        build_model(wider, tasks, print)


def test_create_backbone_applies_overrides_to_a_given_config():
    from mvit.core.vit import ViTConfig

    backbone = mvit.create_backbone(ViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=2), drop_path=0.2)
    assert backbone.config.drop_path == 0.2 and backbone.config.width == 32
