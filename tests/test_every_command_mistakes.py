"""The README's promise across every command: a user mistake is one sentence on stderr and a
non-zero exit status, never a traceback, and nothing on stdout.

Each command of `mvit --help` meets its typical mistakes through the real command line: a missing
file, a wrong folder, an unknown head or dataset, an invalid option value, a broken image, an invalid
config or --set, an output path under a regular file, a full disk. Click's own usage errors (unknown
option, value out of range, missing argument) are held to the same rule.

Each case is its own process, with its own streams and exit status, running `mvit.cli.app.main` as
the `mvit` entry point does; they are forked from one driver process that has imported mvit and
torch once, since importing torch afresh for each of some fifty cases would take minutes here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clirun import run_mvit
from datasets_factory import make_dermmel, write_image
from inference_models import saved_model
from training_data import write_tiny_config

DRIVER = r'''
import json, os, sys, traceback
cases, results_file, scratch = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
from mvit.cli import app
import mvit.core.model_file, mvit.infer.predict, mvit.evaluate.report, mvit.train.trainer, mvit.train.extract  # noqa
results = {}
for k, (name, argv) in enumerate(cases.items()):
    out, err = os.path.join(scratch, f"{k}.out"), os.path.join(scratch, f"{k}.err")
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the case: a process of its own, streams to files, the exit status its own
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["mvit", *argv]
        code = 0
        try:
            app.main()
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException:
            traceback.print_exc()  # what the interpreter prints for an uncaught exception
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    results[name] = {"code": os.waitstatus_to_exitcode(status), "stdout": open(out).read(), "stderr": open(err).read()}
json.dump(results, open(results_file, "w"))
'''

def mistakes(tmp: Path) -> dict[str, list[str]]:
    """Each command's typical mistakes, in files made under `tmp`."""
    model = str(saved_model(tmp))
    image = str(write_image(tmp / "lesion.jpg", size=(40, 30)))
    (tmp / "broken.jpg").write_text("these are not the pixels you are looking for\n")
    (tmp / "empty").mkdir()
    a_file = tmp / "a-file"
    a_file.write_text("a regular file, where a folder is expected\n")
    data = make_dermmel(tmp / "data")
    config = write_tiny_config(tmp / "config.toml", data, output=tmp / "run", preprocessing={"crop_fraction": None})
    (tmp / "not-toml.toml").write_text("this is [not toml\n")
    (tmp / "unknown-field.toml").write_text(config.read_text() + "\n[nonsense]\nx = 1\n")
    missing, broken, empty = str(tmp / "missing"), str(tmp / "broken.jpg"), str(tmp / "empty")
    maps, report, gated = str(tmp / "maps"), str(tmp / "report"), str(tmp / "gated.safetensors")
    under_file = lambda name: str(a_file / name)  # noqa: E731
    cases = {
        "plugins: invalid --format": ["plugins", "--format", "yaml"],
        "plugins: unknown option": ["plugins", "--verbose"],
        "data check: unknown dataset": ["data", "check", "dermml", "--root", str(data)],
        "data check: missing folder": ["data", "check", "dermmel", "--root", missing],
        "data check: wrong folder": ["data", "check", "dermmel", "--root", empty],
        "data check: a file as the folder": ["data", "check", "dermmel", "--root", str(a_file)],
        "data check: missing --root": ["data", "check", "dermmel"],
        "data leaks: no NAME=DIR": ["data", "leaks", "dermmel"],
        "data leaks: unknown dataset": ["data", "leaks", f"dermml={data}"],
        "data leaks: missing folder": ["data", "leaks", f"dermmel={missing}"],
        "predict: missing image": ["predict", "-m", model, missing + ".jpg"],
        "predict: folder without images": ["predict", "-m", model, empty],
        "predict: broken image": ["predict", "-m", model, broken],
        "predict: unknown head": ["predict", "-m", model, "-H", "dermml", image],
        "predict: threshold out of range": ["predict", "-m", model, "--threshold", "1.5", image],
        "predict: threshold on multi-class head": ["predict", "-m", model, "-H", "ham10000", "--threshold", "0.3", image],
        "predict: unknown device": ["predict", "-m", model, "--device", "gpu7", image],
        "predict: missing model file": ["predict", "-m", missing + ".safetensors", image],
        "predict: an image as the model file": ["predict", "-m", image, image],
        "predict: unknown output suffix": ["predict", "-m", model, "-o", str(tmp / "out.txt"), image],
        "predict: output under a regular file": ["predict", "-m", model, "-o", under_file("out.csv"), image],
        "predict: output a folder": ["predict", "-m", model, "-o", empty, "-f", "csv", image],
        "predict: abstain without a gate": ["predict", "-m", model, "--abstain", image],
        "predict: no arguments": ["predict"],
        "attention: missing image": ["attention", "-m", model, "-o", maps, missing + ".jpg"],
        "attention: broken image": ["attention", "-m", model, "-o", maps, broken],
        "attention: unknown head": ["attention", "-m", model, "-H", "dermml", "-o", maps, image],
        "attention: unknown class": ["attention", "-m", model, "-H", "dermmel", "--class", "nevus", "-o", maps, image],
        "attention: output under a regular file": ["attention", "-m", model, "-o", under_file("maps"), image],
        "attention: --max-size too small": ["attention", "-m", model, "--max-size", "4", "-o", maps, image],
        "evaluate: unknown head": ["evaluate", "-m", model, "-H", "dermml", "--root", str(data), "--out", report],
        "evaluate: missing folder": ["evaluate", "-m", model, "-H", "dermmel", "--root", missing, "--out", report],
        "evaluate: wrong folder": ["evaluate", "-m", model, "-H", "dermmel", "--root", empty, "--out", report],
        "evaluate: unknown split": ["evaluate", "-m", model, "-H", "dermmel", "--root", str(data), "--split", "tests", "--out", report],
        "evaluate: unknown dataset": ["evaluate", "-m", model, "-H", "dermmel", "-d", "dermml", "--root", str(data), "--out", report],
        "evaluate: output under a regular file": ["evaluate", "-m", model, "-H", "dermmel", "--root", str(data), "--out", under_file("report")],
        "calibrate: unknown dataset": ["calibrate", "-m", model, "-d", "dermml", "--root", str(data), "-o", gated],
        "calibrate: a --root per --dataset": ["calibrate", "-m", model, "-d", "dermmel", "-d", "ham10000", "--root", str(data), "-o", gated],
        "calibrate: --accept out of range": ["calibrate", "-m", model, "-d", "dermmel", "--root", str(data), "--accept", "2", "-o", gated],
        "calibrate: missing folder": ["calibrate", "-m", model, "-d", "dermmel", "--root", missing, "-o", gated],
        "calibrate: output under a regular file": ["calibrate", "-m", model, "-d", "dermmel", "--root", str(data), "-o", under_file("g.safetensors")],
        "train: missing config": ["train", missing + ".toml"],
        "train: not TOML": ["train", str(tmp / "not-toml.toml")],
        "train: unknown config field": ["train", str(tmp / "unknown-field.toml")],
        "train: --set without =": ["train", str(config), "--set", "epochs"],
        "train: --set invalid value": ["train", str(config), "--set", "training.epochs=many"],
        "train: --resume missing folder": ["train", "--resume", missing],
        "train: --resume a file": ["train", "--resume", str(a_file)],
        "train: config and --resume": ["train", str(config), "--resume", str(tmp)],
        "train: output under a regular file": ["train", str(config), "--output", under_file("run")],
        "extract: missing config": ["extract", missing + ".toml"],
        "extract: --set unknown field": ["extract", str(config), "--set", "training.nope=1"],
        "extract: cache under a regular file": ["extract", str(config), "--cache", under_file("features.h5")],
        "export: invalid --format": ["export", model, "--format", "tflite", "-o", str(tmp / "m.onnx")],
        "export: unknown head": ["export", model, "-H", "dermml", "-o", str(tmp / "m.onnx")],
        "export: missing model file": ["export", missing + ".safetensors", "-o", str(tmp / "m.onnx")],
        "export: output under a regular file": ["export", model, "-o", under_file("m.onnx")],
        "adapt: missing labels file": ["adapt", "-m", model, "--site", "a", "--labels", missing + ".csv", "-o", str(tmp / "a.safetensors")],
        "adapt: invalid site name": ["adapt", "-m", model, "--site", "Clinic A", "--labels", missing + ".csv", "-o", str(tmp / "a.safetensors")],
        "adapt: output under a regular file": ["adapt", "-m", model, "--site", "a", "--labels", missing + ".csv", "-o", under_file("a.safetensors")],
        "predict: unknown site": ["predict", "-m", model, "--site", "clinic-a", image],
        "info: missing model file": ["info", missing + ".safetensors"],
        "info: an image as the model file": ["info", image],
        "serve: any address but loopback without a token": ["serve", "-m", model, "--host", "0.0.0.0", "--port", "0"],
        "serve: a token too short to guess-proof": ["serve", "-m", model, "--token", "secret", "--port", "0"],
        "serve: port in use": ["serve", "-m", model, "--port", str(_busy_port())],
        "serve: port out of range": ["serve", "-m", model, "--port", "70000"],
        "serve: missing model file": ["serve", "-m", missing + ".safetensors", "--port", "0"],
        "serve: batches larger than the queue": ["serve", "-m", model, "--max-batch", "64", "--max-queue", "8", "--port", "0"],
        "serve: invalid --log-level": ["serve", "-m", model, "--log-level", "loud", "--port", "0"],
    }
    if Path("/dev/full").exists():  # writing there fails with "no space left on device"
        cases["predict: disk full"] = ["predict", "-m", model, "-f", "csv", "-o", "/dev/full", image]
    return cases


