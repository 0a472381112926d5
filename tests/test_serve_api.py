"""`mvit serve` as a real server process on a loopback port: every endpoint, hostile uploads, the
limits, the token, batching, slow clients and a graceful stop, with the server still answering
correctly after each abuse."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="`mvit serve` needs the serve extra")
httpx = pytest.importorskip("httpx")

from bad_images import decompression_bomb, not_an_image, truncated_jpeg, zero_bytes  # noqa: E402
from clirun import run_mvit  # noqa: E402
from datasets_factory import write_image  # noqa: E402
from inference_models import saved_model  # noqa: E402
from serving import start_server  # noqa: E402

pytestmark = pytest.mark.slow

TOKEN = "a-token-of-at-least-16-chars"


def large_flat_image(path: Path) -> Path:
    Image.new("RGB", (1200, 1000), (180, 120, 90)).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("serve")
    return {
        "model": saved_model(folder),  # heads mel, three, dermmel (binary) and ham10000 (7 classes)
        **{f"lesion{k}.jpg": write_image(folder / f"lesion{k}.jpg", size=(48, 40)) for k in range(4)},
        "noise.png": write_image(folder / "noise.png", size=(1200, 1000)),  # about 3.6 MB
        "large.png": large_flat_image(folder / "large.png"),  # 1.2 MP in a few KB
        "cut.jpg": truncated_jpeg(folder / "cut.jpg"),
        "empty.jpg": zero_bytes(folder / "empty.jpg"),
        "notes.jpg": not_an_image(folder / "notes.jpg"),
        "bomb.png": decompression_bomb(folder / "bomb.png", side=60_000),
    }


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    # a small body limit, for the 413 test; a pixel limit between the lesions and the large noise image
    started = start_server("--model", str(files["model"]), "--max-upload-mb", "2", "--max-pixels", "1000000",
                           "--max-wait-ms", "20", log=log)
    yield started
    started.stop()


def upload(files, *names, field="images"):
    return [(field, (name, files[name].read_bytes(), "image/jpeg")) for name in names]


def predict_ok(server, files) -> list[dict]:
    """A correct answer, asked after each abuse: the server is still well."""
    answer = server.client.post("/v1/predict", files=upload(files, "lesion0.jpg", "lesion1.jpg"), data={"head": "dermmel"})
    assert answer.status_code == 200, answer.text
    records = answer.json()
    assert [(r["image"], r["head"]) for r in records] == [("lesion0.jpg", "dermmel"), ("lesion1.jpg", "dermmel")]
    return records


def assert_refused(answer: httpx.Response, status: int, *words: str) -> str:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert list(body) == ["error"]
    sentence = body["error"]
    assert "\n" not in sentence and "Traceback" not in sentence
    for word in words:
        assert word in sentence
    return sentence


# ---- the endpoints ---------------------------------------------------------------------------------


def test_health_heads_and_openapi(server, files):
    health = server.client.get("/healthz").json()
    assert health["status"] == "ok" and health["token_required"] is False
    heads = server.client.get("/v1/heads").json()
    by_name = {head["name"]: head for head in heads["heads"]}
    assert set(by_name) >= {"dermmel", "ham10000"}
    assert by_name["dermmel"]["positive"] == "melanoma" and by_name["dermmel"]["threshold"] == 0.5  # no stored one
    assert by_name["ham10000"]["threshold"] is None and len(by_name["ham10000"]["classes"]) == 7
    assert heads["gate"] is False and heads["limits"]["max_pixels"] == 1_000_000
    spec = server.client.get("/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["images"] and body["properties"]["images"]["items"]["format"] == "binary"
    assert "/v1/attention" in spec["paths"] and "/v1/heads" in spec["paths"]
    page = server.client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert server.client.head("/").status_code == 200
    for docs in ("/docs", "/redoc"):  # served from this server: they work without internet
        html = server.client.get(docs).text
        scripts = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert scripts and all(url.startswith("/") for url in scripts), scripts
        assert all(server.client.get(url).status_code == 200 for url in scripts)


def test_predict_answers_as_the_command_line_does(server, files):
    names = ["lesion0.jpg", "lesion1.jpg", "lesion2.jpg"]
    answer = server.client.post("/v1/predict", files=upload(files, *names), data={"head": ["ham10000", "dermmel"]})
    assert answer.status_code == 200, answer.text
    served = answer.json()
    command = run_mvit("predict", "--model", str(files["model"]), "--head", "ham10000", "--head", "dermmel",
                       "--format", "json", *(str(files[name]) for name in names))
    assert command.code == 0, command.stderr
    offline = json.loads(command.stdout)
    assert len(served) == len(offline) == 6
    for mine, theirs in zip(served, offline):
        assert list(mine) == list(theirs)  # the same fields, in the same order
        assert mine["image"] == Path(theirs["image"]).name
        assert (mine["head"], mine["label"], mine["threshold"]) == (theirs["head"], theirs["label"], theirs["threshold"])
        for name, probability in theirs["probabilities"].items():
            assert mine["probabilities"][name] == pytest.approx(probability, abs=1e-5)


def test_predict_with_all_heads_and_abstain_without_a_gate(server, files):
    records = server.client.post("/v1/predict", files=upload(files, "lesion3.jpg"), data={"head": "all"}).json()
    heads = [head["name"] for head in server.client.get("/v1/heads").json()["heads"]]
    assert [record["head"] for record in records] == heads and len(heads) > 2
    assert_refused(server.client.post("/v1/predict", files=upload(files, "lesion3.jpg"), data={"abstain": "true"}),
                   422, "gate")
    assert_refused(server.client.post("/v1/predict", files=upload(files, "lesion3.jpg"), data={"abstain": "maybe"}),
                   422, "abstain")


def test_attention_is_a_png_overlay_explaining_a_class(server, files):
    answer = server.client.post("/v1/attention", files=upload(files, "lesion0.jpg", field="image"), data={"head": "dermmel"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["x-mvit-class"] in ("melanoma", "not_melanoma")
    overlay = Image.open(io.BytesIO(answer.content))
    assert overlay.size == (48, 40) and overlay.mode == "RGB"
    asked = server.client.post("/v1/attention", files=upload(files, "lesion0.jpg", field="image"),
                               data={"head": "dermmel", "class": "melanoma", "map": "rollout"})
    assert asked.status_code == 200 and asked.headers["x-mvit-class"] == "melanoma"
    assert_refused(server.client.post("/v1/attention", files=upload(files, "lesion0.jpg", field="image"),
                                      data={"head": "dermmel", "class": "mole"}), 422, "'mole'", "melanoma")
    assert_refused(server.client.post("/v1/attention", files=upload(files, "lesion0.jpg", field="image"),
                                      data={"head": "dermmel", "map": "x"}), 422, "rollout")
    assert_refused(server.client.post("/v1/attention", files=upload(files, "lesion0.jpg", field="image")), 422, "`head`")


# ---- hostile and mistaken requests -------------------------------------------------------------------


@pytest.mark.parametrize("name, status, words", [
    ("cut.jpg", 422, ["cut.jpg", "damaged"]),
    ("empty.jpg", 422, ["empty.jpg", "empty"]),
    ("notes.jpg", 422, ["notes.jpg", "not an image"]),
    ("bomb.png", 413, ["bomb.png", "too large", "1,000,000 pixels"]),
    ("large.png", 413, ["large.png", "1,200 x 1,000", "1,000,000"]),  # within the body limit, over the pixel limit
])
def test_a_bad_image_is_one_sentence_and_the_server_goes_on(server, files, name, status, words):
    before = predict_ok(server, files)
    assert_refused(server.client.post("/v1/predict", files=upload(files, "lesion0.jpg", name)), status, *words)
    assert_refused(server.client.post("/v1/attention", files=upload(files, name, field="image"), data={"head": "dermmel"}),
                   status, *words)
    assert predict_ok(server, files) == before


def test_oversized_bodies_are_refused_before_they_are_read(server, files):
    big = os.urandom(3 * 2**20)
    assert_refused(server.client.post("/v1/predict", files=[("images", ("big.jpg", big, "image/jpeg"))]), 413, "2 MiB")

    def chunked():  # no Content-Length: counted as it streams in
        yield b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="big.jpg"\r\n\r\n'
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    answer = server.client.post("/v1/predict", content=chunked(),
                                headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_refused(answer, 413, "2 MiB")
    predict_ok(server, files)


def test_mistaken_requests_name_what_to_do(server, files):
    sentence = assert_refused(server.client.post("/v1/predict", files=upload(files, "lesion0.jpg"), data={"head": "ph2"}),
                              422, "'ph2'")
    assert all(head["name"] in sentence for head in server.client.get("/v1/heads").json()["heads"])  # the heads there are
    assert_refused(server.client.post("/v1/predict", data={"head": "dermmel"}, files={"other": ("x", b"x")}), 422, "`images`")
    assert_refused(server.client.post("/v1/predict", content=b"{}", headers={"content-type": "application/json"}), 415, "multipart")
    assert_refused(server.client.post("/v1/predict", content=b"garbage", headers={"content-type": "multipart/form-data"}),
                   400, "boundary")
    assert_refused(server.client.get("/v1/predict"), 405)
    assert_refused(server.client.get("/v2/predict"), 404, "/v1")
    too_many = [("images", (f"{k}.jpg", b"x", "image/jpeg")) for k in range(65)]
    assert_refused(server.client.post("/v1/predict", files=too_many), 413, "files")
    assert server.client.get("/healthz", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding
    predict_ok(server, files)


def test_uploads_stay_in_memory(files):
    """The form parser's spool never rolls over to a file on disk, even for a body of several MB."""
    from tempfile import SpooledTemporaryFile

    from fastapi.testclient import TestClient

    from mvit.core import model_file
    from mvit.serve.app import create_app
    from mvit.serve.settings import ServeSettings

    rolled = []
    original = SpooledTemporaryFile.rollover
    SpooledTemporaryFile.rollover = lambda self: rolled.append(self) or original(self)
    try:
        app = create_app(model_file.load(files["model"]), ServeSettings(max_upload_bytes=8 * 2**20))
        with TestClient(app, base_url="http://127.0.0.1") as client:
            answer = client.post("/v1/predict", files=upload(files, "noise.png", "lesion0.jpg"))
    finally:
        SpooledTemporaryFile.rollover = original
    assert answer.status_code == 200, answer.text
    assert len(files["noise.png"].read_bytes()) > 2**20 and rolled == []


