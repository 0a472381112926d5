"""What `mvit predict` on one image does at start-up: only the modules it needs, no wasted garbage
collection or spinning threads, and a model file loaded without building (and discarding) random
weights. These assert what happens, never how long it takes (bench/cold_start.py times it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import mvit
from mvit.core import model_file
from mvit.infer.model import Model
from mvit.core.vit import VisionTransformer
from training_data import paint

# a wrapper around `python -m mvit`: reports what start-up looked like when the model was loaded,
# and which modules the whole command imported, as one JSON line on stderr
PROBE = """
import gc, json, os, runpy, sys
import mvit.cli.common as common
seen = {}
original = common.load_model
def load_model(*args, **kwargs):
    seen["collector on while starting"] = gc.isenabled()
    seen["wait policy"] = os.environ.get("OMP_WAIT_POLICY")
    model = original(*args, **kwargs)
    seen["collector on after loading"] = gc.isenabled()
    seen["frozen objects"] = gc.get_freeze_count()
    return model
common.load_model = load_model
import mvit.cli.predict
mvit.cli.predict.load_model = load_model
sys.argv = ["mvit", *sys.argv[1:]]
try:
    runpy.run_module("mvit", run_name="__main__")
finally:
    seen["modules"] = sorted(sys.modules)
    seen["collector on at the end"] = gc.isenabled()
    print(json.dumps(seen), file=sys.stderr)
"""

NOT_FOR_PREDICT = ("sklearn", "matplotlib", "h5py", "timm", "onnx", "onnxruntime", "scipy", "pandas")


def probe(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}, **(env or {})})
    return done, json.loads(done.stderr.strip().splitlines()[-1])


def test_predict_on_one_image_imports_only_what_it_needs(tmp_path):
    image = tmp_path / "lesion.jpg"
    paint(image, 0, size=160)
    done, seen = probe("predict", "--head", "all", "--format", "json", "--device", "cpu", str(image))
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == len(mvit.load().heads)
    top_level = {name.split(".")[0] for name in seen["modules"]}
    assert not top_level & set(NOT_FOR_PREDICT), f"predict imported {sorted(top_level & set(NOT_FOR_PREDICT))}"
    # one image is one batch: decoded in this process, no DataLoader worker processes started
    assert not {"multiprocessing.popen_fork", "multiprocessing.popen_forkserver", "multiprocessing.popen_spawn_posix"} & set(seen["modules"])


def test_predict_starts_without_collections_or_spinning_threads(tmp_path):
    image = tmp_path / "lesion.jpg"
    paint(image, 0, size=160)
    done, seen = probe("predict", "--format", "json", "--device", "cpu", str(image))
    assert done.returncode == 0, done.stderr
    assert seen["collector on while starting"] is False
    assert seen["wait policy"] == "PASSIVE"
    assert seen["collector on after loading"] is True and seen["frozen objects"] > 0
    assert seen["collector on at the end"] is True


def test_a_wait_policy_the_user_set_is_kept(tmp_path):
    image = tmp_path / "lesion.jpg"
    paint(image, 0, size=160)
    done, seen = probe("predict", "--format", "json", "--device", "cpu", str(image), env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert done.returncode == 0, done.stderr
    assert seen["wait policy"] == "ACTIVE"


def test_a_command_that_fails_before_loading_turns_the_collector_back_on(tmp_path):
    done, seen = probe("predict", "--format", "json", str(tmp_path))  # a folder without images
    assert done.returncode != 0 and "no image files" in done.stderr
    assert "collector on while starting" not in seen  # it failed before loading a model
    assert seen["collector on at the end"] is True


def test_a_loaded_model_is_the_model_built_the_ordinary_way(tmp_path):
    """`load` builds its modules without random initialisation (parameters on the meta device) and
    with one thread: the result must be what building the model, then copying the weights, gives."""
    threads = torch.get_num_threads()
    loaded = model_file.load()  # the bundled model, stored as float16
    assert torch.get_num_threads() == threads
    metadata = model_file.read_metadata(model_file.bundled_model_path())
    ordinary = Model(VisionTransformer(metadata.backbone), metadata.preprocessing)
    for info in metadata.heads.values():
        ordinary.add_head(info)
    ordinary.load_state_dict(mvit.load().state_dict())
    ordinary.eval()
    assert list(loaded.state_dict()) == list(ordinary.state_dict())
    for (name, tensor), expected in zip(loaded.state_dict().items(), ordinary.state_dict().values()):
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32, name
        assert torch.equal(tensor, expected), name
    assert all(p.requires_grad for p in loaded.parameters())  # training starts from loaded models
    images = torch.randn(2, 3, metadata.backbone.image_size, metadata.backbone.image_size)
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(loaded(images).values(), ordinary(images).values()))
    # saved and loaded again (float32 this time), nothing changes
    again = model_file.load(model_file.save(loaded, tmp_path / "again.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), loaded.state_dict().values()))
