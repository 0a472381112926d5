"""A new user's first hour with `mvit predict` (issue 22): a table that reads as the decision was
made, a flagged image that cannot be missed, errors without Python objects in them, counts in good
grammar, long paths that fit 80 columns, and a guess at a mistyped head."""

import json
import os
import subprocess
import sys

import pytest

from bad_images import not_an_image
from clirun import call_mvit, run_mvit
from datasets_factory import make_dermmel, write_image
from inference_models import plugin_heads_model, saved_model
from mvit.cli.output import shorten_path
from mvit.core import model_file as model_files
from mvit.data.images import EncodedImage, decode_problem
from mvit.errors import UnknownHeadError
from mvit.evaluate.gate import GateRecipe, fit_gate
from mvit.infer.model import load as load_model
from mvit.infer.predict import UNKNOWN
from test_ood import lesions, mixed_images  # noqa: F401 - mixed_images: a fixture, used by name

PYTHON_OBJECT = "object at 0x"  # what `repr` of a stream looks like: never in a sentence for a user
FLAG = "⚠ outside what the model knows"


@pytest.fixture
def model_file(tmp_path):
    return saved_model(tmp_path)  # heads mel (binary, threshold 0.3), three, dermmel (binary), ham10000


@pytest.fixture
def image(tmp_path):
    return write_image(tmp_path / "imgs" / "lesion0.jpg", size=(40, 30))


def mvit(capsys, monkeypatch, *args):
    return call_mvit(capsys, monkeypatch, *map(str, args))


def cells(table: str, head: str) -> list[str]:
    """The cells of the table row of `head` (the first one), stripped."""
    row = next(line for line in table.splitlines() if f"│ {head} " in line)
    return [cell.strip() for cell in row.strip("│").split("│")]


# ---- 1. the table shows the probability the label was decided on ---------------------------------


def test_a_binary_head_shows_its_positive_class_probability_beside_the_threshold(capsys, monkeypatch, model_file, image, tmp_path):
    """`not_melanoma │ 1.000 │ 0.0739` read as a contradiction: the number beside a binary head's
    threshold is its positive class's probability, under a heading that names the class."""
    [p] = load_model(model_file).predict([image], head="mel", threshold=1.0)  # decided against melanoma
    assert p.label == "other" and p.probabilities["melanoma"] != pytest.approx(0.5)
    monkeypatch.chdir(tmp_path)  # a short path: the row is one line
    done = mvit(capsys, monkeypatch, "predict", "-m", model_file, "-H", "mel", "--threshold", "1", "imgs/lesion0.jpg")
    assert done.code == 0, done.stderr
    header = cells(done.stdout.replace("┃", "│"), "image")
    assert header == ["image", "head", "label", "P(melanoma)", "threshold"]
    assert cells(done.stdout, "mel")[1:] == ["mel", "other", f"{p.probabilities['melanoma']:.3f}", "1"]


def test_multi_class_heads_show_the_label_probability_and_no_empty_threshold_column(capsys, monkeypatch, model_file, image, tmp_path):
    three, mel = load_model(model_file).predict([image], head=["three", "mel"])
    monkeypatch.chdir(tmp_path)
    alone = mvit(capsys, monkeypatch, "predict", "-m", model_file, "-H", "three", "imgs/lesion0.jpg").stdout
    assert cells(alone.replace("┃", "│"), "image") == ["image", "head", "label", "P(label)"]
    assert cells(alone, "three")[1:] == ["three", three.label, f"{three.probability:.3f}"]
    # both kinds: one column, its heading naming both meanings, each row the number its head decided on
    both = mvit(capsys, monkeypatch, "predict", "-m", model_file, "-H", "three", "-H", "mel", "imgs/lesion0.jpg").stdout
    assert "P(melanoma)" in both and "or P(label)" in both and "probability" not in both
    assert cells(both, "three")[1:] == ["three", three.label, f"{three.probability:.3f}", ""]
    assert cells(both, "mel")[1:] == ["mel", mel.label, f"{mel.probabilities['melanoma']:.3f}", "0.3"]


