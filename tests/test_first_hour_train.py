"""A new user's first hour with training: a resume does what its options say (or says why not),
and relative paths follow one rule: the config's folder for paths in the config, the working
directory for paths on the command line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from clirun import call_mvit
from mvit.train import trainer as training
from mvit import load as mvit_load
from mvit.train.config import load_config
from training_data import make_learnable_dermmel, tiny_run_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of 2 epochs that finished (calibrated best model and all)."""
    folder = tmp_path_factory.mktemp("finished")
    root = make_learnable_dermmel(folder / "data", per_class_train=6, per_class_eval=3)
    config = tiny_run_config(root, folder / "run", {"augmentation": {"enabled": False}, "training": {"epochs": 2}})
    training.train(config)
    return folder / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_sentence(done, *words: str) -> None:
    assert done.code == 2, (done.code, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    text = " ".join(done.stderr.split())
    for word in words:
        assert word in text, text


def test_resuming_a_finished_run_says_so_and_rewrites_nothing(finished_run, tmp_path, capsys, monkeypatch):
    run = _copy(finished_run, tmp_path)
    before = _digests(run)
    done = call_mvit(capsys, monkeypatch, "train", "--resume", str(run))
    assert done.code == 0, done.stderr
    assert "is finished: it trained all its 2 epochs" in " ".join(done.stderr.split())
    assert "--epochs" in done.stderr  # and how to train longer
    after = _digests(run)
    assert {name: after[name] for name in before if name != "metrics.jsonl"} == \
        {name: digest for name, digest in before.items() if name != "metrics.jsonl"}
    assert "backbone.name" not in done.stderr  # no warning about a field the user never set


def test_epochs_extend_a_finished_run(finished_run, tmp_path, capsys, monkeypatch):
    run = _copy(finished_run, tmp_path)
    done = call_mvit(capsys, monkeypatch, "train", "--resume", str(run), "--epochs", "3", "--device", "cpu")
    assert done.code == 0, done.stderr
    assert _epochs(run) == [1, 2, 3]  # numbered as the console numbers them
    assert "epoch 3/3" in done.stderr
    assert "backbone.name" not in done.stderr


def test_a_run_folder_numbered_from_zero_resumes_renumbered(finished_run, tmp_path, capsys, monkeypatch):
    run = _copy(finished_run, tmp_path)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**r, "epoch": r["epoch"] - 1}) + "\n" for r in records))
    done = call_mvit(capsys, monkeypatch, "train", "--resume", str(run), "--epochs", "3")
    assert done.code == 0, done.stderr
    assert _epochs(run) == [1, 2, 3]


@pytest.mark.parametrize("options, words", [
    (["--set", "optimizer.head_lr=0.5"], ["--set optimizer.head_lr=0.5", "keeps its recipe", "optimizer.head_lr cannot change",
                                         "training.epochs", "[runtime]"]),
    (["--set", "datasets.0.split_seed=3"], ["datasets.0.split_seed cannot change"]),
    (["--output", "elsewhere"], ["resumes in its own folder", "--output"]),
    (["--epochs", "1"], ["has trained 2 epochs already", "--epochs 3 or more"]),
])
def test_an_option_a_resume_cannot_obey_is_one_sentence_and_changes_nothing(finished_run, tmp_path, capsys, monkeypatch,
                                                                          options, words):
    run = _copy(finished_run, tmp_path)
    before = _digests(run)
    _one_sentence(call_mvit(capsys, monkeypatch, "train", "--resume", str(run), *options), *words)
    assert _digests(run) == before


def test_the_machine_settings_may_change_on_resume(finished_run, tmp_path, capsys, monkeypatch):
    run = _copy(finished_run, tmp_path)
    done = call_mvit(capsys, monkeypatch, "train", "--resume", str(run), "--set", "runtime.workers=1", "--epochs", "3")
    assert done.code == 0, done.stderr
    assert len(_epochs(run)) == 3


