"""docs/first-hour.md, run as written: the newcomer's path (set-up, predict with the bundled model,
a folder of their own checked, heads trained on it on the bundled model, evaluated, predicted with
and served) on generated images, so the page cannot drift from what mvit does."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from clirun import run_mvit
from serving import start_server
from training_data import paint

PAGE = Path(__file__).resolve().parents[1] / "docs" / "first-hour.md"
SET_UP = ("make install", ". .venv/bin/activate")  # what `make test` has done before this test runs


def commands() -> list[str]:
    """Every `$ ` line of the page's console blocks, in order."""
    blocks = re.findall(r"```console\n(.*?)```", PAGE.read_text(), flags=re.S)
    return [line[2:].strip() for block in blocks for line in block.splitlines() if line.startswith("$ ")]


def config() -> tuple[str, str]:
    """The page's one TOML config and the file name it is saved as."""
    text = PAGE.read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "the walkthrough holds exactly one config"
    name = re.search(r"saved as `([^`]+\.toml)`", text)
    assert name, "the walkthrough says what file the config is saved as"
    return blocks[0], name.group(1)


def test_the_page_is_a_walk_from_set_up_to_serving():
    steps = commands()
    assert steps[: len(SET_UP)] == list(SET_UP)
    verbs = [shlex.split(step)[1] for step in steps if step.startswith("mvit ")]
    assert verbs == ["predict", "data", "train", "calibrate", "evaluate", "predict", "serve"]
    assert any(step.startswith("curl ") for step in steps)


@pytest.mark.slow
def test_the_first_hour_runs_as_written(tmp_path):
    for label, index in (("melanoma", 0), ("nevus", 1)):  # the folder the page describes
        (tmp_path / "lesions" / label).mkdir(parents=True)
        for number in range(14):
            paint(tmp_path / "lesions" / label / f"{label}{number}.jpg", index, size=64)
    paint(tmp_path / "lesion.jpg", 0, size=64)
    text, name = config()
    (tmp_path / name).write_text(text)
    served = None
    for step in commands():
        if step in SET_UP:
            continue
        words = shlex.split(step)
        if words[0] == "curl":
            fields = dict(word.split("=", 1) for word in words if "=" in word and not word.startswith("http"))
            image = tmp_path / fields["images"].removeprefix("@")
            response = served.client.post("/v1/predict", files={"images": (image.name, image.read_bytes())},
                                          data={"head": fields["head"]})
            assert response.status_code == 200, response.text
            assert [record["head"] for record in response.json()] == ["lesions"]
            continue
        assert words[0] == "mvit", step
        if words[1] == "serve":
            served = start_server(*words[2:], log=tmp_path / "serve.log", cwd=tmp_path)
            continue
        done = run_mvit(*words[1:], cwd=tmp_path, timeout=600)
        assert done.code == 0, f"{step}\n{done.stderr}"
        if words[1] == "predict" and "--model" in words:
            assert "lesions" in done.stdout and "P(melanoma)" in done.stdout
        if words[1] == "train":  # it says how to refit the gate, as the page does
            assert "mvit calibrate -m" in " ".join(done.stderr.split()) and "--dataset lesions --root" in " ".join(done.stderr.split())
    served.stop()
    assert (tmp_path / "report" / "metrics.json").is_file()
