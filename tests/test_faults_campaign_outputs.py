"""Issue 20's fault campaign, items 4, 6 and 7: what a command writes, a server under slow clients,
and settings that train checks as predict does.

(4) `predict --output`, `calibrate --output` and the training curves are written aside and renamed
into place: Ctrl-C, SIGTERM, a full disk or a second writer never leave half a file under the final
name, and the temporary files go with the failure; a full disk has its own exit status, 3.
(6) `mvit serve`: a body that stalls gets 408 and frees its place in the queue, one client address
holds at most --max-client-requests uploads (429 above), a wrong Host and a form cut before its
closing boundary are refused in JSON, 400.
(7) a training config that is not UTF-8, negative workers, a device that is not there, a plugin
loader that returns dicts and a torchrun environment torchrun did not set are one sentence each.
docs/reliability.md lists the same faults and promises.
"""

from __future__ import annotations

import csv
import errno
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import httpx
import torch

from clirun import call_mvit, run_mvit
from datasets_factory import ham_rows, make_ham10000, write_image
from inference_models import plugin_heads_model, saved_model
from mvit.cli import predict as predict_cli
from mvit.errors import PluginError
from mvit.core import model_file
from mvit.registry import DatasetSpec, hookimpl, manager
from mvit.datasets.records import load_samples
from serving import start_server
from training_data import make_learnable_dermmel, write_tiny_config

OLD = "the previous run's predictions, which must stay whole\n"


def images(folder: Path, count: int) -> list[Path]:
    return [write_image(folder / f"lesion{k:03d}.jpg", size=(40, 30)) for k in range(count)]


def beside(path: Path) -> list[str]:
    """Every entry of `path`'s folder other than the inputs: what a write left there."""
    return sorted(entry.name for entry in path.parent.iterdir() if entry.name.startswith(".") or entry.name == path.name)


@pytest.fixture
def setup(tmp_path):
    out = tmp_path / "out" / "predictions.csv"
    out.parent.mkdir()
    out.write_text(OLD)
    return saved_model(tmp_path), images(tmp_path / "images", 6), out


def _failing_after_one_record(monkeypatch, failure: BaseException) -> None:
    """The writer fails (a full disk, Ctrl-C) after it has written some rows to the file."""
    add = predict_cli._PredictionWriter.add
    calls = []

    def add_then_fail(self, predictions):
        calls.append(1)
        if len(calls) == 2:
            self.sink.flush()  # some rows are on disk: under the final name, before the fix
            raise failure
        add(self, predictions)

    monkeypatch.setattr(predict_cli._PredictionWriter, "add", add_then_fail)


def test_ctrl_c_during_predict_leaves_the_previous_output_whole_and_no_partial(setup, capsys, monkeypatch):
    model, inputs, out = setup
    _failing_after_one_record(monkeypatch, KeyboardInterrupt())
    done = call_mvit(capsys, monkeypatch, "predict", "-m", str(model), "-o", str(out), *map(str, inputs))
    assert done.code == 130 and "Traceback" not in done.stderr
    assert out.read_text() == OLD
    assert beside(out) == [out.name]


def test_a_full_disk_during_predict_is_exit_3_one_sentence_and_no_partial(setup, capsys, monkeypatch):
    model, inputs, out = setup
    _failing_after_one_record(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    done = call_mvit(capsys, monkeypatch, "predict", "-m", str(model), "-o", str(out), *map(str, inputs))
    assert done.code == 3, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: no space left on the device ({out}); free some space, then run the command again"
    ]
    assert out.read_text() == OLD
    assert beside(out) == [out.name]


def test_predict_with_a_failed_image_still_renames_its_output_into_place(setup, capsys, monkeypatch):
    model, inputs, out = setup
    broken = inputs[0].with_name("broken.jpg")
    broken.write_bytes(b"not an image")
    done = call_mvit(capsys, monkeypatch, "predict", "-m", str(model), "-H", "dermmel", "-o", str(out), *map(str, [*inputs, broken]))
    assert done.code == 1
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [row["image"] for row in rows] == list(map(str, inputs))  # the broken image's rows are simply absent
    assert beside(out) == [out.name]


