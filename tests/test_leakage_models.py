"""The model file records its training images; training, evaluation and `mvit data leaks` count
evaluation images that a model (or its init model) trained on."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file

import mvit
from mvit.runtime.options import RunOptions
from mvit.errors import ModelFileError
from mvit.evaluate.report import evaluate_head
from mvit.core import model_file
from mvit.core.training_images import TrainingImages, content_hash, hash64, isic_number
from mvit.train import trainer as training
from mvit.train.tasks import TRAIN, build_tasks
from clirun import call_mvit, run_mvit
from conftest import SHARED_DATA
from test_train import tiny_config
from training_data import make_learnable_dermmel, make_learnable_ph2

DERMMEL = "DermMel"


@pytest.fixture(scope="module")
def dermmel_root(tmp_path_factory):
    return make_learnable_dermmel(tmp_path_factory.mktemp("dermmel"), per_class_train=10, per_class_eval=5)


@pytest.fixture(scope="module")
def trained(dermmel_root, tmp_path_factory):
    """A one-epoch run on the generated DermMel; returns (config, best model file)."""
    config = tiny_config(dermmel_root, tmp_path_factory.mktemp("runs") / "run", training={"epochs": 1})
    return config, training.train(config, console=Console(file=io.StringIO()))


def training_paths(config):
    return [path for task in build_tasks(config, lambda _: None) for path in task.paths(TRAIN)]


def leaky_copy(root, target):
    """A copy of the DermMel folder whose valid split holds 1 byte-identical copy of a training image
    and whose test split holds 3 byte-identical copies (new names) and 1 re-encoded copy under the
    training image's ISIC id (as a resized copy in another dataset would be): 4 training images."""
    shutil.copytree(root, target)
    train = sorted((target / DERMMEL / "train_sep" / "Melanoma").glob("ISIC_*.jpg"))
    shutil.copyfile(train[0], target / DERMMEL / "valid" / "Melanoma" / "copy_0.jpg")
    for k in range(1, 4):
        shutil.copyfile(train[k], target / DERMMEL / "test" / "Melanoma" / f"copy_{k}.jpg")
    with Image.open(train[4]) as image:  # same ISIC id, other bytes
        image.resize((36, 36)).save(target / DERMMEL / "test" / "Melanoma" / train[4].name, quality=80)
    return target


def strip_record(source, target):
    """`source` as a model file written before mvit recorded training images."""
    with safe_open(str(source), framework="pt") as file:
        header = dict(file.metadata())
        tensors = {name: file.get_tensor(name) for name in file.keys() if not name.startswith("training_images.")}
    meta = json.loads(header["mvit"])
    del meta["provenance"]["training_images"]
    save_file(tensors, str(target), metadata={"mvit": json.dumps(meta)})
    return target


def test_a_run_records_its_training_images(trained):
    config, best = trained
    paths = training_paths(config)
    assert len(paths) == 22  # 20 originals and 2 augmented copies
    for name in ("best.safetensors", "last.safetensors"):
        record = model_file.read_training_images(best.parent / name)
        assert record.content == {hash64(content_hash(p)) for p in paths}
        assert len(record) == 22 and record.complete
        assert record.isic == {isic_number(p) for p in paths if isic_number(p) is not None} and len(record.isic) == 20
    metadata = model_file.read_metadata(best)
    assert metadata.provenance["training_images"]["images"] == 22
    assert metadata.provenance["training"][-1]["training_images"] == {"dermmel": 22}
    assert mvit.load(best).provenance["training_images"] == record


def test_evaluate_warns_about_training_images_and_counts_them(trained, dermmel_root, tmp_path):
    _, best = trained
    root = leaky_copy(dermmel_root, tmp_path / "leaky")
    done = run_mvit("evaluate", "-H", "dermmel", "--root", str(root), "-o", str(tmp_path / "report"), "-m", str(best),
                    "--device", "cpu")
    assert done.code == 0, done.stderr
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["leaked_training_images"] == 4
    assert len(metrics["leaked_training_image_paths"]) == 4
    assert "warning: 4 of the 14 images evaluated were training images of this model" in done.stderr
    assert any(note.startswith("4 of the 14 images") for note in metrics["notes"])
    # the held-out test split of the original folder holds none
    clean = evaluate_head(mvit.load(best), "dermmel", dermmel_root, tmp_path / "clean", run=RunOptions(workers=0))
    assert clean["leaked_training_images"] == 0 and not any("training images of this model" in n for n in clean["notes"])