def test_paths_in_the_config_follow_its_folder_and_paths_on_the_command_line_the_working_directory(tmp_path, monkeypatch):
    config = tmp_path / "configs" / "c.toml"
    config.parent.mkdir()
    config.write_text('output = "runs/x"\n[[datasets]]\nname = "dermmel"\nroot = "data"\n[runtime]\nfeature_cache = "f.h5"\n')
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    written = load_config(config)
    assert written.output == tmp_path / "configs" / "runs" / "x"
    assert written.datasets[0].root == tmp_path / "configs" / "data"
    assert written.runtime.feature_cache == tmp_path / "configs" / "f.h5"
    given = load_config(config, ["output=runs-y", "datasets.0.root=mydata", 'runtime.feature_cache="cache/f.h5"',
                                 "backbone.init=models/m.safetensors"])
    assert given.output == here / "runs-y"  # as `--output runs-y` is
    assert given.datasets[0].root == here / "mydata"
    assert given.runtime.feature_cache == here / "cache" / "f.h5"
    assert given.backbone.init == str(here / "models" / "m.safetensors")
    assert load_config(config, ["backbone.init=bundled"]).backbone.init == "bundled"  # a name, not a path


def test_a_tie_of_scores_is_broken_by_the_lower_validation_loss(tmp_path, monkeypatch):
    """On a small validation split balanced accuracy moves in steps, so equal scores are common:
    the epoch with the lower validation loss is the better one."""
    from mvit.train import epoch_metrics

    monkeypatch.setattr(epoch_metrics, "selection_score", lambda valid, metric: 0.75)  # every epoch ties
    root = make_learnable_dermmel(tmp_path / "data", per_class_train=6, per_class_eval=3)
    config = tiny_run_config(root, tmp_path / "run", {"augmentation": {"enabled": False}, "training": {"epochs": 4}})
    best = mvit_load(training.train(config))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lowest = min(records, key=lambda r: r["valid_loss"])
    assert lowest["epoch"] != 1  # the data learns: a later epoch has the lower loss (else the test shows nothing)
    assert best.provenance["training"][-1]["best_epoch"] == lowest["epoch"]


def test_a_run_saves_its_model_files_as_small_as_its_init_model_unless_asked(finished_run, tmp_path):
    from mvit.core import model_file

    half_init = tmp_path / "init.safetensors"
    model_file.save(mvit_load(finished_run / "best.safetensors"), half_init, half=True)  # as the bundled model is stored
    root = json.loads((finished_run / "config.json").read_text())["datasets"][0]["root"]
    frozen = {"augmentation": {"enabled": False}, "unfreeze": {"mode": "none"}, "backbone": {"init": str(half_init)},
              "training": {"epochs": 1}}
    kept = training.train(tiny_run_config(root, tmp_path / "kept", frozen))
    assert model_file.stored_as_half(kept) and model_file.stored_as_half(tmp_path / "kept" / "last.safetensors")
    asked = training.train(tiny_run_config(root, tmp_path / "asked", frozen, {"training": {"save_precision": "float32"}}))
    assert not model_file.stored_as_half(asked)
    assert asked.stat().st_size > 1.5 * kept.stat().st_size
    assert not model_file.stored_as_half(finished_run / "best.safetensors")  # a random init: float32, as before


def test_a_run_logs_to_tensorboard_when_asked(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (make install installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = make_learnable_dermmel(tmp_path / "data", per_class_train=6, per_class_eval=3)
    config = tiny_run_config(root, tmp_path / "run", {"augmentation": {"enabled": False}, "training": {"epochs": 2},
                                                      "logging": {"tensorboard": True}})
    training.train(config)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = events.Scalars("dermmel/valid_loss")
    assert [(e.step, round(e.value, 4)) for e in logged] == \
        [(r["epoch"], round(r["heads"]["dermmel"]["valid"]["loss"], 4)) for r in records]
    assert "score" in events.Tags()["scalars"] and any(tag.startswith("lr/") for tag in events.Tags()["scalars"])
    assert events.Tags()["images"] == ["dermmel/confusion_matrix"]
    assert "logging" not in mvit_load(tmp_path / "run" / "best.safetensors").provenance["training"][-1]["config"]


def test_tensorboard_asked_for_but_not_installed_is_one_sentence_when_the_config_is_read(tmp_path, monkeypatch):
    import importlib.util

    from mvit.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    path = tmp_path / "c.toml"
    path.write_text('output = "out"\n[[datasets]]\nname = "dermmel"\nroot = "data"\n[logging]\ntensorboard = true\n')
    with pytest.raises(ConfigError, match=r"logging.tensorboard: TensorBoard is not installed; install mvit's tensorboard extra"):
        load_config(path)
