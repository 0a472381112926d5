"""Cross-dataset evaluation: any head on any installed dataset whose labels mean the head's classes.

The label bridge goes through the diagnosis vocabulary the plugins declare (`mvit.registry.diagnoses`);
these tests pin the mappings the built-in plugins give, the images an evaluation uses, the report,
and the one-sentence refusals.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn import metrics as sk

from clirun import call_mvit
from datasets_factory import make_dermmel, make_ham10000, make_ph2, write_image
from inference_models import plugin_heads_model, saved_model
from mvit.runtime.options import RunOptions
from mvit.evaluate.evaluation_set import evaluation_set
from mvit.evaluate.report import evaluate_head
from mvit.errors import ConfigError
from mvit.registry import DatasetSpec, HeadSpec, Sample, hookimpl, manager, other_than
from mvit.datasets.bridging import bridge_label_map
from mvit.registry.diagnoses import LEAVES, leaves
from mvit.datasets.splits import samples_for

HAM_LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
REPORT = ["confidence.png", "confusion_matrix.png", "metrics.json", "predictions.csv", "reliability.png", "roc.png"]
# make_ph2's default rows: IMD001-008 common nevus, IMD009-016 atypical nevus, IMD017-020 melanoma
PH2_TRUTH = {f"IMD{k:03d}": "melanoma" if k > 16 else "not_melanoma" for k in range(1, 21)}


@pytest.fixture(autouse=True)
def fresh_registry():
    manager.reset()
    yield
    manager.reset()


def bridge(head: str, dataset: str) -> dict:
    spec = manager.get_head(head)
    return bridge_label_map(spec, manager.get_dataset(spec.dataset), manager.get_dataset(dataset))


def model_with(*heads: str):
    """The test model (heads dermmel, ham10000) plus these installed heads, random weights."""
    model = plugin_heads_model()
    for name in heads:
        model.add_head(manager.get_head(name))
    return model.eval()


def report_rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "predictions.csv").open()))


# ---- the label bridge ----------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["ham10000-mel", "dermmel", "ph2-mel"])
def test_every_melanoma_head_reads_every_builtin_dataset_with_a_melanoma_label(head):
    assert bridge(head, "ph2") == {"common_nevus": "not_melanoma", "atypical_nevus": "not_melanoma", "melanoma": "melanoma"}
    assert bridge(head, "dermmel") == {"Melanoma": "melanoma", "NotMelanoma": "not_melanoma"}
    on_ham = bridge(head, "ham10000")
    assert on_ham["mel"] == "melanoma" and on_ham["nv"] == "not_melanoma"


def test_labels_map_only_where_they_mean_exactly_one_class():
    # every diagnosis but melanoma is DermMel's NotMelanoma
    assert bridge("dermmel", "ham10000") == {label: "melanoma" if label == "mel" else "not_melanoma" for label in HAM_LABELS}
    # PH2's melanoma head never saw a carcinoma or a keratosis: no class of it means one
    assert bridge("ph2-mel", "ham10000") == {
        "akiec": None, "bcc": None, "bkl": None, "df": None, "mel": "melanoma", "nv": "not_melanoma", "vasc": None
    }
    # both PH2 nevus kinds are HAM10000 nv; but a HAM10000 nv could be either PH2 nevus class
    assert bridge("ham10000", "ph2") == {"common_nevus": "nv", "atypical_nevus": "nv", "melanoma": "mel"}
    assert bridge("ph2", "ham10000") == {label: "melanoma" if label == "mel" else None for label in HAM_LABELS}
    # "not melanoma" is six of the seven HAM10000 classes
    assert bridge("ham10000", "dermmel") == {"Melanoma": "mel", "NotMelanoma": None}


def test_a_head_on_its_own_dataset_keeps_its_own_label_map():
    assert bridge("ham10000-mel", "ham10000") == {label: "melanoma" if label == "mel" else "not_melanoma" for label in HAM_LABELS}
    assert bridge("ph2", "ph2") == {"common_nevus": "common_nevus", "atypical_nevus": "atypical_nevus", "melanoma": "melanoma"}


def test_the_vocabulary_and_its_declarations_are_checked():
    assert leaves("nevus") == {"common_nevus", "atypical_nevus"}
    assert set(other_than("melanoma")) == set(LEAVES) - {"melanoma"}
    assert set(other_than("nevus")) == set(LEAVES) - {"common_nevus", "atypical_nevus"}
    spec = DatasetSpec(name="d", title="d", labels=("a", "b"), diagnoses={"a": "nevus", "b": ("melanoma", "dermatofibroma")},
                       load=lambda root: [])
    assert spec.diagnoses == {"a": ("nevus",), "b": ("melanoma", "dermatofibroma")}
    with pytest.raises(ValidationError, match="vocabulary"):
        DatasetSpec(name="d", title="d", labels=("a",), diagnoses={"a": "mole"}, load=lambda root: [])
    with pytest.raises(ValidationError, match="does not have"):
        DatasetSpec(name="d", title="d", labels=("a",), diagnoses={"z": "melanoma"}, load=lambda root: [])


# ---- in-process plugins: one that cannot match a head, one that declares nothing --------------


def _folder_loader(root: Path) -> list[Sample]:
    return [Sample(path=path, label=path.parent.name, group=path.stem) for path in sorted(root.glob("*/*.jpg"))]


class ThirdPartyPlugins:
    """`carcinomas` (squamous cell carcinomas only, declared) and `legacy` (melanomas, nothing declared)."""

    @hookimpl
    def register_datasets(self, register):
        register(DatasetSpec(name="carcinomas", title="carcinomas", labels=("scc",),
                             diagnoses={"scc": "squamous_cell_carcinoma"}, load=_folder_loader))
        register(DatasetSpec(name="legacy", title="legacy", labels=("mel", "other"), load=_folder_loader))

    @hookimpl
    def register_heads(self, register):
        register(HeadSpec(name="legacy", dataset="legacy", classes=("mel", "other"), positive="mel"))


def test_a_dataset_without_declarations_is_refused_in_one_sentence_and_keeps_its_own_head():
    with manager.temporary_plugins(ThirdPartyPlugins()):
        with pytest.raises(ConfigError, match=r"^head dermmel cannot be evaluated on legacy: the legacy plugin does not declare") as caught:
            bridge("dermmel", "legacy")
        assert "\n" not in str(caught.value)
        with pytest.raises(ConfigError, match="the legacy plugin does not declare"):
            bridge("legacy", "ph2")  # its head cannot go elsewhere either
        assert bridge("legacy", "legacy") == {"mel": "mel", "other": "other"}
        with pytest.raises(ConfigError, match=r"no label of carcinomas \(scc\) matches exactly one class of head ham10000"):
            bridge("ham10000", "carcinomas")


# ---- the images evaluated and the report --------------------------------------------------------


def test_a_melanoma_head_on_every_ph2_image_writes_the_full_report(tmp_path):
    root = make_ph2(tmp_path / "ph2")
    out = tmp_path / "out"
    m = evaluate_head(model_with("ham10000-mel"), "ham10000-mel", root, out, dataset="ph2", split="all", run=RunOptions(workers=0))
    assert sorted(p.name for p in out.iterdir()) == REPORT
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    assert (m["head"], m["dataset"], m["head_dataset"], m["split"], m["split_settings"]) == ("ham10000-mel", "ph2", "ham10000", "all", None)
    assert m["n"] == 20 and m["left_out"] == {} and m["classes_without_images"] == [] and m["notes"] == []
    assert m["label_map"] == {"common_nevus": "not_melanoma", "atypical_nevus": "not_melanoma", "melanoma": "melanoma"}
    rows = report_rows(out)
    assert {Path(r["image"]).stem: r["true"] for r in rows} == PH2_TRUTH
    assert m["per_class"]["melanoma"]["support"] == 4 and m["per_class"]["not_melanoma"]["support"] == 16
    p_mel = np.array([float(r["p_melanoma"]) for r in rows])
    is_mel = np.array([r["true"] == "melanoma" for r in rows])
    assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(is_mel, p_mel), abs=1e-5)


def test_a_named_split_of_another_dataset_uses_the_settings_the_model_recorded_for_it(tmp_path):
    root = make_ph2(tmp_path / "ph2")
    model = model_with()
    default = evaluation_set("dermmel", "ph2", root, "test", {"seed": 0})
    m = evaluate_head(model, "dermmel", root, tmp_path / "plain", dataset="ph2", run=RunOptions(workers=0))
    assert m["split_settings"] == {"seed": 0, "fold": None, "folds": 5, "fractions": None}
    assert sorted(r["image"] for r in report_rows(tmp_path / "plain")) == sorted(str(s.path) for s, _ in default.items)
    model.provenance = {"splits": {"ph2": {"seed": 3, "fold": None, "folds": 5}}}
    m = evaluate_head(model, "dermmel", root, tmp_path / "recorded", dataset="ph2", run=RunOptions(workers=0))
    expected = sorted(str(s.path) for s in samples_for("ph2", root, "test", seed=3))
    assert expected != sorted(str(s.path) for s, _ in default.items)  # else this test could not tell them apart
    assert m["split_settings"]["seed"] == 3 and sorted(r["image"] for r in report_rows(tmp_path / "recorded")) == expected
    with pytest.raises(ConfigError, match="ph2 has no split 'nope'; choose all or one of train, valid, test"):
        evaluation_set("dermmel", "ph2", root, "nope")


def test_images_without_a_counterpart_are_left_out_counted_and_empty_classes_named(tmp_path):
    root = make_ham10000(tmp_path / "ham")  # 12 images of each of the seven diagnoses
    m = evaluate_head(model_with("ph2"), "ph2", root, tmp_path / "out", dataset="ham10000", split="all", run=RunOptions(workers=0))
    assert m["n"] == 12 and {r["true"] for r in report_rows(tmp_path / "out")} == {"melanoma"}
    assert m["left_out"] == {label: 12 for label in HAM_LABELS if label != "mel"}
    assert m["classes_without_images"] == ["common_nevus", "atypical_nevus"] and m["roc_auc"] is None
    assert m["notes"] == [
        "left out 72 images whose label has no counterpart among the classes of head ph2: 12 akiec, 12 bcc, 12 bkl, "
        "12 df, 12 nv, 12 vasc",
        "no image evaluated here is of class common_nevus, atypical_nevus of head ph2, so its recall and the ROC AUC "
        "are not measured",
    ]


def test_all_images_of_the_own_dataset_leave_out_augmented_copies_and_warn_of_training_images(tmp_path):
    root = make_dermmel(tmp_path / "data")  # 24 images and 2 augmented copies
    model = model_with()
    model.provenance = {"splits": {"dermmel": {"seed": 0, "fold": None, "folds": 5}}}
    m = evaluate_head(model, "dermmel", root, tmp_path / "out", split="all", run=RunOptions(workers=0))
    assert m["dataset"] == m["head_dataset"] == "dermmel" and m["n"] == 24
    assert not any("AUG_" in r["image"] for r in report_rows(tmp_path / "out"))
    assert any("records training on dermmel, so all its images include images the model learned from" in n for n in m["notes"])


# ---- the command line ---------------------------------------------------------------------------


def mvit(capsys, monkeypatch, *args):
    return call_mvit(capsys, monkeypatch, *map(str, args))


def test_evaluate_dataset_and_split_all_on_the_command_line(capsys, monkeypatch, tmp_path):
    model_file = saved_model(tmp_path)
    root = make_dermmel(tmp_path / "data")
    out = tmp_path / "report"
    done = mvit(capsys, monkeypatch, "evaluate", "-m", model_file, "--device", "cpu", "-H", "ham10000", "--dataset", "dermmel",
                "--root", root, "--split", "all", "--out", out)
    assert done.code == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["head_dataset"], metrics["split"], metrics["n"]) == ("dermmel", "ham10000", "all", 12)
    assert metrics["left_out"] == {"NotMelanoma": 12}
    assert "12 images, 12 left out as unmapped" in " ".join(done.stdout.split())
    assert "note: left out 12 images whose label has no counterpart among the classes of head ham10000: 12 NotMelanoma" in done.stderr
    assert "note: no image evaluated here is of class akiec, bcc, bkl, df, nv, vasc of head ham10000" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == REPORT


def test_a_dataset_the_head_cannot_read_is_one_sentence_and_exit_2(capsys, monkeypatch, tmp_path):
    model_file = saved_model(tmp_path)
    root = tmp_path / "carcinomas"
    write_image(root / "scc" / "a.jpg")
    write_image(root / "mel" / "b.jpg")
    write_image(root / "other" / "c.jpg")
    with manager.temporary_plugins(ThirdPartyPlugins()):
        monkeypatch.setattr(manager, "reset", lambda: None)  # keep the temporary plugins for the command
        for dataset, sentence in (
            ("carcinomas", "error: no label of carcinomas (scc) matches exactly one class of head ham10000"),
            ("legacy", "error: head ham10000 cannot be evaluated on legacy: the legacy plugin does not declare"),
            ("nope", "error: no installed plugin offers a dataset named 'nope'"),
        ):
            done = mvit(capsys, monkeypatch, "evaluate", "-m", model_file, "--device", "cpu", "-H", "ham10000",
                        "--dataset", dataset, "--root", root, "--split", "all", "--out", tmp_path / "out")
            assert done.code == 2, done
            assert done.stderr.startswith(sentence) and done.stderr.strip().count("\n") == 0, done.stderr
            assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
