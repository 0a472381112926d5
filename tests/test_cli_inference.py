"""`mvit predict`, `mvit attention` and `mvit evaluate` as users and programs call them."""

import csv
import io
import json

import pytest

from bad_images import AWKWARD, BROKEN, ODD_NAMES
from clirun import call_mvit, run_mvit
from datasets_factory import make_dermmel, make_ham10000, write_image
from inference_models import saved_model
from mvit.core import model_file as model_files
from mvit.infer.model import load as load_model
from mvit.datasets.splits import samples_for


@pytest.fixture
def model_file(tmp_path):
    return saved_model(tmp_path)


@pytest.fixture
def images(tmp_path):
    return [write_image(tmp_path / "imgs" / f"lesion{k}.jpg", size=(40, 30)) for k in range(3)]


def mvit(capsys, monkeypatch, *args):
    return call_mvit(capsys, monkeypatch, *map(str, args))


def test_json_has_one_record_per_image_and_head_equal_to_the_api(capsys, monkeypatch, model_file, images):
    done = mvit(capsys, monkeypatch, "predict", "-m", model_file, "--device", "cpu", "--head", "dermmel", "--head", "ham10000", "-f", "json", *images)
    assert done.code == 0, done.stderr
    records = json.loads(done.stdout)
    api = load_model(model_file).predict(images, head=["dermmel", "ham10000"])
    assert records == [
        {"image": str(p.image), "head": p.head, "label": p.label, "probability": pytest.approx(p.probability),
         "probabilities": pytest.approx(dict(p.probabilities)),
         "threshold": p.threshold, "ood_score": None, "in_distribution": None}  # null: this model has no gate
        for p in api
    ]


NEGATIVE = {"dermmel": "not_melanoma", "mel": "other"}  # the class each binary head predicts below its threshold


def api_predictions(model_file, images):
    """(image, head) -> the API's prediction with the stored thresholds (dermmel 0.5, mel 0.3)."""
    return {(str(p.image), p.head): p for p in load_model(model_file).predict(images, head=["dermmel", "mel"])}


def decided(p_melanoma, head, threshold):
    """The decision rule, written out: the positive class exactly when its probability reaches the threshold."""
    return "melanoma" if p_melanoma >= threshold else NEGATIVE[head]


def test_csv_has_a_column_per_class_and_the_threshold(capsys, monkeypatch, model_file, images):
    done = mvit(capsys, monkeypatch, "predict", "-m", model_file, "-H", "dermmel", "-H", "mel", "-f", "csv", "--threshold", "0.25", *images)
    assert done.code == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert len(rows) == 6 and [r["head"] for r in rows[:2]] == ["dermmel", "mel"]
    assert set(rows[0]) == {"image", "head", "label", "probability", "threshold", "ood_score", "in_distribution",
                            "p_melanoma", "p_not_melanoma", "p_other"}
    api = api_predictions(model_file, images)
    assert {(r["image"], r["head"]) for r in rows} == set(api)
    for row in rows:
        p_melanoma = api[row["image"], row["head"]].probabilities["melanoma"]
        assert float(row["threshold"]) == 0.25
        assert float(row["p_melanoma"]) == pytest.approx(p_melanoma, abs=1e-6)
        assert row["label"] == decided(p_melanoma, row["head"], 0.25)
        assert float(row["probability"]) == float(row[f"p_{row['label']}"])
    assert rows[0]["p_other"] == "" and rows[1]["p_not_melanoma"] == ""  # class the head does not have