# ---- load, slow clients, shutdown -----------------------------------------------------------------


def test_concurrent_requests_share_backbone_passes(files, tmp_path):
    server = start_server("--model", str(files["model"]), "--max-wait-ms", "400", "--max-batch", "16", log=tmp_path / "log")
    try:
        def one(k):
            return server.client.post("/v1/predict", files=upload(files, f"lesion{k % 4}.jpg")).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(8))) == [200] * 8
        health = server.client.get("/healthz").json()
        assert health["batched_images"] == 8 and health["batches"] < 8
    finally:
        server.stop()


def test_overload_answers_503_with_retry_after_and_nothing_else(files, tmp_path):
    server = start_server("--model", str(files["model"]), "--max-queue", "2", "--max-batch", "1", "--max-wait-ms", "0",
                          log=tmp_path / "log")
    try:
        def one(k):
            with httpx.Client(base_url=server.url, timeout=60) as client:
                return client.post("/v1/predict", files=upload(files, f"lesion{k % 4}.jpg", "noise.png"))

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(32)))
        statuses = [answer.status_code for answer in answers]
        assert set(statuses) <= {413, 503} or set(statuses) <= {200, 413, 503}
        busy = [answer for answer in answers if answer.status_code == 503]
        assert busy, statuses
        assert all(int(answer.headers["retry-after"]) >= 1 for answer in busy)
        assert_refused(busy[0], 503, "busy")
        predict_ok(server, files)
        assert server.client.get("/healthz").json()["waiting_images"] == 0  # every admission was released
    finally:
        server.stop()