@pytest.fixture(scope="module")
def gated_file(tmp_path_factory):
    """The plugin-heads model with a gate fitted on generated lesions (as in test_ood), saved."""
    model = plugin_heads_model()
    model.ood_gate = fit_gate(model, lesions("train", 150), lesions("valid", 100), GateRecipe(method="knn"), datasets=["toy"])
    return model_files.save(model, tmp_path_factory.mktemp("gated") / "gated.safetensors")


def test_an_image_the_gate_flags_gets_a_line_saying_so_and_json_is_as_it_was(capsys, monkeypatch, gated_file, mixed_images):
    api = load_model(gated_file).predict(sorted(mixed_images.iterdir()), head="dermmel")
    assert [p.in_distribution for p in api] == [True, False]  # the lesion passes, the screenshot is flagged
    table = run_mvit("predict", "-m", str(gated_file), "-H", "dermmel", str(mixed_images)).stdout  # 200 columns
    lines = table.splitlines()
    flagged = [k for k, line in enumerate(lines) if FLAG in line]
    assert len(flagged) == 1 and "b_screenshot.png" in lines[flagged[0] - 1]  # the line right under its image
    words = " ".join(table.split())  # the caption is wrapped to the table's width
    assert "1 image outside what the model knows" in words and "labels are guesses" in words  # and why, under the table
    assert "in dist." in table and "NO" in table
    # the formats for programs keep their fields and say it as they did
    records = json.loads(mvit(capsys, monkeypatch, "predict", "-m", gated_file, "-H", "dermmel", "-f", "json", mixed_images).stdout)
    assert [r["in_distribution"] for r in records] == [True, False]
    assert list(records[1]) == ["image", "head", "label", "probability", "probabilities", "threshold", "ood_score", "in_distribution"]
    # --abstain: the flagged image is labelled unknown, as before, and the table still says why
    abstained = run_mvit("predict", "-m", str(gated_file), "-H", "dermmel", "--abstain", str(mixed_images)).stdout
    assert cells(abstained, "dermmel")[3] != UNKNOWN and UNKNOWN in abstained.split("b_screenshot.png")[1]
    assert FLAG in abstained and f"labels are {UNKNOWN} (--abstain)" in " ".join(abstained.split())


def test_no_flag_line_without_a_flagged_image(capsys, monkeypatch, gated_file, mixed_images):
    done = mvit(capsys, monkeypatch, "predict", "-m", gated_file, "-H", "dermmel", mixed_images / "a_lesion.png")
    assert done.code == 0 and "yes" in done.stdout and "outside what the model knows" not in done.stdout


# ---- 2. no Python object in an error -----------------------------------------------------------------


def test_bytes_that_are_no_image_are_named_without_a_python_object():
    """Pillow says `cannot identify image file <_io.BytesIO object at 0x...>` for bytes it cannot
    place; `mvit data check` and any other reader of bytes say what is wrong with the file instead."""
    said = decode_problem(EncodedImage(b"these are not the pixels you are looking for", "upload.jpg"))
    assert said == "upload.jpg is not an image file mvit can read (JPEG, PNG, BMP, TIFF ...)"
    assert decode_problem(EncodedImage(b"\xff\xd8\xff", "cut.jpg")) == "cut.jpg is not an image file mvit can read (JPEG, PNG, BMP, TIFF ...)"


def test_data_check_names_a_broken_image_without_a_python_object(capsys, monkeypatch, tmp_path):
    root = make_dermmel(tmp_path)
    broken = not_an_image(next((root / "DermMel" / "valid" / "Melanoma").glob("*.jpg")))
    done = mvit(capsys, monkeypatch, "data", "check", "dermmel", "--root", root)
    assert done.code == 1
    [line] = [line for line in (done.stdout + done.stderr).splitlines() if broken.name in line]  # the report's errors
    assert "is not an image file mvit can read" in line and PYTHON_OBJECT not in done.stderr + done.stdout


