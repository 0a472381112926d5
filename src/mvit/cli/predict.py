"""`mvit predict` and `mvit attention`: run a model on image files and print, write or draw what it found."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import typer
from rich.text import Text

from mvit.cli.common import PRECISION_HELP, PrecisionChoice, check_writable, device_option, load_model, model_option, site_option
from mvit.cli.output import OutputFormat, plain, print_table, printable, say, show, stderr
from mvit.errors import MvitError
from mvit.registry.words import count

if TYPE_CHECKING:  # the facts of a head, for annotations only: the command line starts without torch
    from mvit.core.heads import HeadInfo


def predict_command(
    paths: list[str] = typer.Argument(..., help="image files, folders (searched recursively) and globs such as 'lesions/*.jpg'"),
    heads: list[str] = typer.Option(["all"], "--head", "-H", help="head to predict with; repeat for several; `all` for every head of the model"),
    model_file: Optional[Path] = model_option(),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table for people; json or csv (one record per image and head) for programs"),
    output_file: Optional[Path] = typer.Option(None, "--output", "-o", help="write the json or csv here instead of to stdout"),
    tta: bool = typer.Option(False, "--tta", help="average over the four flips of each image (4x the work)"),
    precision: PrecisionChoice = typer.Option(PrecisionChoice.auto, "--precision", help=PRECISION_HELP),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0, help="decision threshold for binary heads instead of the stored one"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="images per backbone pass"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="decoding processes (default: by file count and CPUs)"),
    device: str = device_option(),
    abstain: bool = typer.Option(False, "--abstain", help="label `unknown` on every head for an image the model's out-of-distribution gate flags (see `mvit calibrate`)"),
    site: Optional[str] = site_option(),
) -> None:
    """Predict images with one or more heads. Files that cannot be read are reported, the rest predicted; exit 1 when any failed."""
    from mvit.runtime.distributed import Processes, local_device, quiet_unless_rank_zero
    from mvit.runtime.options import RunOptions

    quiet_unless_rank_zero()  # under torchrun rank 0 alone prints and writes
    output = _format_of(output, output_file)
    if output_file is not None:
        check_writable(output_file, "--output", folder=False)
    files, shown = _find_images(paths)
    model = load_model(model_file, local_device(device), site)
    processes = Processes.from_environment(model.device.type)
    names = model.select_heads(heads)
    with processes:  # a clean run leaves the process group here, after the last exchange (see Processes.close)
        run = RunOptions(precision.value, batch_size, workers, processes=processes)
        failed = _predict_share(model, files, shown, names, output, output_file, threshold=threshold, tta=tta,
                                abstain=abstain, run=run)
    if failed < len(files):  # what the predictions rest on, once per run, after them
        _note_uncalibrated(model, names, threshold)
    if failed:
        predicted = len(files) - failed
        _say_failed(failed, len(files), f"the other {count(predicted, 'image')} {'was' if predicted == 1 else 'were'} predicted")
        raise typer.Exit(1)


def _predict_share(model, files: list, shown: list[str], names: list[str], output: OutputFormat,
                   output_file: Optional[Path], *, threshold, tta, abstain, run) -> int:
    """This process's share of the files predicted (`run.processes`: torchrun's ranks) and, on rank
    0, every share written in input order; how many files failed, on every rank."""
    from dataclasses import replace

    from mvit.infer.predict import predict_stream
    from mvit.runtime.progress import progress_bar

    processes = run.processes
    mine = processes.shard(len(files), run.batch_size)  # every input without torchrun; under it, whole batches
    run = replace(run, workers=run.workers_for(len(mine), model.device))
    stream = predict_stream(model, [files[index] for index in mine], names, threshold=threshold, tta=tta, abstain=abstain, run=run)
    results = processes.merged(stream, len(files), batch=run.batch_size)  # every rank's, on rank 0
    # rank 0 alone writes; the file is written aside and renamed into place when complete
    opened = processes.on_main(lambda: _open_for_writing(output_file)) if output_file else None
    written, sink = opened or (contextlib.nullcontext(), sys.stdout)
    failed = 0
    try:
        with written:
            writer = _PredictionWriter(output, sink, {name: model.heads[name] for name in names},
                                       gate=model.ood_gate is not None, site=model.site, abstain=abstain) if processes.main else None
            with progress_bar(stderr, disable=not (processes.main and stderr.is_terminal)) as progress:
                task = progress.add_task("predicting", total=len(files))
                for index, result in enumerate(results):  # one result per input, in input order (none on ranks > 0)
                    if result.error is not None:
                        failed += 1
                        say(f"error: {result.error}")
                    else:
                        writer.add([dataclasses.replace(p, image=shown[index]) for p in result.predictions])
                    progress.advance(task)
            if writer is not None:
                writer.close()
    except OSError as error:  # a full disk while writing: the boundary names the file written (exit 3)
        if error.filename is None:
            error.filename = str(output_file) if output_file else "standard output"
        raise
    return processes.share(failed)  # the same exit status on every rank


def attention_command(
    images: list[str] = typer.Argument(..., help="image files, folders and globs"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the PNGs (created)"),
    head: Optional[str] = typer.Option(None, "--head", "-H", help="head whose class-specific (gradient-weighted) map to draw"),
    target: Optional[str] = typer.Option(None, "--class", help="class of --head to explain (default: the head's prediction)"),
    model_file: Optional[Path] = model_option(),
    max_size: int = typer.Option(1024, "--max-size", min=32, help="longest side of the drawn images, in pixels"),
    device: str = device_option(),
    site: Optional[str] = site_option(),
) -> None:
    """Draw where the model looked: last-layer attention, rollout, the class-specific map, and grids per attention head and per layer. Exit 1 when any image failed."""
    from mvit import plots
    from mvit.data.images import as_rgb_image
    from mvit.errors import ImageError
    from mvit.infer.attention import DEFAULT_BATCH_SIZE, attention_maps

    check_writable(out, "--out", folder=True)
    files, shown = _find_images(images)
    model = load_model(model_file, device, site)
    out.mkdir(parents=True, exist_ok=True)
    noted = head is None or target is not None  # else the maps explain the head's own decision: say what it rests on
    stems = _unique_stems(files)
    failed = 0
    for start in range(0, len(files), DEFAULT_BATCH_SIZE):
        decoded = []  # (position, image): a bad file is reported and left out of the batch
        for index in range(start, min(start + DEFAULT_BATCH_SIZE, len(files))):
            try:
                decoded.append((index, as_rgb_image(files[index])))
            except ImageError as error:
                failed += 1
                say(f"error: {error}")
        if not decoded:
            continue
        maps = attention_maps(model, [image for _, image in decoded], head, target=target, max_size=max_size)
        if not noted:
            _note_uncalibrated(model, model.select_heads(head), None)
            noted = True
        for (index, _), found in zip(decoded, maps):
            # the figure's title: no control characters, and a $ is a dollar, not the start of a formula
            title = printable(shown[index]).replace("$", r"\$")
            for path in plots.attention_figures(found, out, stems[index], title=title):
                show(str(path))
    if failed:
        _say_failed(failed, len(files), f"maps for the {'other image' if len(files) - failed == 1 else 'others'} are in {out}")
        raise typer.Exit(1)


STDIN_NAMES = ("-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0")  # an image piped in, as the shell names it


def _say_failed(failed: int, total: int, rest: str) -> None:
    """The count of inputs that failed, after their sentences; nothing to add when the only one failed."""
    if total > 1:
        say(f"{failed} of {total} images could not be read (see above); {rest}")


def _find_images(arguments: list[str]) -> tuple[list, list[str]]:
    """The images the arguments name (image files, the files of folders and globs, and `-` or
    /dev/stdin for one image read from standard input), each with its name for the output; or one
    sentence saying there are none."""
    from mvit.runtime.distributed import environment_world
    from mvit.data.images import EncodedImage, find_image_files

    items: list = []
    seen: set[Path] = set()
    stdin_name = None
    pending: list[str] = []  # file arguments between stdin arguments, to keep the order given

    def flush() -> None:
        for path in find_image_files(pending):
            if path not in seen:
                seen.add(path)
                items.append(path)
        pending.clear()

    for argument in arguments:
        if argument not in STDIN_NAMES:
            pending.append(argument)
        elif environment_world() > 1:
            raise MvitError(f"{argument} (an image on standard input) cannot be shared out between torchrun processes; save it to a file and name that")
        elif stdin_name is None:  # standard input is read once, however often it is named
            flush()
            stdin_name = argument
            items.append(EncodedImage(_read_stdin(argument), name=f"the image on standard input ({argument})"))
    flush()
    if not items:
        raise MvitError(f"no image files in {', '.join(arguments)}; pass image files, folders holding .jpg/.png/.bmp/.tif files, or globs")
    return items, [stdin_name if isinstance(item, EncodedImage) else str(item) for item in items]


def _read_stdin(argument: str) -> bytes:
    stream = sys.stdin.buffer if sys.stdin is not None else None
    if stream is None or stream.isatty():
        raise MvitError(
            f"{argument} stands for one image piped in on standard input, and none is: "
            f"pipe one (mvit predict {argument} < lesion.jpg) or name the image file"
        )
    return stream.read()


def _format_of(output: OutputFormat, output_file: Optional[Path]) -> OutputFormat:
    """--output FILE with no --format: the format its suffix names (a table is for the terminal)."""
    if output_file is None or output is not OutputFormat.table:
        return output
    by_suffix = {".json": OutputFormat.json, ".csv": OutputFormat.csv}
    if output_file.suffix.lower() not in by_suffix:
        raise MvitError(f"cannot tell the format of {output_file} from its suffix; add --format json or --format csv")
    return by_suffix[output_file.suffix.lower()]


def _open_for_writing(path: Path) -> tuple[contextlib.ExitStack, object]:
    """The file to write the predictions to, beside `path`, and the context whose end closes it and
    renames it into place (or removes it, when the command fails or is interrupted)."""
    from mvit.runtime.files import written_aside

    with contextlib.ExitStack() as stack:
        try:
            partial = stack.enter_context(written_aside(path))
            sink = stack.enter_context(open(partial, "w", newline=""))
        except OSError as error:
            raise MvitError(f"cannot write {path}: {error.strerror}; choose another --output") from None
        return stack.pop_all(), sink


class _PredictionWriter:
    """Writes predictions as they come: json and csv stream record by record; the table waits for all.

    json and csv always carry `ood_score` and `in_distribution` (null / empty without a gate). With a
    site, every format names it (a `site` column, a `site` field, the table's title); without one,
    the output is as it always was.
    """

    def __init__(self, output: OutputFormat, sink, heads: Mapping[str, HeadInfo], gate: bool = False,
                 site: Optional[str] = None, abstain: bool = False):
        import csv

        self.output, self.sink, self.site = output, sink, site
        self.table = _PredictionTable(heads, gate, site, abstain) if output is OutputFormat.table else None
        self.first = True
        # one probability column per class name, shared by heads that have the class
        self.classes = list(dict.fromkeys(name for info in heads.values() for name in info.classes))
        if output is OutputFormat.csv:
            self.csv = csv.writer(sink, lineterminator="\n")
            self.csv.writerow(["image", "head", *(["site"] if site else []), "label", "probability", "threshold", "ood_score",
                               "in_distribution", *(f"p_{name}" for name in self.classes)])
        elif output is OutputFormat.json:
            sink.write("[")

    def add(self, predictions) -> None:
        import json

        if self.table is not None:
            self.table.add(predictions)
        for p in predictions:
            if self.output is OutputFormat.csv:
                in_distribution = "" if p.in_distribution is None else str(int(p.in_distribution))
                self.csv.writerow([p.image, p.head, *([p.site] if self.site else []), p.label, _number(p.probability, ".6f"), _number(p.threshold, ".6g"),
                                   _number(p.ood_score, ".6g"), in_distribution,
                                   *(f"{p.probabilities[c]:.6f}" if c in p.probabilities else "" for c in self.classes)])
            elif self.output is OutputFormat.json:
                self.sink.write(("\n" if self.first else ",\n") + "  " + json.dumps(p.as_dict()))
                self.first = False

    def close(self) -> None:
        if self.output is OutputFormat.json:
            self.sink.write("\n]\n")
        elif self.table is not None:
            self.table.print()


class _PredictionTable:
    """The table for people: a row per image and head, the image named once, so it stays readable
    however many heads are asked for; paths shortened to fit the terminal.

    A binary head decides by its positive class's probability against its threshold, so its row
    shows that probability (under `P(melanoma)`), not the label's, which beside the threshold would
    read as a contradiction (`not_melanoma 1.000`, threshold 0.07); a multi-class head shows its
    label's (`P(label)`); the threshold column only where a binary head is. With a gate, an `in
    dist.` column, and an image the gate flags gets a line of its own saying so, and a caption.
    """

    def __init__(self, heads: Mapping[str, HeadInfo], gate: bool, site: Optional[str], abstain: bool):
        self.gate, self.site, self.abstain = gate, site, abstain
        self.positive = {name: info.positive for name, info in heads.items() if info.is_binary}
        shown = [*dict.fromkeys(f"P({positive})" for positive in self.positive.values())]
        if len(self.positive) < len(heads):
            shown.append("P(label)")
        # the heading says what each row's number is; one line per meaning keeps the column narrow
        self.columns = ["image", *(["in dist."] if gate else []), "head", "label",
                        Text("\nor ").join(map(plain, shown)), *(["threshold"] if self.positive else [])]
        self.rows: list[list] = []
        self.flagged = 0

    def add(self, predictions) -> None:
        for k, p in enumerate(predictions):
            row = [str(p.image) if k == 0 else ""]
            if self.gate:
                row.append(("yes" if p.in_distribution else plain("NO", "bold red")) if k == 0 else "")
            positive = self.positive.get(p.head)
            row += [p.head, p.label, _number(p.probabilities[positive] if positive else p.probability, ".3f")]
            self.rows.append(row + ([_number(p.threshold, ".3g")] if self.positive else []))
        if predictions and predictions[0].in_distribution is False:  # the gate's verdict is the image's, on every head
            self.flagged += 1
            self.rows.append([plain("⚠ outside what the model knows", "bold red"), *[""] * (len(self.columns) - 1)])

    def print(self) -> None:
        if not self.rows:
            return
        caption = None
        if self.flagged:
            from mvit.infer.prediction import UNKNOWN

            one = self.flagged == 1
            labels = f"{UNKNOWN} (--abstain)" if self.abstain else f"guesses; --abstain labels such images {UNKNOWN}"
            caption = plain(f"⚠ {count(self.flagged, 'image')} outside what the model knows: the out-of-distribution gate found "
                            f"{'it' if one else 'them'} unlike the model's training images, so {'its' if one else 'their'} "
                            f"labels are {labels}", "bold red")
        print_table("Predictions" + (f" (site {self.site})" if self.site else ""), self.columns, self.rows,
                    caption=caption, fit=0)


def _number(value: Optional[float], spec: str) -> str:
    """A number for a table or csv cell; empty for None (no threshold, no gate, an abstained label)."""
    return "" if value is None else format(value, spec)


def _unique_stems(files: list) -> list[str]:
    """A file-name stem per input for the PNGs (`stdin` for the image read from standard input),
    made unique when two inputs share a name."""
    seen: dict[str, int] = {}
    stems = []
    for item in files:
        stem = item.stem if isinstance(item, Path) else "stdin"
        count = seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if count == 1 else f"{stem}-{count}")
    return stems


def _note_uncalibrated(model, names: list[str], threshold: Optional[float]) -> None:
    """One note on stderr naming the selected heads whose operating point was not fitted for this
    model's weights (`HeadInfo.calibrated`) and what each then does; stdout stays data only."""
    found = {}
    for name in names:
        info = model.heads[name]
        if info.calibrated:
            continue
        if info.temperature == 1.0:
            says = ["its probabilities are not temperature-scaled"]
        else:
            says = [f"its temperature {info.temperature:.3g} was not fitted for these weights"]
        if info.is_binary and threshold is None:  # the rule `predict` applies: the stored threshold, else 0.5
            if info.threshold is None:
                says.append("it decides at the default threshold 0.5")
            else:
                says.append(f"its threshold {info.threshold:.3g} was not chosen for these weights")
        found[name] = " and ".join(says)
    if len(found) == 1:
        [(name, says)] = found.items()
        say(f"note: head {name} was not calibrated for this model: {says}")
    elif found:
        each = "; ".join(f"{name}: {says}" for name, says in found.items())
        say(f"note: heads {', '.join(found)} were not calibrated for this model: {each}")