def _predict_process(model: Path, inputs: list[Path], out: Path) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "mvit", "predict", "-m", str(model), "-H", "dermmel", "--batch-size", "1",
                             "--workers", "0", "-o", str(out), *map(str, inputs)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_sigterm_during_predict_leaves_the_previous_output_whole_and_no_partial(tmp_path):
    model, out = saved_model(tmp_path), tmp_path / "out" / "predictions.csv"
    out.parent.mkdir()
    out.write_text(OLD)
    inputs = images(tmp_path / "images", 400)
    process = _predict_process(model, inputs, out)
    # wait until it writes: its partial is there, or (before the fix) the final file was truncated
    while process.poll() is None and not any(out.parent.glob(".*.partial")) and out.read_text() == OLD:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.wait(120)
    finished = process.returncode == 0  # it may have finished first: then the output is complete
    text = out.read_text()
    if finished:
        assert len(list(csv.DictReader(io.StringIO(text)))) == len(inputs)
    else:
        assert text == OLD, process.stderr.read()[-2000:]
    assert beside(out) == [out.name]


@pytest.mark.slow
def test_two_predicts_into_one_output_leave_one_run_whole(tmp_path):
    model, out = saved_model(tmp_path), tmp_path / "out" / "predictions.csv"
    out.parent.mkdir()
    first, second = images(tmp_path / "a", 60), images(tmp_path / "b", 45)
    runs = [_predict_process(model, first, out), _predict_process(model, second, out)]
    assert [run.wait(300) for run in runs] == [0, 0], [run.stderr.read()[-2000:] for run in runs]
    rows = [row["image"] for row in csv.DictReader(io.StringIO(out.read_text()))]
    assert rows in (list(map(str, first)), list(map(str, second)))  # the last rename wins, never a mixture
    assert beside(out) == [out.name]


def test_an_interrupted_calibrate_leaves_no_temporary_file_beside_the_model(capsys, monkeypatch, tmp_path):
    import safetensors.torch

    source = model_file.save(plugin_heads_model(), tmp_path / "model.safetensors", provenance={"splits": {"ham10000": {"seed": 3}}})
    root = make_ham10000(tmp_path / "ham", ham_rows(per_class=4, images_per_lesion=1))
    out = tmp_path / "out" / "gated.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"an earlier gated model")
    save_file = safetensors.torch.save_file

    def interrupted(tensors, filename, metadata=None):
        # safetensors writes a `.tmpXXXX` beside the file it is given, then renames it: Ctrl-C or
        # SIGTERM on the way leaves that temporary behind
        save_file(tensors, str(Path(filename).with_name(".tmpAbC123")), metadata=metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    done = call_mvit(capsys, monkeypatch, "calibrate", "-m", str(source), "--dataset", "ham10000", "--root", str(root),
                     "--output", str(out), "--device", "cpu")
    assert done.code == 130 and "Traceback" not in done.stderr
    assert out.read_bytes() == b"an earlier gated model"
    assert sorted(entry.name for entry in out.parent.iterdir()) == [out.name]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_the_training_curves_are_named_once_and_leave_nothing_when_their_write_fails(tmp_path, monkeypatch, failure):
    from matplotlib.figure import Figure

    from mvit.errors import DiskFull
    from mvit.train.run_folder import RunFolder

    history = [{"epoch": e, "unfrozen": 0, "heads": {"mel": {s: {"loss": 1.0 / (e + 1), "balanced_accuracy": 0.5} for s in ("train", "valid")}}}
               for e in range(2)]
    run = tmp_path / "run"
    run.mkdir()
    folder = RunFolder(run)
    names = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: (names.append(Path(path).relative_to(run)), savefig(fig, path, **kw)))
    folder.plot(history, "balanced_accuracy")
    assert sorted(p.name for p in run.iterdir()) == ["curves.png"]
    assert names == [Path(f".curves.png.{os.getpid()}.partial", "curves.png")]  # one temporary name, not a partial of a partial
    before = (run / "curves.png").read_bytes()

    def fails(fig, path, **kw):
        Path(path).write_bytes(b"half a PNG")
        raise failure

    monkeypatch.setattr(Figure, "savefig", fails)
    with pytest.raises(DiskFull if isinstance(failure, OSError) else KeyboardInterrupt):
        folder.plot(history, "balanced_accuracy")
    assert sorted(p.name for p in run.iterdir()) == ["curves.png"]
    assert (run / "curves.png").read_bytes() == before


