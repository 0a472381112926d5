"""`--precision int8`: the backbone's linear layers in int8 on the CPU, everything else as in fp32."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from clirun import call_mvit
from conftest import tiny_model
from datasets_factory import write_image
from inference_models import saved_model
import mvit
from mvit.data.transforms import eval_transform
from mvit.errors import ConfigError
from mvit.infer import quantize
from mvit.core.gate import GateInfo, OODGate
from mvit.infer.predict import logits_stream
from mvit.infer.prediction import calibrated
from mvit.runtime.precision import PRECISIONS, autocast_dtype, cpu_has_fast_bfloat16
from mvit.train.config import validate_config

needs_int8_kernels = pytest.mark.skipif(
    not {"fbgemm", "x86", "qnnpack"} & set(torch.backends.quantized.supported_engines),
    reason="this PyTorch build has no int8 CPU kernels",
)
pytestmark = needs_int8_kernels


def images(count: int = 6, size: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    smooth = [rng.integers(0, 256, (4, 4, 3)).astype(np.uint8).repeat(size // 4, 0).repeat(size // 4, 1) for _ in range(count)]
    return [np.clip(s.astype(int) + rng.integers(-20, 20, s.shape), 0, 255).astype(np.uint8) for s in smooth]


def probabilities(predictions) -> np.ndarray:
    """Every probability of every prediction, in order, flat (heads have different class counts)."""
    return np.array([value for p in predictions for value in p.probabilities.values()])


def test_int8_is_a_prediction_choice_but_not_a_training_one():
    assert "int8" in PRECISIONS
    raw = {"output": "runs/x", "datasets": [{"name": "dermmel", "root": "data"}], "runtime": {"precision": "int8"}}
    with pytest.raises(ConfigError, match="runtime.precision"):
        validate_config(raw)


def test_the_quantized_backbone_has_int8_linears_and_the_model_keeps_its_own(model):
    heads_before = {k: v.clone() for k, v in model.classifiers.state_dict().items()}
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    int8 = quantize.int8_backbone(model)

    last_qkv = f"blocks.{len(int8.blocks) - 1}.attention.qkv"
    kinds = {name: type(module) for name, module in int8.named_modules() if isinstance(module, nn.Linear) or quantize.is_quantized_linear(module)}
    quantized = [name for name in kinds if quantize.is_quantized_linear(int8.get_submodule(name))]
    assert sorted(quantized) == sorted(name for name in kinds if name != last_qkv)
    assert len(quantized) == 4 * len(int8.blocks) - 1  # qkv, out, fc_in, fc_out per block; the last qkv is sliced
    assert int8.get_submodule(quantized[0]).weight().dtype == torch.qint8
    # the model itself is unchanged: float linears, same weights, heads untouched, nothing new in its state
    assert not any(quantize.is_quantized_linear(m) for m in model.modules())
    assert all(torch.equal(v, heads_before[k]) for k, v in model.classifiers.state_dict().items())
    assert all(torch.equal(v, backbone_before[k]) for k, v in model.backbone.state_dict().items())
    assert sorted(model.state_dict()) == sorted(tiny_model().state_dict())


def test_the_quantized_copy_is_made_once_and_again_after_the_weights_change(model, monkeypatch):
    made = []
    real = quantize.quantize_backbone
    monkeypatch.setattr(quantize, "quantize_backbone", lambda backbone: made.append(1) or real(backbone))
    pictures = images(3)
    first = model.predict(pictures, precision="int8")
    assert model.predict(pictures, precision="int8") == first
    assert len(made) == 1
    with torch.no_grad():
        model.backbone.blocks[0].mlp.fc_in.weight.mul_(2.0)  # an in-place update, as an optimizer step makes
    changed = model.predict(pictures, precision="int8")
    assert len(made) == 2 and changed != first


def test_int8_predictions_agree_with_fp32_and_use_the_int8_backbone(model):
    model.update_head("mel", temperature=1.7)
    pictures = images(8)
    fp32 = model.predict(pictures, precision="fp32")
    int8 = model.predict(pictures, precision="int8")
    assert [(p.image, p.head) for p in int8] == [(p.image, p.head) for p in fp32]
    assert np.abs(probabilities(int8) - probabilities(fp32)).max() < 0.02
    assert not np.array_equal(probabilities(int8), probabilities(fp32))  # really computed differently

    # int8 logits come from the quantized backbone and the model's float heads; the head's temperature
    # and threshold then apply as in fp32
    (batch,) = list(logits_stream(model, pictures, precision="int8", batch_size=len(pictures)))
    (fp32_batch,) = list(logits_stream(model, pictures, precision="fp32", batch_size=len(pictures)))
    assert not torch.equal(batch.logits["mel"], fp32_batch.logits["mel"])
    info = model.heads["mel"]
    expected = calibrated(batch.logits["mel"], info).numpy()
    mel = [p for p in int8 if p.head == "mel"]
    assert probabilities(mel) == pytest.approx(expected.ravel(), abs=1e-6)
    assert all(p.threshold == 0.3 for p in mel)
    assert [p.label for p in mel] == ["melanoma" if p.probabilities["melanoma"] >= 0.3 else "other" for p in mel]


def test_int8_logits_equal_the_quantized_backbone_and_the_float_heads(model):
    pictures = images(4)
    (batch,) = list(logits_stream(model, pictures, ["three"], precision="int8", batch_size=4))
    transform = eval_transform(model.preprocessing)
    tensors = torch.stack([transform(Image.fromarray(p)) for p in pictures])
    with torch.inference_mode():
        expected = model.classifiers["three"](quantize.int8_backbone(model)(tensors))
    assert torch.allclose(batch.logits["three"], expected, atol=1e-6)


def test_the_gate_scores_the_int8_backbone_feature(model):
    width = model.backbone.width
    info = GateInfo(method="mahalanobis", threshold=5.0, quantile=0.95, layer=1, train_images=10, valid_images=10)
    model.ood_gate = OODGate(info, {"mean": torch.zeros(width), "precision": torch.eye(width)})
    pictures = images(5)
    fp32 = model.predict(pictures, "mel", precision="fp32", abstain=True)
    int8 = model.predict(pictures, "mel", precision="int8", abstain=True)
    scores = np.array([[p.ood_score for p in fp32], [p.ood_score for p in int8]])
    assert np.all(np.isfinite(scores)) and not np.array_equal(scores[0], scores[1])
    assert scores[1] == pytest.approx(scores[0], rel=0.05)
    assert all(p.in_distribution == (p.ood_score <= 5.0) for p in int8)
    assert all(p.label == "unknown" for p in int8 if not p.in_distribution)


def test_auto_never_picks_int8(model):
    assert autocast_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if cpu_has_fast_bfloat16() else None)
    if not cpu_has_fast_bfloat16():  # auto is exactly fp32 here, not int8
        pictures = images(3)
        assert model.predict(pictures, precision="auto") == model.predict(pictures, precision="fp32")
        assert model.backbone not in quantize._int8_copies  # no int8 copy was made


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "meta"])
def test_int8_off_the_cpu_is_refused_in_one_sentence(device):
    with pytest.raises(ConfigError) as refused:
        autocast_dtype("int8", torch.device(device))
    message = str(refused.value)
    assert "int8 runs on the CPU only" in message and message.count(". ") == 0 and "\n" not in message


def test_int8_on_a_model_off_the_cpu_is_refused_before_quantizing(model, monkeypatch):
    """No GPU needed: a model on the meta device takes the same path as one on a GPU."""
    monkeypatch.setattr(quantize, "quantize_backbone", lambda backbone: pytest.fail("quantized a model off the CPU"))
    model.to("meta")
    with pytest.raises(ConfigError, match="int8 runs on the CPU only, and the model is on meta"):
        model.predict(images(1), precision="int8")


def test_predict_precision_int8_through_the_cli(capsys, monkeypatch, tmp_path):
    path = saved_model(tmp_path)
    pictures = [write_image(tmp_path / "imgs" / f"lesion{k}.jpg", size=(40, 30)) for k in range(3)]
    done = call_mvit(capsys, monkeypatch, "predict", "-m", str(path), "--device", "cpu", "--precision", "int8", "-f", "json",
                     *map(str, pictures))
    assert done.code == 0, done.stderr
    records = json.loads(done.stdout)
    api = mvit.load(path).predict(pictures, precision="int8")
    assert [(r["image"], r["head"], r["label"]) for r in records] == [(str(p.image), p.head, p.label) for p in api]
    assert [r["probabilities"] for r in records] == [pytest.approx(dict(p.probabilities), abs=1e-6) for p in api]
    fp32 = mvit.load(path).predict(pictures, precision="fp32")
    assert probabilities(api) == pytest.approx(probabilities(fp32), abs=0.02)