def test_csv_label_is_the_positive_class_exactly_when_its_probability_reaches_the_given_threshold(
    capsys, monkeypatch, model_file, images
):
    api = api_predictions(model_file, images)
    stored = {key: p.label for key, p in api.items()}
    p_melanoma = sorted(p.probabilities["melanoma"] for p in api.values())
    # a threshold between two of the six (image, head) pairs' probabilities that decides otherwise than
    # the stored thresholds, with both sides of the rule exercised
    for below in range(1, len(p_melanoma)):
        threshold = round((p_melanoma[below - 1] + p_melanoma[below]) / 2, 4)
        expected = {key: decided(p.probabilities["melanoma"], key[1], threshold) for key, p in api.items()}
        if p_melanoma[below - 1] < threshold < p_melanoma[below] and expected != stored:
            break
    else:
        pytest.fail(f"no threshold between {p_melanoma} decides otherwise than the stored ones")

    done = mvit(capsys, monkeypatch, "predict", "-m", model_file, "-H", "dermmel", "-H", "mel", "-f", "csv",
                "--threshold", str(threshold), *images)
    assert done.code == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert {(r["image"], r["head"]): r["label"] for r in rows} == expected
    assert {float(r["threshold"]) for r in rows} == {threshold}


def test_table_for_people_lists_every_head(capsys, monkeypatch, model_file, images, tmp_path):
    monkeypatch.chdir(tmp_path)  # a short relative path fits the 80-column table unfolded
    done = mvit(capsys, monkeypatch, "predict", "-m", model_file, "--head", "all", "imgs/lesion0.jpg")
    assert done.code == 0, done.stderr
    for head in ("mel", "three", "dermmel", "ham10000"):
        assert head in done.stdout
    assert "lesion0.jpg" in done.stdout


@pytest.mark.parametrize("suffix", ["json", "csv"])
def test_output_file_takes_its_format_from_the_suffix(capsys, monkeypatch, model_file, images, tmp_path, suffix):
    target = tmp_path / f"out.{suffix}"
    done = mvit(capsys, monkeypatch, "predict", "-m", model_file, "-H", "dermmel", "-o", target, images[0].parent)
    assert done.code == 0 and done.stdout == ""
    text = target.read_text()
    assert len(json.loads(text)) == 3 if suffix == "json" else len(list(csv.DictReader(io.StringIO(text)))) == 3
    refused = mvit(capsys, monkeypatch, "predict", "-m", model_file, "-o", tmp_path / "out.txt", images[0])
    assert refused.code == 2 and "--format" in refused.stderr


def test_globs_and_folders(capsys, monkeypatch, model_file, images):
    done = mvit(capsys, monkeypatch, "predict", "-m", model_file, "-H", "mel", "-f", "csv", str(images[0].parent / "*1.jpg"), images[0].parent)
    assert [r["image"] for r in csv.DictReader(io.StringIO(done.stdout))] == [str(images[1]), str(images[0]), str(images[2])]


