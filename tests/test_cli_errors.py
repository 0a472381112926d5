"""What the command line prints when things go wrong, or when names are odd: one safe line, never
markup, never a terminal control sequence; the one error boundary; stdin as an input; and the
note on heads that were not calibrated for the model."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from clirun import call_mvit, run_mvit
from datasets_factory import write_image
from inference_models import plugin_heads_model, saved_model
import mvit
from mvit.cli.app import os_error_sentence
from mvit.cli.output import printable
from mvit.core import model_file as model_files

CLEAR = "\x1b[2J"  # clear the screen


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("model"))


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_printable_shows_control_characters_and_keeps_the_rest():
    assert printable(f"a{CLEAR}b\r\n\t\x07\x9b[é]病") == "a\\x1b[2Jb\\x0d\\x0a\\x09\\x07\\x9b[é]病"
    assert printable("evil\u202egnp.jpg") == "evil\\u202egnp.jpg"
    assert printable(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"  # a Latin-1 file name, not UTF-8


def test_odd_names_print_literally_in_the_table_and_the_errors_but_exactly_in_csv(model_file, tmp_path):
    folder = tmp_path / "imgs"
    write_image(folder / "[train]lesion.jpg", size=(40, 30))
    write_image(folder / f"clear{CLEAR}.jpg", size=(40, 30))
    (folder / f"[x]{CLEAR}broken.jpg").write_text("not an image")
    (folder / "a[").mkdir()
    (folder / "a[" / "]b.jpg").write_text("not an image either")  # the path holds "[/]"
    done = run_mvit("predict", "-m", str(model_file), "--device", "cpu", "-H", "dermmel", str(folder))
    assert done.code == 1 and "Traceback" not in done.stderr
    assert "\x1b" not in done.stdout + done.stderr
    assert f"{folder}/[train]lesion.jpg" in done.stdout
    assert f"{folder}/clear\\x1b[2J.jpg" in done.stdout
    assert f"error: {folder}/[x]\\x1b[2Jbroken.jpg is not an image file" in done.stderr
    assert f"error: {folder}/a[/]b.jpg is not an image file" in done.stderr
    as_csv = run_mvit("predict", "-m", str(model_file), "--device", "cpu", "-H", "dermmel", "-f", "csv", str(folder))
    assert f"{folder}/clear{CLEAR}.jpg,dermmel," in as_csv.stdout  # data for programs stays exact


def test_an_error_naming_a_path_with_markup_is_one_literal_line(tmp_path):
    image = write_image(tmp_path / "lesion.jpg", size=(40, 30))
    for name in ("x[/]y/model.safetensors", "[train]/model.safetensors", f"clear{CLEAR}.safetensors"):
        done = run_mvit("predict", "-m", str(tmp_path / name), str(image))
        assert done.code == 2 and "Traceback" not in done.stderr and "\x1b" not in done.stderr
        assert lines(done.stderr) == [f"error: no model file at {printable(tmp_path / name)}"]


@pytest.mark.parametrize("spelling", ["-", "/dev/stdin"])
def test_an_image_piped_on_stdin_is_predicted_and_named_as_given(model_file, tmp_path, spelling):
    image = write_image(tmp_path / "lesion.jpg", size=(40, 30))
    done = subprocess.run(
        [sys.executable, "-m", "mvit", "predict", "-m", str(model_file), "--device", "cpu", "-H", "dermmel", "-f", "json", spelling],
        input=image.read_bytes(), capture_output=True, env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr.decode()
    [record] = json.loads(done.stdout)
    [expected] = mvit.load(model_file).predict(image, head="dermmel")
    assert record["image"] == spelling
    assert record["probabilities"] == pytest.approx(dict(expected.probabilities), abs=1e-6)


def test_broken_bytes_on_stdin_are_one_sentence(model_file):
    done = subprocess.run(
        [sys.executable, "-m", "mvit", "predict", "-m", str(model_file), "--device", "cpu", "-"],
        input=b"not an image", capture_output=True, text=False,
    )
    stderr = done.stderr.decode()
    assert done.returncode == 1 and not done.stdout
    assert lines(stderr) == ["error: the image on standard input (-) is not an image file mvit can read (JPEG, PNG, BMP, TIFF ...)"]


def test_stdin_from_a_terminal_says_to_pipe_an_image(model_file):
    pty = pytest.importorskip("pty")
    parent, child = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "mvit", "predict", "-m", str(model_file), "-"],
                              stdin=child, capture_output=True, text=True, timeout=120)
    finally:
        os.close(parent)
        os.close(child)
    assert done.returncode == 2 and lines(done.stderr) == [
        "error: - stands for one image piped in on standard input, and none is: "
        "pipe one (mvit predict - < lesion.jpg) or name the image file"
    ]


def test_predict_notes_once_on_stderr_which_heads_were_not_calibrated(tmp_path):
    images = [str(write_image(tmp_path / f"lesion{k}.jpg", size=(40, 30))) for k in range(3)]
    model = plugin_heads_model()
    model.update_head("dermmel", calibrated=True, temperature=1.5, threshold=0.4, threshold_target="sensitivity >= 0.90 on valid")
    path = model_files.save(model, tmp_path / "model.safetensors")
    done = run_mvit("predict", "-m", str(path), "--device", "cpu", "-H", "dermmel", "-H", "ham10000", "-f", "json", *images)
    assert done.code == 0, done.stderr
    assert len(json.loads(done.stdout)) == 6  # stdout is the JSON only
    assert lines(done.stderr) == [
        "note: head ham10000 was not calibrated for this model: its probabilities are not temperature-scaled"
    ]
    (tmp_path / "plain").mkdir()
    binary = run_mvit("predict", "-m", str(saved_model(tmp_path / "plain")), "--device", "cpu", "-H", "dermmel", images[0])
    assert lines(binary.stderr) == [
        "note: head dermmel was not calibrated for this model: its probabilities are not temperature-scaled "
        "and it decides at the default threshold 0.5"
    ]
    calibrated = run_mvit("predict", "-m", str(path), "--device", "cpu", "-H", "dermmel", images[0])
    assert calibrated.code == 0 and "note" not in calibrated.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_while_writing_is_one_sentence_naming_the_file(model_file, tmp_path):
    image = write_image(tmp_path / "lesion.jpg", size=(40, 30))
    done = run_mvit("predict", "-m", str(model_file), "--device", "cpu", "-f", "csv", "-o", "/dev/full", str(image))
    assert done.code == 3 and lines(done.stderr) == [  # a full disk's own exit status
        "error: no space left on the device (/dev/full); free some space, then run the command again"
    ]


@pytest.mark.parametrize("error, sentence", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/run"), "permission denied: /data/run; check its permissions, or choose another location"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/out.csv"), "/data/out.csv is a folder where a file is needed; name a file"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file/run"), "/data/file/run is not a folder, or a part of it is a file; choose another path"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/none"), "/data/none does not exist, or its folder does not; check the path"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/best.safetensors"), "no space left on the device (/data/best.safetensors); free some space, then run the command again"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), "/mnt/ro/run is on a read-only file system; choose a location you can write to"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/home/me/run"), "disk quota exceeded (/home/me/run); free some space or raise the quota, then run the command again"),
    (OSError(errno.EROFS, "Unable to create file (unable to open file: name = '/mnt/ro/f.h5', errno = 30)"), "/mnt/ro/f.h5 is on a read-only file system; choose a location you can write to"),
    (OSError(errno.EIO, "Input/output error"), None),  # no path, nothing the user can do: a traceback
    (PermissionError(errno.EACCES, "Permission denied"), None),
])
def test_the_boundary_words_each_operating_system_refusal(error, sentence):
    assert os_error_sentence(error) == sentence


def test_the_boundary_turns_an_os_refusal_into_one_line_and_keeps_a_bugs_traceback(capsys, monkeypatch):
    from mvit.registry import manager

    def refused():
        raise PermissionError(errno.EACCES, "Permission denied", "/etc/mvit/plugins.toml")

    monkeypatch.setattr(manager, "registry", refused)
    done = call_mvit(capsys, monkeypatch, "plugins")
    assert done.code == 1 and lines(done.stderr) == [
        "error: permission denied: /etc/mvit/plugins.toml; check its permissions, or choose another location"
    ]

    def bug():
        raise RuntimeError("a bug in mvit")

    monkeypatch.setattr(manager, "registry", bug)
    with pytest.raises(RuntimeError, match="a bug in mvit"):
        call_mvit(capsys, monkeypatch, "plugins")


def test_a_usage_mistake_is_one_line_naming_the_help():
    done = run_mvit("predict", "--format", "[/]", "x.jpg")
    assert done.code == 2 and not done.stdout
    assert lines(done.stderr) == ["error: Invalid value for '--format' / '-f': '[/]' is not one of 'table', 'json', 'csv'; "
                                  "see `python -m mvit predict --help`"]
