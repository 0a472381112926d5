"""`mvit train` and `mvit extract` from the command line, one process and two (torchrun, gloo)."""

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

import mvit
from clirun import call_mvit, run_mvit
from training_data import make_learnable_dermmel

CONFIG = """
output = "run"

[[datasets]]
name = "dermmel"
root = "{root}"

[backbone]
name = "deit_tiny_patch16_224"
init = "random"
patch_size = 8
width = 32
depth = 2
num_heads = 2

[preprocessing]
image_size = 32
crop_fraction = 1.0

[unfreeze]
mode = "gradual"
frozen_epochs = 1

[augmentation]
enabled = false

[training]
epochs = 2
batch_size = 8
workers = 0
device = "cpu"
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    root = make_learnable_dermmel(folder / "data", per_class_train=12, per_class_eval=4)
    path = folder / "config.toml"
    path.write_text(CONFIG.format(root=root))
    return path


def test_train_command_writes_a_run(config_file, tmp_path, capsys, monkeypatch):
    result = call_mvit(capsys, monkeypatch, "train", str(config_file), "--output", str(tmp_path / "run"), "--epochs", "2")
    assert result.code == 0, result.stderr
    assert "epoch 2/2" in result.stderr
    assert (tmp_path / "run" / "features.h5").is_file()  # frozen, unaugmented epoch read cached features
    assert len(mvit.load(tmp_path / "run" / "best.safetensors").heads) == 1


def test_bad_config_is_one_sentence_and_exit_2(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bad.toml"
    path.write_text('output = "x"\n[[datasets]]\nname = "dermmel"\nroot = "/nonexistent"\n[optimizer]\nhead_lr = -1\n')
    result = call_mvit(capsys, monkeypatch, "train", str(path))
    assert result.code == 2
    assert "optimizer.head_lr" in result.stderr and "Traceback" not in result.stderr
    result = call_mvit(capsys, monkeypatch, "train", str(path), "--set", "optimizer.head_lr=0.1")
    assert result.code == 2 and "/nonexistent" in result.stderr


def test_extract_command_fills_the_cache(config_file, tmp_path):
    cache = tmp_path / "features.h5"
    result = run_mvit("extract", str(config_file), "--cache", str(cache), timeout=300)
    assert result.code == 0, result.stderr
    assert cache.is_file() and "computed" in result.stderr
    again = run_mvit("extract", str(config_file), "--cache", str(cache), timeout=300)
    assert "this process computed 0" in again.stderr


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu_write_one_model(config_file, tmp_path):
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mvit", "train", str(config_file), "--output", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["best.safetensors", "last.safetensors"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    with safe_open(str(run / "best.safetensors"), "pt") as file:
        provenance = json.loads(file.metadata()["mvit"])["provenance"]
    assert provenance["epoch"] >= 1