def test_predict_names_a_broken_file_and_a_broken_pipe_without_a_python_object(model_file, tmp_path):
    broken = not_an_image(tmp_path / "notes.jpg")
    done = run_mvit("predict", "-m", str(model_file), "-H", "mel", str(broken))
    assert done.code == 1 and done.stderr == f"error: {broken} is not an image file mvit can read (JPEG, PNG, BMP, TIFF ...)\n"
    piped = subprocess.run([sys.executable, "-m", "mvit", "predict", "-m", str(model_file), "-H", "mel", "-"],
                           input=b"not an image", capture_output=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    said = piped.stderr.decode()
    assert piped.returncode == 1 and "the image on standard input (-) is not an image file" in said and PYTHON_OBJECT not in said


# ---- 3. counts in good grammar ---------------------------------------------------------------------------


def test_the_count_of_the_images_predicted_after_a_failure_agrees_with_its_verb(capsys, monkeypatch, model_file, image, tmp_path):
    broken = not_an_image(tmp_path / "notes.jpg")
    one = mvit(capsys, monkeypatch, "predict", "-m", model_file, "-H", "mel", "-f", "csv", image, broken)
    assert one.code == 1 and "1 of 2 images could not be read (see above); the other 1 image was predicted" in one.stderr
    other = write_image(tmp_path / "imgs" / "lesion1.jpg")
    two = mvit(capsys, monkeypatch, "predict", "-m", model_file, "-H", "mel", "-f", "csv", image, other, broken)
    assert "1 of 3 images could not be read (see above); the other 2 images were predicted" in two.stderr


def test_attention_says_where_the_maps_of_the_one_other_image_are(capsys, monkeypatch, model_file, image, tmp_path):
    broken = not_an_image(tmp_path / "notes.jpg")
    done = mvit(capsys, monkeypatch, "attention", "-m", model_file, image, broken, "--out", tmp_path / "maps")
    assert done.code == 1 and f"1 of 2 images could not be read (see above); maps for the other image are in {tmp_path / 'maps'}" in done.stderr


# ---- 4. long paths at 80 columns -----------------------------------------------------------------------------


def test_shorten_path_keeps_the_file_name_and_elides_the_middle_of_the_folders():
    path = "/data/clinic/archive/2023/dermoscopy/exports/batch-07/lesion_0001.jpg"
    short = shorten_path(path, 40)
    assert len(short) == 40 and short.startswith("/data/clini") and short.endswith("/batch-07/lesion_0001.jpg") and "…" in short
    assert shorten_path(path, 10) == "…/lesion_0001.jpg"  # no room for folders: the name whole all the same
    assert shorten_path(path, len(path)) == path and shorten_path("lesion.jpg", 3) == "lesion.jpg"


def test_a_deep_path_takes_at_most_two_lines_of_an_80_column_table(model_file, tmp_path):
    deep = tmp_path.joinpath(*"a very long nested folder structure for the lesion images of the clinic archive".split())
    image = write_image(deep / "lesion_0001.jpg")
    done = run_mvit("predict", "-m", str(model_file), "-H", "mel", str(image), env={"COLUMNS": "80"})
    assert done.code == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    body = lines[lines.index(next(line for line in lines if line.startswith("┡"))) + 1:-1]  # between the rules
    assert 1 <= len(body) <= 2 and "…" in done.stdout
    assert "lesion_0001.jpg" in "".join(line.split("│")[1].strip() for line in body)  # the file name, whole


# ---- 5. did you mean ------------------------------------------------------------------------------------


def test_a_mistyped_head_gets_the_name_it_most_likely_means(capsys, monkeypatch, model_file, image):
    done = mvit(capsys, monkeypatch, "predict", "-m", model_file, "-H", "dermel", image)
    assert done.code == 2
    assert done.stderr == ("error: this model has no head 'dermel' (it has: mel, three, dermmel, ham10000); "
                           "did you mean 'dermmel'?\n")
    with pytest.raises(UnknownHeadError, match=r"did you mean 'ham10000'\?$"):
        load_model(model_file).predict([image], head="ham1000")
    far = mvit(capsys, monkeypatch, "predict", "-m", model_file, "-H", "nope", image)
    assert "did you mean" not in far.stderr and "mvit train" in far.stderr  # nothing close: what to do instead
