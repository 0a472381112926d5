"""Checkpoints load completely or not at all, and every problem names the tensor."""

import pickle
import socket

import pytest
import timm
import torch
from safetensors.torch import save_file

import mvit
from mvit.core.weights import export_timm_state_dict, load_timm_state_dict
from mvit.errors import WeightsError

NAME = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def timm_state():
    torch.manual_seed(0)
    return timm.create_model(NAME, pretrained=False).state_dict()


def test_missing_tensor_is_named(timm_state):
    state = dict(timm_state)
    del state["blocks.7.mlp.fc2.weight"]
    with pytest.raises(WeightsError, match=r"missing blocks\.7\.mlp\.fc2\.weight"):
        load_timm_state_dict(mvit.create_backbone(NAME), state)


def test_unexpected_tensor_is_named(timm_state):
    state = dict(timm_state, dist_token=torch.zeros(1, 1, 192))
    with pytest.raises(WeightsError, match="unexpected dist_token"):
        load_timm_state_dict(mvit.create_backbone(NAME), state)


def test_wrong_shape_is_named(timm_state):
    state = dict(timm_state)
    state["blocks.0.attn.qkv.weight"] = torch.zeros(10, 192)
    with pytest.raises(WeightsError, match=r"blocks\.0\.attn\.qkv\.weight is \(10, 192\)"):
        load_timm_state_dict(mvit.create_backbone(NAME), state)


def test_checkpoint_of_another_size_is_refused(timm_state):
    with pytest.raises(WeightsError, match="wrong shape"):
        load_timm_state_dict(mvit.create_backbone("deit_small_patch16_224"), timm_state)


def test_failed_load_leaves_the_backbone_untouched(timm_state):
    backbone = mvit.create_backbone(NAME)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    state = dict(timm_state)
    del state["norm.bias"]
    with pytest.raises(WeightsError):
        load_timm_state_dict(backbone, state)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_safetensors_file(tmp_path, timm_state):
    path = tmp_path / "deit.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(path))
    backbone = mvit.create_backbone(NAME, weights=path)
    torch.testing.assert_close(export_timm_state_dict(backbone)["blocks.3.attn.qkv.bias"], timm_state["blocks.3.attn.qkv.bias"])


def test_deit_release_file_with_model_key(tmp_path, timm_state):
    path = tmp_path / "deit_tiny_patch16_224-a1311bcf.pth"
    torch.save({"model": timm_state}, path)
    backbone = mvit.create_backbone(NAME, weights=path)
    torch.testing.assert_close(backbone.position_embedding, timm_state["pos_embed"])


def test_pickle_with_code_is_never_run(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as file:
        pickle.dump({"model": Boom()}, file, protocol=2)
    with pytest.raises(WeightsError, match="tensors only"):
        mvit.create_backbone(NAME, weights=path)


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="no weights file"):
        mvit.create_backbone(NAME, weights=tmp_path / "absent.safetensors")


def test_timm_download_offline_is_a_clear_error(monkeypatch):
    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(WeightsError, match="could not download pretrained deit_tiny_patch16_224.*offline"):
        mvit.create_backbone(NAME, weights="timm")