def test_data_leaks_compares_a_dataset_with_a_model_file(trained, dermmel_root, tmp_path, capsys, monkeypatch):
    _, best = trained
    root = leaky_copy(dermmel_root, tmp_path / "leaky")
    for args in (["--model", str(best)], [str(best)]):
        done = call_mvit(capsys, monkeypatch, "data", "leaks", f"dermmel={root}", *args, "--format", "json")
        assert done.code == 0, done.stderr
        found = json.loads(done.stdout)["model"]
        per_split = {}
        for item in found["trained_on"]:
            per_split[item["split"]] = per_split.get(item["split"], 0) + 1
        assert per_split == {"train": 22, "valid": 1, "test": 4}
        assert found["training_images"] == 22
    table = call_mvit(capsys, monkeypatch, "data", "leaks", f"dermmel={root}", "-m", str(best))
    assert table.code == 0 and "trained on (22 recorded)" in table.stdout
    old = strip_record(best, tmp_path / "old.safetensors")
    refused = call_mvit(capsys, monkeypatch, "data", "leaks", f"dermmel={root}", "-m", str(old))
    assert refused.code == 2 and "does not record its training images" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_an_old_model_file_loads_and_evaluates_with_a_note(trained, dermmel_root, tmp_path):
    _, best = trained
    old = strip_record(best, tmp_path / "old.safetensors")
    model = mvit.load(old)
    assert "training_images" not in model.provenance and model_file.read_training_images(old) is None
    metrics = evaluate_head(model, "dermmel", dermmel_root, tmp_path / "report", run=RunOptions(workers=0))
    assert metrics["leaked_training_images"] is None
    assert any("does not record its training images" in note for note in metrics["notes"])


def test_a_record_without_its_tensors_is_refused(trained, tmp_path):
    _, best = trained
    with safe_open(str(best), framework="pt") as file:
        header = dict(file.metadata())
        tensors = {name: file.get_tensor(name) for name in file.keys() if name != "training_images.isic"}
    save_file(tensors, str(tmp_path / "damaged.safetensors"), metadata=header)
    with pytest.raises(ModelFileError, match="damaged record of its training images"):
        mvit.load(tmp_path / "damaged.safetensors")


def test_fine_tuning_keeps_the_init_models_images_and_warns_about_its_leaks(trained, dermmel_root, tmp_path):
    config, best = trained
    init = model_file.read_training_images(best)
    leaky = leaky_copy(dermmel_root, tmp_path / "leaky")
    ph2 = make_learnable_ph2(tmp_path / "ph2", per_class=4)
    raw = config.model_dump(mode="json")
    raw["output"] = str(tmp_path / "tuned")
    raw["datasets"] = [{"name": "dermmel", "root": str(leaky)}, {"name": "ph2", "root": str(ph2)}]
    raw["backbone"] = {"init": str(best)}
    raw["unfreeze"] = {"mode": "none"}
    tuned_config = type(config).model_validate(raw)
    console = io.StringIO()
    tuned = training.train(tuned_config, console=Console(file=console, width=400))
    said = console.getvalue()
    assert "1 of the 11 images of the valid split of dataset dermmel were training images of the init model" in said
    assert "4 of the 14 images of the test split of dataset dermmel were training images of the init model" in said
    record = model_file.read_training_images(tuned)
    own = TrainingImages.of(training_paths(tuned_config))
    assert record.content == init.content | own.content and record.isic == init.isic | own.isic
    assert own.content - init.content, "PH2's training images are new"
    assert record.complete
    # from a model file without a record: the run says so, and its record is marked incomplete
    old = strip_record(best, tmp_path / "old.safetensors")
    raw["output"], raw["backbone"] = str(tmp_path / "from-old"), {"init": str(old)}
    raw["datasets"] = [{"name": "ph2", "root": str(ph2)}]
    console = io.StringIO()
    from_old = training.train(type(config).model_validate(raw), console=Console(file=console, width=400))
    assert "does not record its training images" in console.getvalue()
    assert not model_file.read_training_images(from_old).complete


def test_the_backfill_script_rebuilds_a_runs_record(trained, dermmel_root, tmp_path):
    _, best = trained
    old = strip_record(best, tmp_path / "old.safetensors")
    script = Path(__file__).resolve().parents[1] / "scripts" / "record_training_images.py"
    done = subprocess.run([sys.executable, str(script), str(old), "--data", str(tmp_path / "nowhere"),
                           "--root", f"dermmel={dermmel_root}", "--output", str(tmp_path / "new.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert model_file.read_training_images(tmp_path / "new.safetensors") == model_file.read_training_images(best)
    assert model_file.read_metadata(tmp_path / "new.safetensors").provenance["training"][-1]["training_images"] == {"dermmel": 22}


REAL_DATA = SHARED_DATA


@pytest.mark.skipif(not (REAL_DATA / "ham10000").is_dir(), reason="the real datasets are not on this machine")
def test_the_bundled_model_records_the_training_splits_of_its_provenance(capsys, monkeypatch):
    roots = [f"{name}={REAL_DATA / name}" for name in ("ham10000", "dermmel", "ph2")]
    done = call_mvit(capsys, monkeypatch, "data", "leaks", *roots, "-m", str(model_file.bundled_model_path()), "-f", "json")
    assert done.code == 0, done.stderr
    counts = {}
    for item in json.loads(done.stdout)["model"]["trained_on"]:
        counts[(item["dataset"], item["split"])] = counts.get((item["dataset"], item["split"]), 0) + 1
    # every recorded image is a training image of the split settings the model file records; none is held out
    assert counts == {("ham10000", "train"): 3982, ("dermmel", "train"): 494, ("ph2", "train"): 105}