# ---- (7) settings train checks as predict does --------------------------------------------------


@pytest.fixture
def config_file(tmp_path):
    root = make_learnable_dermmel(tmp_path / "data", per_class_train=4, per_class_eval=2)
    return write_tiny_config(tmp_path / "c.toml", root)


def _one_sentence(done, *words: str) -> str:
    assert done.code == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), done.stderr
    assert "Value error" not in errors[0]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_a_config_that_is_not_utf8_is_one_sentence(config_file, capsys, monkeypatch):
    config_file.write_bytes(config_file.read_bytes() + b'\n# caf\xe9 au lait\n')
    for command in (["train", str(config_file)], ["extract", str(config_file)]):
        _one_sentence(call_mvit(capsys, monkeypatch, *command), str(config_file), "UTF-8")


@pytest.mark.parametrize("setting, words", [
    ("runtime.workers=-1", ["--set runtime.workers=-1", "runtime.workers", "0", "auto"]),
    ('runtime.device="tpu"', ["runtime.device", "'tpu' is not a device", "cpu"]),
    ('runtime.device="cuda:x"', ["runtime.device", "not a device"]),
    # written where configs before [runtime] had it: still read, and named as written
    ("training.workers=-1", ["--set training.workers=-1", "training.workers", "0", "auto"]),
])
def test_training_settings_are_checked_when_the_config_is_read(config_file, capsys, monkeypatch, setting, words):
    for command in ("train", "extract"):
        _one_sentence(call_mvit(capsys, monkeypatch, command, str(config_file), "--set", setting), *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a host without a CUDA GPU")
def test_cuda_on_a_host_without_a_gpu_is_one_sentence_naming_the_field(config_file, capsys, monkeypatch):
    done = call_mvit(capsys, monkeypatch, "train", str(config_file), "--set", 'runtime.device="cuda"')
    _one_sentence(done, "runtime.device", "CUDA GPU", "use cpu")
    done = call_mvit(capsys, monkeypatch, "train", str(config_file), "--device", "cuda:1")
    _one_sentence(done, "runtime.device")


class _DictsPlugin:
    """A plugin whose loader returns dicts where `Sample`s belong: a plugin author's mistake."""

    @hookimpl
    def register_datasets(self, register):
        register(DatasetSpec(name="dicts", title="dicts", labels=("a", "b"),
                             load=lambda root: [{"path": p, "label": p.parent.name} for p in sorted(root.glob("*/*.jpg"))]))


def test_a_plugin_loader_that_returns_dicts_is_one_sentence_naming_the_plugin(tmp_path):
    for label in ("a", "b"):
        for k in range(3):
            write_image(tmp_path / "d" / label / f"{label}{k}.jpg", size=(40, 30))
    with manager.temporary_plugins(_DictsPlugin()):
        with pytest.raises(PluginError) as raised:
            load_samples("dicts", tmp_path / "d")
    sentence = str(raised.value)
    assert "\n" not in sentence and "dicts loader of plugin" in sentence and "dict where a mvit.registry.Sample belongs" in sentence


@pytest.mark.parametrize("environment, words", [
    ({"WORLD_SIZE": "abc"}, ["WORLD_SIZE is 'abc', not a whole number", "torchrun"]),
    ({"WORLD_SIZE": "2", "RANK": "zz"}, ["RANK is 'zz', not a whole number"]),
    ({"WORLD_SIZE": "2"}, ["WORLD_SIZE is 2 but RANK is not set"]),
    ({"WORLD_SIZE": "2", "RANK": "5"}, ["RANK is 5, outside 0 to 1"]),
])
def test_a_torchrun_environment_torchrun_did_not_set_is_one_sentence(config_file, tmp_path, environment, words):
    image = write_image(tmp_path / "lesion.jpg", size=(40, 30))
    for command in (["predict", "-m", str(saved_model(tmp_path)), str(image)], ["train", str(config_file)]):
        done = run_mvit(*command, env=environment)
        _one_sentence(done, *words)


# ---- (6) `mvit serve` under clients that stall -----------------------------------------------------


def _stalled(server, image: Path, *, size_claimed: int = 0) -> socket.socket:
    """A connection that sends a predict request's headers and a few bytes of its body, then stalls."""
    body = (b"--xyz\r\nContent-Disposition: form-data; name=\"images\"; filename=\"slow.jpg\"\r\n\r\n"
            + image.read_bytes() + b"\r\n--xyz--\r\n")
    host, port = server.url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)))
    connection.settimeout(120)
    connection.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
                       + f"Content-Length: {size_claimed or len(body)}\r\n\r\n".encode() + body[:100])
    return connection