_HELD: list[socket.socket] = []  # listening until the tests end


def _busy_port() -> int:
    """A loopback port another program listens on."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    _HELD.append(held)
    return held.getsockname()[1]


def commands_of_help() -> set[str]:
    listed = run_mvit("--help").stdout
    found = {line.split()[1] for line in listed.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
    return found - {"--help"}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mistakes")
    cases = mistakes(tmp)
    (tmp / "cases.json").write_text(json.dumps(cases))
    (tmp / "driver.py").write_text(DRIVER)
    (tmp / "scratch").mkdir()
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, str(tmp / "driver.py"), str(tmp / "cases.json"), str(tmp / "results.json"), str(tmp / "scratch")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return cases, json.loads((tmp / "results.json").read_text())


def test_every_command_of_the_help_meets_its_mistakes(outcomes):
    cases, _ = outcomes
    tried = {name.split(":")[0] for name in cases}
    assert commands_of_help() - {"data"} <= tried
    assert {"data check", "data leaks"} <= tried


def test_each_mistake_is_one_sentence_on_stderr_a_non_zero_exit_and_no_traceback(outcomes):
    _, results = outcomes
    wrong = {}
    for name, result in results.items():
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        if (
            result["code"] == 0
            or "Traceback" in result["stderr"]
            or result["stdout"]
            or len(lines) != 1
            or not lines[0].startswith("error: ")
        ):
            wrong[name] = result
    assert not wrong, json.dumps(wrong, indent=1)
