"""`mvit predict` and `mvit evaluate` under torchrun (two CPU processes, gloo): each rank computes its
share of the images (whole batches), rank 0 alone writes one output in input order, byte for byte
one process's (with as many threads per process), and prints; rank 1 writes and prints nothing;
both end with the same exit status."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import pytest

from datasets_factory import make_dermmel, truncate, write_image
from inference_models import saved_model

pytestmark = pytest.mark.slow

# One torchrun rank running `mvit ARGS`, as `-m mvit` does, keeping what this rank did in
# $MVIT_RANK_RECORDS: everything it printed (file descriptors 1 and 2, whoever writes), its exit
# status, the images it computed (the sharding) and the files it opened for writing.
RANK = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    folder, rank = Path(os.environ["MVIT_RANK_RECORDS"]), os.environ["RANK"]
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(folder / f"rank{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)

    from mvit.evaluate import report
    from mvit.infer import predict

    computed, wrote = [], []
    def recording(real):
        def run(model, items, *args, **kwargs):
            computed.extend(str(item) for item in items)
            return real(model, items, *args, **kwargs)
        return run
    predict.predict_stream = recording(predict.predict_stream)
    report.logits_stream = recording(report.logits_stream)

    if os.environ.get("MVIT_FAIL_RANK") == rank:  # this rank fails at its second batch, the others go on
        from mvit.errors import MvitError
        real_forward, calls = predict.forward_images, []
        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise MvitError("the injected failure of its second batch")
            return real_forward(*args, **kwargs)
        predict.forward_images = failing

    import builtins, io
    real_open = io.open
    def opening(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax+") and str(file) != os.devnull:
            wrote.append(str(file))
        return real_open(file, mode, *args, **kwargs)
    builtins.open = io.open = opening

    from mvit.cli.app import main

    def record(code):
        with real_open(folder / f"rank{rank}.json", "w") as file:
            json.dump({"code": code, "computed": computed, "wrote": wrote}, file)

    # a rank that failed in its process group ends without interpreter teardown (os._exit)
    real_exit = os._exit
    def ending(code):
        record(code)
        real_exit(code)
    os._exit = ending

    sys.argv = ["mvit", *sys.argv[1:]]
    code = "crashed"
    try:
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        raise
    finally:
        record(code)
    """
)

# the same for one process and two: torchrun's one thread per process (a thread count sums a matrix
# product in another order, in the last bits), and the table's width
ENV = {"OMP_NUM_THREADS": "1", "COLUMNS": "200"}


class Ranks:
    """What each rank of a torchrun run printed, its exit status and the images it computed."""

    def __init__(self, folder: Path):
        self.folder = folder

    def stdout(self, rank: int) -> str:
        return (self.folder / f"rank{rank}.stdout").read_text()

    def stderr(self, rank: int) -> str:
        return (self.folder / f"rank{rank}.stderr").read_text()

    def record(self, rank: int) -> dict:
        return json.loads((self.folder / f"rank{rank}.json").read_text())


def torchrun(tmp_path: Path, *args, env: Optional[dict] = None) -> Ranks:
    folder = tmp_path / "ranks"
    folder.mkdir()
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *map(str, args)]
    subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                   env={**os.environ, **ENV, "MVIT_RANK_RECORDS": str(folder), **(env or {})})
    return Ranks(folder)


def alone(*args) -> subprocess.CompletedProcess:
    """`python -m mvit ARGS` as one process."""
    return subprocess.run([sys.executable, "-m", "mvit", *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ENV})


def files(folder: Path) -> set:
    """The files and folders under `folder`, the ranks' records left out."""
    return {p for p in folder.rglob("*") if p.relative_to(folder).parts[0] not in ("ranks", "rank.py")}


def assert_rank_1_silent(ranks: Ranks, written: set) -> None:
    assert ranks.stdout(1) == "" and ranks.stderr(1) == ""  # printed nothing, not even a warning
    assert ranks.record(1)["wrote"] == []  # and wrote nothing
    # rank 0 wrote the output, once: aside (`.NAME.PID.partial/NAME`), then renamed into place
    assert {str(final_name(Path(p))) for p in ranks.record(0)["wrote"]} == {str(p) for p in written}


def final_name(path: Path) -> Path:
    """The final path of a file written aside, the path itself otherwise."""
    if path.parent.name.startswith(f".{path.name}.") and path.parent.name.endswith(".partial"):
        return path.parent.parent / path.name
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchrun")
    images = [write_image(folder / "images" / f"lesion{k:02d}.jpg", size=(40, 30)) for k in range(10)]
    truncate(images[3])  # one broken image: an error reported once, in its place
    return saved_model(folder), folder / "images", images


