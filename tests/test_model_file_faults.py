"""Tampered, unreadable and unusual model files: refused with one sentence naming the file, or (a valid
file that merely looks odd) loaded; never a wrong answer, never a traceback.

The files are real safetensors files: a model saved by mvit, its metadata or tensors edited and
written back with `safetensors.torch.save_file`, as anyone with a text editor and Python could.
"""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

import mvit
from clirun import call_mvit, run_mvit
from datasets_factory import write_image
from inference_models import saved_model
from mvit.errors import ModelFileError, MvitError
from mvit.core import model_file
from mvit.infer.prediction import UNKNOWN, Prediction

# a safetensors file starts with its header's length as 8 little-endian bytes: these lengths (mod
# 65536) make those bytes begin like a pickle of protocol 2, 3, 4 or 5
PICKLE_LIKE_LENGTHS = {640: b"\x80\x02", 896: b"\x80\x03", 1152: b"\x80\x04", 1408: b"\x80\x05"}


@pytest.fixture
def path(tmp_path) -> Path:
    return saved_model(tmp_path)  # heads dermmel (binary, positive melanoma) and ham10000 (7 classes)


@pytest.fixture
def image(tmp_path) -> Path:
    return write_image(tmp_path / "imgs" / "lesion.jpg", size=(40, 30))