def test_each_bad_file_gets_one_line_and_every_other_file_is_predicted(model_file, tmp_path):
    """As a real process: exit status 1, no traceback, one stderr line per bad file."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = [factory(folder / name) for name, factory in AWKWARD.items()]
    good += [write_image(folder / name) for name in ODD_NAMES]
    bad = [factory(folder / name) for name, factory in BROKEN.items()]
    done = run_mvit("predict", "-m", str(model_file), "-H", "dermmel", "-f", "json", str(folder), str(tmp_path / "gone.jpg"))
    assert done.code == 1
    assert "Traceback" not in done.stderr
    assert sorted(r["image"] for r in json.loads(done.stdout)) == sorted(map(str, good))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad) + 1
    for path in [*bad, tmp_path / "gone.jpg"]:
        assert sum(str(path) in line for line in errors) == 1
    assert f"{len(bad) + 1} of {len(good) + len(bad) + 1} images could not be read" in done.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["-H", "ph2"], "no head 'ph2' (it has: mel, three, dermmel, ham10000)"),
        (["-H", "mel", "--threshold", "0.5", "-H", "three"], None),  # fine: applies to the binary head
        (["-H", "three", "--threshold", "0.5"], "binary heads only"),
    ],
)
def test_head_selection_errors(capsys, monkeypatch, model_file, images, args, says):
    done = mvit(capsys, monkeypatch, "predict", "-m", model_file, *args, images[0])
    if says is None:
        assert done.code == 0, done.stderr
    else:
        assert done.code == 2 and says in done.stderr and "Traceback" not in done.stderr


def test_model_file_problems_and_empty_folders_are_one_sentence(capsys, monkeypatch, images, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "empty").mkdir()
    cases = [
        (["-m", broken, images[0]], "is not a readable safetensors model file"),
        (["-m", tmp_path / "nowhere.safetensors", images[0]], "no model file at"),
        (["-m", broken, tmp_path / "empty"], "no image files in"),
    ]
    for args, says in cases:
        done = mvit(capsys, monkeypatch, "predict", *args)
        assert done.code == 2 and says in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 or says == "no image files in"


def test_without_a_model_file_the_bundled_model_is_used(capsys, monkeypatch, images, tmp_path):
    if model_files.BUNDLED_MODEL.is_file():
        done = mvit(capsys, monkeypatch, "predict", "--device", "cpu", "-f", "json", images[0])
        assert done.code == 0, done.stderr
        assert {r["head"] for r in json.loads(done.stdout)} == set(model_files.read_metadata(model_files.BUNDLED_MODEL).heads)
    monkeypatch.setattr(model_files, "BUNDLED_MODEL", tmp_path / "absent.safetensors")  # an installation without it
    done = mvit(capsys, monkeypatch, "predict", images[0])
    assert done.code == 2 and "no bundled model" in done.stderr and "--model" in done.stderr


def test_attention_writes_three_pngs_per_image_and_reports_bad_ones(capsys, monkeypatch, model_file, images, tmp_path):
    (tmp_path / "imgs" / "bad.jpg").write_text("no")
    write_image(tmp_path / "other" / "lesion0.jpg")  # same name as images[0]: must not overwrite it
    out = tmp_path / "maps"
    done = mvit(capsys, monkeypatch, "attention", "-m", model_file, "-H", "dermmel", "--out", out, images[0].parent, tmp_path / "other")
    assert done.code == 1 and "bad.jpg" in done.stderr
    names = sorted(p.name for p in out.iterdir())
    stems = ["lesion0", "lesion0-2", "lesion1", "lesion2"]
    assert names == sorted(f"{s}.{kind}.png" for s in stems for kind in ("attention", "heads", "layers"))
    assert (out / "lesion0.attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_uses_the_split_recorded_in_the_model_file(capsys, monkeypatch, tmp_path):
    root = make_ham10000(tmp_path / "ham")
    model_file = saved_model(tmp_path, provenance={"splits": {"ham10000": {"seed": 5, "fold": 1, "folds": 3}}})
    out = tmp_path / "report"
    done = mvit(capsys, monkeypatch, "evaluate", "-m", model_file, "-H", "ham10000", "--root", root, "--out", out)
    assert done.code == 0, done.stderr
    assert "balanced_accuracy" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split_settings"] == {"seed": 5, "fold": 1, "folds": 3, "fractions": None}
    expected = samples_for("ham10000", root, "test", seed=5, fold=1, folds=3)
    assert metrics["n"] == len(expected)
    refused = mvit(capsys, monkeypatch, "evaluate", "-m", model_file, "-H", "ham10000", "--root", root, "--out", out, "--fold", "0")
    assert refused.code == 2 and "held out fold 1 of ham10000" in refused.stderr


def test_evaluate_a_binary_head_writes_the_full_report(capsys, monkeypatch, model_file, tmp_path):
    root = make_dermmel(tmp_path / "data")
    done = mvit(capsys, monkeypatch, "evaluate", "-m", model_file, "-H", "dermmel", "--root", root, "--out", tmp_path / "r", "--split", "valid")
    assert done.code == 0, done.stderr
    assert {"sensitivity", "specificity", "threshold"} <= set(json.loads((tmp_path / "r" / "metrics.json").read_text()))
    assert len(list((tmp_path / "r").glob("*.png"))) == 4
    wrong = mvit(capsys, monkeypatch, "evaluate", "-m", model_file, "-H", "dermmel", "--root", root, "--out", tmp_path / "r", "--split", "nope")
    assert wrong.code == 2 and "no split 'nope'" in wrong.stderr