def test_a_slow_client_does_not_hold_up_the_others(server, files):
    body = b"--xyz\r\nContent-Disposition: form-data; name=\"images\"; filename=\"slow.jpg\"\r\n\r\n" + files["lesion0.jpg"].read_bytes() + b"\r\n--xyz--\r\n"
    host, port = server.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)))
    try:
        slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        time.sleep(0.5)
        for _ in range(3):  # answered while the slow upload is stuck halfway
            predict_ok(server, files)
        slow.sendall(body[100:])
        answer = slow.makefile("rb").read(12)
        assert answer == b"HTTP/1.1 200"
    finally:
        slow.close()


def test_sigterm_finishes_the_requests_in_flight(files, tmp_path):
    server = start_server("--model", str(files["model"]), "--max-wait-ms", "1500", log=tmp_path / "log")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        asked = pool.submit(lambda: server.client.post("/v1/predict", files=upload(files, "lesion0.jpg", "lesion1.jpg")))
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/healthz").json()["waiting_images"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # until the request is inside the server, waiting for its batch
        server.process.send_signal(signal.SIGTERM)
        answer = asked.result(60)
    assert answer.status_code == 200 and len(answer.json()) == 2 * 4  # two images, four heads
    assert server.process.wait(60) in (0, -signal.SIGTERM)
    assert "stopped" in server.log.read_text() or server.process.returncode == -signal.SIGTERM
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=5)