@pytest.mark.parametrize("output", ["csv", "json", "table"])
def test_predict_under_torchrun_writes_the_output_of_one_process(inputs, tmp_path, output):
    model, folder, images = inputs
    common = ["predict", "-m", model, "--device", "cpu", "--head", "all", "--batch-size", "2", folder]
    if output == "csv":  # to a file: rank 0 writes it; json and the table: to stdout
        one = alone(*common, "-o", tmp_path / "one.csv")
        expected = (tmp_path / "one.csv").read_text()
        before = files(tmp_path)
        ranks = torchrun(tmp_path, *common, "-o", tmp_path / "two.csv")
        written = (tmp_path / "two.csv").read_text()
        assert ranks.stdout(0) == one.stdout == ""
    else:
        one = alone(*common, "--format", output)
        expected = one.stdout
        before = files(tmp_path)
        ranks = torchrun(tmp_path, *common, "--format", output)
        written = ranks.stdout(0)
    assert one.returncode == 1, one.stderr  # the broken image
    assert written == expected
    assert len(expected.splitlines()) > 10  # nine images, four heads: predictions, not an empty file
    if output == "json":
        assert [r["image"] for r in json.loads(written)] == [str(p) for p in images if p != images[3] for _ in range(4)]
    assert ranks.stderr(0) == one.stderr  # the error sentence once, the note, the count of failures
    assert one.stderr.count("error:") == 1 and str(images[3]) in one.stderr
    assert ranks.record(0)["code"] == ranks.record(1)["code"] == 1  # the same exit status on every rank
    computed = [ranks.record(rank)["computed"] for rank in (0, 1)]
    assert sorted(computed[0] + computed[1]) == [str(p) for p in images]  # each image once, by one rank
    assert computed[0] == [str(p) for k, p in enumerate(images) if k // 2 % 2 == 0]  # batches 0, 2, 4 of two images
    assert files(tmp_path) - before == ({tmp_path / "two.csv"} if output == "csv" else set())
    assert_rank_1_silent(ranks, files(tmp_path) - before)


def test_predict_under_torchrun_exits_0_on_every_rank_and_a_mistake_is_said_once(inputs, tmp_path):
    model, folder, images = inputs
    ranks = torchrun(tmp_path, "predict", "-m", model, "--device", "cpu", "-H", "dermmel", "-f", "csv", images[0], images[1], images[2])
    assert ranks.record(0)["code"] == ranks.record(1)["code"] == 0
    assert len(ranks.stdout(0).splitlines()) == 4  # the header and three images
    assert ranks.stdout(1) == ranks.stderr(1) == ""
    (tmp_path / "ranks").rename(tmp_path / "first")
    ranks = torchrun(tmp_path, "predict", "-m", model, "--device", "cpu", "-H", "no-such-head", images[0])
    assert ranks.record(0)["code"] == ranks.record(1)["code"] == 2
    assert ranks.stderr(0).count("error:") == 1 and "no-such-head" in ranks.stderr(0)
    assert ranks.stdout(1) == ranks.stderr(1) == ""


def test_evaluate_under_torchrun_writes_the_report_of_one_process(tmp_path):
    counts = {"train_sep": {"Melanoma": 1, "NotMelanoma": 1}, "valid": {"Melanoma": 1, "NotMelanoma": 1},
              "test": {"Melanoma": 7, "NotMelanoma": 6}}
    root = make_dermmel(tmp_path / "data", counts, augmented=0)
    paths = sorted((root / "DermMel" / "test").rglob("*.jpg"))
    truncate(paths[4])  # left out and listed under "unreadable"
    model = saved_model(tmp_path)
    common = ["evaluate", "-m", model, "--device", "cpu", "-H", "dermmel", "--root", root, "--split", "test", "--batch-size", "2"]
    one = alone(*common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    before = files(tmp_path)
    ranks = torchrun(tmp_path, *common, "--out", tmp_path / "two")
    assert ranks.record(0)["code"] == ranks.record(1)["code"] == 0, ranks.stderr(0)
    assert files(tmp_path) - before == {tmp_path / "two", *(tmp_path / "two").iterdir()}  # rank 0's report alone

    expected = json.loads((tmp_path / "one" / "metrics.json").read_text())
    written = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert expected["n"] == len(paths) - 1 and len(expected["unreadable"]) == 1 and "Truncated" in expected["unreadable"][0]
    assert written == expected
    assert (tmp_path / "two" / "predictions.csv").read_bytes() == (tmp_path / "one" / "predictions.csv").read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert ranks.stdout(0).replace(str(tmp_path / "two"), "OUT") == one.stdout.replace(str(tmp_path / "one"), "OUT")
    computed = [ranks.record(rank)["computed"] for rank in (0, 1)]
    assert computed[0] and computed[1] and len(computed[0]) + len(computed[1]) == len(paths)
    assert_rank_1_silent(ranks, (tmp_path / "two").iterdir())


@pytest.mark.parametrize("failing", [1, 0])
def test_a_rank_that_fails_says_so_in_one_sentence_and_no_output_is_left(inputs, tmp_path, failing):
    model, folder, images = inputs
    output = tmp_path / "out.csv"
    before = files(tmp_path)
    ranks = torchrun(tmp_path, "predict", "-m", model, "--device", "cpu", "-H", "all", "--batch-size", "2", "-o", output, folder,
                     env={"MVIT_FAIL_RANK": str(failing)})
    said = ranks.stderr(0) + ranks.stderr(1)
    assert said.count("error:") == 1, said  # from the rank that failed alone, naming itself and the cause
    assert f"error: rank {failing} of 2: the injected failure of its second batch" in ranks.stderr(failing)
    assert "Traceback" not in said
    assert ranks.record(failing)["code"] == 2
    assert files(tmp_path) == before  # no output, whole or partial (a rank stopped by torchrun has no record)
