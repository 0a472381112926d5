"""The model file: everything round-trips exactly, and every bad file is a clear error."""

import json
import pickle
import pytest
import torch
from safetensors.torch import save_file

import mvit
from mvit.core.model_file import read_metadata, save
from mvit.errors import ModelFileError


@pytest.fixture
def saved(model, tmp_path):
    model.update_head("mel", threshold=0.37, temperature=1.3, metrics={"roc_auc": 0.91, "accuracy": 0.88})
    path = save(model, tmp_path / "model.safetensors", provenance={"run": "unit-test"})
    return model, path


def test_round_trip_reproduces_logits_bit_for_bit(saved):
    model, path = saved
    loaded = mvit.load(path)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before, after = model(images), loaded(images)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_round_trip_keeps_every_metadata_field(saved):
    model, path = saved
    loaded = mvit.load(path)
    assert loaded.heads == model.heads
    assert loaded.backbone.config == model.backbone.config
    assert loaded.preprocessing == model.preprocessing
    meta = read_metadata(path)
    assert meta.format_version == 1
    assert meta.provenance["run"] == "unit-test"
    assert meta.provenance["mvit_version"] == mvit.__version__
    assert "created" in meta.provenance
    assert loaded.provenance["run"] == "unit-test"  # kept when the model is saved again


def test_half_precision_file_is_smaller_and_close(model, tmp_path):
    full = save(model, tmp_path / "full.safetensors")
    half = save(model, tmp_path / "half.safetensors", half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(mvit.load(half)(images)["three"], model(images)["three"], atol=1e-2, rtol=1e-2)


def rewrite_metadata(path, change):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        tensors = {k: file.get_tensor(k) for k in file.keys()}
        meta = json.loads(file.metadata()["mvit"])
    change(meta, tensors)
    save_file(tensors, str(path), metadata={"mvit": json.dumps(meta)})


def test_unknown_format_version(saved):
    _, path = saved
    rewrite_metadata(path, lambda meta, _: meta.update(format_version=99))
    with pytest.raises(ModelFileError, match="format version 99"):
        mvit.load(path)


def test_tensor_that_does_not_fit(saved):
    _, path = saved
    rewrite_metadata(path, lambda _, tensors: tensors.update({"classifiers.mel.layers.1.weight": torch.zeros(3, 48)}))
    with pytest.raises(ModelFileError, match=r"classifiers\.mel\.layers\.1\.weight is \(3, 48\)"):
        mvit.load(path)


def test_missing_tensor(saved):
    _, path = saved
    rewrite_metadata(path, lambda _, tensors: tensors.pop("backbone.final_norm.bias"))
    with pytest.raises(ModelFileError, match=r"missing backbone\.final_norm\.bias"):
        mvit.load(path)


def test_truncated_file(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated|damaged"):
        mvit.load(path)


def test_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, this is not a model")
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        mvit.load(path)


def test_safetensors_without_mvit_metadata(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ModelFileError, match="not an mvit model"):
        mvit.load(path)


def test_pickle_files_are_never_unpickled(tmp_path, model):
    torch_file = tmp_path / "model.pt"
    torch.save(model.state_dict(), torch_file)
    raw_file = tmp_path / "model.pkl"
    raw_file.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    for path in (torch_file, raw_file):
        with pytest.raises(ModelFileError, match="never unpickles"):
            mvit.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no model file"):
        mvit.load(tmp_path / "absent.safetensors")


def test_save_is_atomic(model, tmp_path, monkeypatch):
    path = save(model, tmp_path / "model.safetensors")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError):
        save(model, path)
    assert path.read_bytes() == before


def test_a_model_file_is_as_readable_as_any_file_the_user_writes(model, tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        path = save(model, tmp_path / "shared.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # colleagues can load it; safetensors alone writes 0600