def _answer(connection: socket.socket) -> tuple[int, dict, dict]:
    """The status, headers and JSON body of the answer on a raw connection."""
    response = http.client.HTTPResponse(connection)
    response.begin()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())


def _waiting(server) -> int:
    return server.client.get("/healthz").json()["waiting_images"]


def _until(condition) -> None:
    """Wait for `condition()`: it holds once the server has handled what the test sent (no time is asserted)."""
    for _ in range(1200):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("the server never got there")


def _predict_ok(client, image: Path) -> None:
    answer = client.post("/v1/predict", files=[("images", ("a.jpg", image.read_bytes(), "image/jpeg"))], data={"head": "dermmel"})
    assert answer.status_code == 200, answer.text


@pytest.mark.slow
def test_stalled_uploads_get_408_and_free_the_queue(tmp_path):
    model, image = saved_model(tmp_path), write_image(tmp_path / "lesion.jpg", size=(48, 40))
    server = start_server("--model", str(model), "--max-queue", "4", "--max-batch", "4", "--body-timeout-s", "1", log=tmp_path / "log")
    try:
        stalled = [_stalled(server, image) for _ in range(6)]  # more than the queue holds
        for connection in stalled:
            status, headers, body = _answer(connection)
            assert status in (408, 503), body
            assert list(body) == ["error"]
            if status == 408:
                assert "did not arrive within 1 s" in body["error"]
            connection.close()
        assert _waiting(server) == 0  # every place they held is free again
        _predict_ok(server.client, image)
    finally:
        server.stop()


@pytest.mark.slow
def test_one_client_cannot_hold_every_upload_slot(tmp_path):
    model, image = saved_model(tmp_path), write_image(tmp_path / "lesion.jpg", size=(48, 40))
    server = start_server("--model", str(model), "--max-client-requests", "2", "--body-timeout-s", "600", log=tmp_path / "log")
    stalled = []
    try:
        stalled = [_stalled(server, image) for _ in range(2)]
        _until(lambda: _waiting(server) == 2)
        refused = server.client.post("/v1/predict", files=[("images", ("a.jpg", image.read_bytes(), "image/jpeg"))])
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert list(refused.json()) == ["error"] and "2 requests in flight" in refused.json()["error"]
        # another client (another loopback address) is answered meanwhile
        with httpx.Client(base_url=server.url, timeout=60, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
            _predict_ok(other, image)
        for connection in stalled:
            connection.close()
        _until(lambda: _waiting(server) == 0)
        _predict_ok(server.client, image)
    finally:
        for connection in stalled:
            connection.close()
        server.stop()


@pytest.mark.slow
def test_a_wrong_host_and_a_cut_form_are_refused_in_json(tmp_path):
    model, image = saved_model(tmp_path), write_image(tmp_path / "lesion.jpg", size=(48, 40))
    server = start_server("--model", str(model), log=tmp_path / "log")
    try:
        wrong = server.client.get("/healthz", headers={"Host": "rebound.example"})
        assert wrong.status_code == 400 and list(wrong.json()) == ["error"]
        assert "rebound.example" in wrong.json()["error"] and "--allowed-host" in wrong.json()["error"]
        part = (b"--xyz\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n\r\n" + image.read_bytes())
        for cut in (part, part + b"\r\n--xyz\r\n"):  # no closing boundary: the last part is cut short
            answer = server.client.post("/v1/predict", content=cut, headers={"Content-Type": "multipart/form-data; boundary=xyz"})
            assert answer.status_code == 400, answer.text
            assert list(answer.json()) == ["error"] and "closing boundary" in answer.json()["error"]
        _predict_ok(server.client, image)
    finally:
        server.stop()
