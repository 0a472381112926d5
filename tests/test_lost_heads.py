"""A head that loading skipped (a label_map typo in its plugin) stops `mvit train` on its dataset,
instead of the run training the dataset's other heads without a word."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import mvit
from clirun import run_mvit
from mvit.errors import PluginError
from mvit.registry import HeadSpec, hookimpl, manager
from mvit.train import trainer as training
from mvit.train.config import validate_config
from test_registry import fake_distribution
from training_data import make_learnable_dermmel

TYPO = "Melanomma"  # DermMel's label is "Melanoma"


def toy_dataset():
    """DermMel's layout and loader under another name: a third-party dataset for these tests."""
    from mvit.plugins import dermmel

    specs = []
    dermmel.register_datasets(specs.append)
    return specs[0].model_copy(update={"name": "toyderm", "title": "DermMel again, as a plugin's dataset"})


class TypoPlugin:
    """A dataset with two heads, one of which has a typo in its label_map."""

    @hookimpl
    def register_datasets(self, register):
        register(toy_dataset())

    @hookimpl
    def register_heads(self, register):
        register(HeadSpec(name="toyderm", dataset="toyderm", classes=("melanoma", "other"), positive="melanoma",
                          label_map={"Melanoma": "melanoma", "NotMelanoma": "other"}))
        register(HeadSpec(name="toyderm-mel", dataset="toyderm", classes=("melanoma", "other"), positive="melanoma",
                          label_map={TYPO: "melanoma", "NotMelanoma": "other"}))


PLUGIN_MODULE = f'''
    from mvit.registry import HeadSpec, hookimpl
    from mvit.plugins import dermmel

    @hookimpl
    def register_datasets(register):
        specs = []
        dermmel.register_datasets(specs.append)
        register(specs[0].model_copy(update={{"name": "toyderm"}}))

    @hookimpl
    def register_heads(register):
        register(HeadSpec(name="toyderm", dataset="toyderm", classes=("melanoma", "other"),
                          label_map={{"Melanoma": "melanoma", "NotMelanoma": "other"}}))
        register(HeadSpec(name="toyderm-mel", dataset="toyderm", classes=("melanoma", "other"),
                          label_map={{"{TYPO}": "melanoma", "NotMelanoma": "other"}}))
'''


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_learnable_dermmel(tmp_path_factory.mktemp("toyderm"), per_class_train=8, per_class_eval=4)


def config(root, output, **dataset):
    return validate_config({
        "output": str(output),
        "datasets": [{"name": "toyderm", "root": str(root), **dataset}],
        "backbone": {"name": "deit_tiny_patch16_224", "init": "random", "patch_size": 8, "width": 32, "depth": 2,
                     "num_heads": 2, "drop_path": 0.0},
        "preprocessing": {"image_size": 32, "crop_fraction": 1.0},
        "unfreeze": {"mode": "all"},
        "training": {"epochs": 1, "batch_size": 8, "early_stopping": None},
        "runtime": {"workers": 0, "device": "cpu"},
        "calibration": {"ood_gate": {"enabled": False}},
    })


def test_the_registry_records_which_dataset_lost_the_head():
    with manager.temporary_plugins(TypoPlugin()) as registry:
        lost = registry.lost_heads("toyderm")
        assert list(lost) == ["toyderm-mel"] and TYPO in lost["toyderm-mel"] and "TypoPlugin" in lost["toyderm-mel"]
        assert registry.lost_heads("dermmel") == {}


def test_a_head_lost_to_a_label_map_typo_stops_training_before_any_work(root, tmp_path):
    with manager.temporary_plugins(TypoPlugin()):
        with pytest.raises(PluginError) as refused:
            training.train(config(root, tmp_path / "run"))
    message = str(refused.value)
    assert "dataset 'toyderm'" in message and "'toyderm-mel'" in message and TYPO in message
    assert "fix the plugin" in message and "datasets.0.heads" in message
    assert "\n" not in message
    assert not (tmp_path / "run").exists()  # refused before the run folder, or any image, was touched


def test_listing_the_heads_trains_without_the_lost_one_and_says_so(root, tmp_path):
    console = Console(file=io.StringIO(), width=400)
    with manager.temporary_plugins(TypoPlugin()):
        best = training.train(config(root, tmp_path / "run", heads=["toyderm"]), console=console)
    assert set(mvit.load(best).heads) == {"toyderm"}
    said = console.file.getvalue().splitlines()
    warned = [line for line in said if line.startswith("warning: ") and "'toyderm-mel'" in line]
    assert len(warned) == 1 and TYPO in warned[0] and "left out" in warned[0]


def test_asking_for_the_lost_head_says_it_is_installed_but_skipped_and_why(root, tmp_path):
    with manager.temporary_plugins(TypoPlugin()):
        with pytest.raises(PluginError) as refused:
            training.train(config(root, tmp_path / "run", heads=["toyderm", "toyderm-mel"]))
    message = str(refused.value)
    assert message.startswith("datasets.0.heads asks for head 'toyderm-mel', which is installed but skipped: ")
    assert TYPO in message and "fix the plugin" in message
    assert not (tmp_path / "run").exists()


def test_mvit_train_refuses_with_one_sentence_for_an_installed_plugin(root, tmp_path):
    site = tmp_path / "site"
    fake_distribution(site, "mvit-toyderm", {"toyderm": "mvit_toyderm"}, {"mvit_toyderm": PLUGIN_MODULE})
    path = tmp_path / "train.toml"
    path.write_text(f'output = "run"\n[[datasets]]\nname = "toyderm"\nroot = "{root}"\n'
                    f'[training]\nepochs = 1\n[runtime]\ndevice = "cpu"\n')
    run = run_mvit("train", str(path), env={"PYTHONPATH": str(site)})
    assert run.code == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in run.stderr
    assert "dataset 'toyderm'" in errors[0] and "'toyderm-mel'" in errors[0] and TYPO in errors[0]
    assert "datasets.0.heads" in errors[0]
    assert not (tmp_path / "run").exists()