# ---- the token ---------------------------------------------------------------------------------------


def test_a_token_guards_every_api_request(files, tmp_path):
    server = start_server("--model", str(files["model"]), "--token", TOKEN, log=tmp_path / "log", token=TOKEN)
    try:
        bare = httpx.Client(base_url=server.url, timeout=60)
        assert bare.get("/healthz").json()["token_required"] is True  # health and the page need no token
        assert bare.get("/").status_code == 200
        for asked in (bare.get("/v1/heads"), bare.post("/v1/predict", files=upload(files, "lesion0.jpg")),
                      bare.post("/v1/predict", files=upload(files, "lesion0.jpg"), headers={"authorization": "Bearer wrong-token-wrong-token"}),
                      bare.post("/v1/attention", files=upload(files, "lesion0.jpg", field="image"), data={"head": "dermmel"})):
            assert_refused(asked, 401, "token")
            assert asked.headers["www-authenticate"] == "Bearer"
        predict_ok(server, files)  # with the token
        bare.close()
    finally:
        server.stop()


def test_any_address_but_loopback_needs_a_token(files, tmp_path):
    refused = run_mvit("serve", "--model", str(files["model"]), "--host", "0.0.0.0", "--port", "0")
    assert refused.code == 2 and refused.stderr.startswith("error: ") and "token" in refused.stderr
    assert refused.stderr.count("\n") == 1
    server = start_server("--model", str(files["model"]), "--host", "0.0.0.0", log=tmp_path / "log",
                          env={"MVIT_SERVE_TOKEN": TOKEN}, token=TOKEN)
    try:
        server.url = server.url.replace("0.0.0.0", "127.0.0.1")
        predict_ok(server, files)
        assert httpx.post(f"{server.url}/v1/predict", files=upload(files, "lesion0.jpg")).status_code == 401
    finally:
        server.stop()


def test_several_worker_processes_answer(files, tmp_path):
    server = start_server("--model", str(files["model"]), "--workers", "2", log=tmp_path / "log")

    def started() -> int:
        return server.log.read_text().count("Application startup complete")

    try:
        deadline = time.monotonic() + 120
        while started() < 2 and time.monotonic() < deadline:  # the first may answer before the second is up
            time.sleep(0.2)
        assert len(set(re.findall(r"Started server process \[(\d+)\]", server.log.read_text()))) == 2
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: predict_ok(server, files), range(8)))
        for answer in answers:  # the same, up to the rounding that batch composition moves
            for mine, first in zip(answer, answers[0]):
                assert mine["label"] == first["label"]
                assert mine["probabilities"] == pytest.approx(first["probabilities"], abs=1e-5)
    finally:
        server.stop()