def rewrite(path: Path, change=None, *, extra_header: dict | None = None) -> Path:
    """Write `path` again through safetensors, after `change(meta, tensors)` edits its content."""
    with safe_open(str(path), framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
        meta = json.loads(file.metadata()["mvit"])
    if change is not None:
        change(meta, tensors)
    save_file(tensors, str(path), metadata={"mvit": json.dumps(meta), **(extra_header or {})})
    return path


def header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def pad_header_to(path: Path, residue: int) -> Path:
    """Re-save `path` with a padding entry in its header, so the header length is `residue` mod 65536.

    safetensors aligns the header to 8 bytes; the residues here are multiples of 8, so growing the
    padding string by d bytes grows the header by exactly d."""
    rewrite(path, extra_header={"padding": ""})
    current = header_length(path)
    target = current + (residue - current) % 65536
    rewrite(path, extra_header={"padding": "x" * (target - current)})
    assert header_length(path) % 65536 == residue
    return path


def assert_refused(done, *words: str) -> None:
    """A failed command as the README promises: non-zero, one line on stderr, nothing on stdout."""
    assert done.code != 0, done.stdout
    assert done.stdout == ""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def predict(path, image, *more):
    return run_mvit("predict", "-m", str(path), "--device", "cpu", "-f", "json", *more, str(image))


# ---- the real CLI, in its own process -----------------------------------------------------------


def test_nan_head_weights_are_refused_not_predicted(path, image):
    def poison(_, tensors):
        tensors["classifiers.dermmel.layers.1.weight"][0, 0] = float("nan")

    rewrite(path, poison)
    assert_refused(predict(path, image, "--head", "dermmel"), str(path), "classifiers.dermmel.layers.1.weight", "NaN")


def test_duplicate_class_names_are_refused(path, image):
    def duplicate(meta, _):
        classes = meta["heads"]["ham10000"]["classes"]
        classes[classes.index("mel")] = "nv"  # two outputs now answer "nv": a wrong label, not an error

    rewrite(path, duplicate)
    assert_refused(predict(path, image, "--head", "ham10000"), str(path), "'nv' twice")


def test_a_positive_class_the_head_lacks_is_refused_before_any_output(path, image):
    rewrite(path, lambda meta, _: meta["heads"]["dermmel"].update(positive="naevus"))
    assert_refused(predict(path, image, "--head", "dermmel"), str(path), "'naevus' is not one of its classes")


def test_a_valid_file_whose_header_length_looks_like_a_pickle_predicts(path, image):
    pad_header_to(path, 640)
    assert path.read_bytes()[:2] == b"\x80\x02"  # what a protocol-2 pickle starts with
    done = predict(path, image, "--head", "dermmel")
    assert done.code == 0, done.stderr
    (record,) = json.loads(done.stdout)
    assert record["head"] == "dermmel" and record["label"] in ("melanoma", "not_melanoma")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, whatever its mode")
def test_an_unreadable_model_file_is_one_sentence(path, image):
    path.chmod(0)
    try:
        done = predict(path, image)
        assert_refused(done, str(path))
        assert "permission denied" in done.stderr or "not readable" in done.stderr, done.stderr
    finally:
        path.chmod(0o644)


def test_a_folder_as_model_is_one_sentence(tmp_path, image):
    run = tmp_path / "run"
    saved_model(run).rename(run / "best.safetensors")  # a training run's folder
    assert_refused(predict(run, image), str(run), "is a folder", "best.safetensors")


# ---- the API ------------------------------------------------------------------------------------


@pytest.mark.parametrize("residue", sorted(PICKLE_LIKE_LENGTHS))
def test_every_pickle_like_header_length_loads_and_matches(path, residue):
    before = mvit.load(path)
    pad_header_to(path, residue)
    assert path.read_bytes()[:2] == PICKLE_LIKE_LENGTHS[residue]
    after = mvit.load(path)
    assert after.heads == before.heads and model_file.read_metadata(path).heads == before.heads
    assert not model_file.stored_as_half(path)
    for name, tensor in before.state_dict().items():
        assert torch.equal(tensor, after.state_dict()[name]), name


def test_a_real_pickle_is_still_called_one(tmp_path, path):
    """A guard: opening as safetensors first must not lose the wording for real pickles."""
    torch_file = tmp_path / "model.pt"
    torch.save(mvit.load(path).state_dict(), torch_file)
    for opener in (mvit.load, model_file.read_metadata, model_file.stored_as_half):
        with pytest.raises(ModelFileError, match="is a pickle file"):
            opener(torch_file)


def test_every_opener_turns_os_errors_into_model_file_errors(tmp_path, path, monkeypatch):
    """Whatever the operating system says, each way in gives one ModelFileError naming the file
    (as root nothing is unreadable, so the refusal is injected where safetensors opens the file)."""
    for opener in (mvit.load, model_file.read_metadata, model_file.stored_as_half):
        with pytest.raises(ModelFileError, match="is a folder"):
            opener(tmp_path)
        with pytest.raises(ModelFileError, match="no model file"):
            opener(tmp_path / "absent.safetensors")
    import safetensors

    def refuse(name, *args, **kwargs):
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    for opener in (mvit.load, model_file.read_metadata, model_file.stored_as_half):
        with pytest.raises(ModelFileError, match=f"cannot read the model file {path}: permission denied"):
            opener(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda meta, _: meta["heads"]["dermmel"].update(positive="naevus"), "positive class 'naevus' is not one of its classes"),
        (lambda meta, _: meta["heads"]["ham10000"].update(positive="mel"), "a positive class .* is for a two-class head only"),
        (lambda meta, _: meta["heads"]["ham10000"]["classes"].__setitem__(0, "nv"), "lists class 'nv' twice"),
        (lambda meta, _: meta["heads"]["ham10000"]["classes"].append("scc"), "head 'ham10000' lists 8 classes but its weights give 7"),
        (lambda meta, _: meta["heads"]["dermmel"].update(classes=["melanoma"], positive=None), "needs at least two classes"),
        (lambda meta, _: meta["heads"]["dermmel"].update(temperature=float("inf")), "temperature"),
        (lambda meta, _: meta["heads"].update(other=meta["heads"].pop("dermmel")), "stored as 'other' calls itself 'dermmel'"),
        (lambda meta, _: meta["preprocessing"].update(std=[0.2, 0.0, 0.2]), "positive standard deviations"),
        (lambda meta, _: meta["preprocessing"].update(image_size=64), "backbone takes 32 px"),
        (lambda _, tensors: tensors["backbone.final_norm.weight"].__setitem__(3, float("inf")), "backbone.final_norm.weight holds NaN or infinite"),
        (lambda _, tensors: tensors.update({"classifiers.dermmel.layers.1.bias": torch.zeros(2, dtype=torch.int64)}), "holds int64 values"),
    ],
    ids=["unknown-positive", "positive-on-multiclass", "duplicate-class", "classes-vs-weights", "one-class",
         "infinite-temperature", "key-vs-name", "zero-std", "image-size", "inf-backbone", "int-weights"],
)
def test_tampered_files_are_refused_at_load(path, change, message):
    rewrite(path, change)
    with pytest.raises(ModelFileError, match=message) as refused:
        mvit.load(path)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_metadata_that_is_json_but_not_an_object(path):
    with safe_open(str(path), framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    save_file(tensors, str(path), metadata={"mvit": "[1, 2]"})
    with pytest.raises(ModelFileError, match="not a JSON object"):
        model_file.read_metadata(path)


def test_head_info_cannot_be_changed_from_outside(path, tmp_path):
    model = mvit.load(path)
    images = [write_image(tmp_path / "imgs" / f"lesion{k}.png", size=(40, 30)) for k in range(3)]
    before = [p.label for p in model.predict(images, head="dermmel")]
    with pytest.raises(ValidationError, match="frozen"):
        model.heads["dermmel"].threshold = 7
    with pytest.raises(TypeError):
        model.heads["dermmel"] = model.heads["ham10000"]
    assert model.heads["dermmel"].threshold is None
    assert [p.label for p in model.predict(images, head="dermmel")] == before
    # the one way to change a head: validated, and seen by the next prediction
    model.update_head("dermmel", threshold=0.0)
    assert model.heads["dermmel"].threshold == 0.0
    assert {p.label for p in model.predict(images, head="dermmel")} == {"melanoma"}
    with pytest.raises(ValidationError):
        model.update_head("dermmel", threshold=7)
    with pytest.raises(MvitError, match="cannot change"):
        model.update_head("dermmel", classes=("a", "b"))


def test_as_dict_carries_the_probability_of_the_label(path, image, capsys, monkeypatch):
    (p,) = mvit.load(path).predict(image, head="ham10000")
    record = p.as_dict()
    assert record["probability"] == p.probabilities[p.label] == p.probability
    assert list(record)[:4] == ["image", "head", "label", "probability"]
    abstained = Prediction(image=0, head="h", label=UNKNOWN, probabilities={"a": 0.4, "b": 0.6}, threshold=None,
                           ood_score=9.0, in_distribution=False)
    assert abstained.as_dict()["probability"] is None
    assert dataclasses.asdict(abstained).keys() - {"site", "ood_reason"} < abstained.as_dict().keys()
    assert "site" not in abstained.as_dict()  # a record without a site is as records always were
    done = call_mvit(capsys, monkeypatch, "predict", "-m", str(path), "--device", "cpu", "-H", "ham10000", "-f", "json", str(image))
    assert done.code == 0, done.stderr
    (written,) = json.loads(done.stdout)
    assert written["probability"] == pytest.approx(written["probabilities"][written["label"]])
