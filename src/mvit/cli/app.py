"""The `mvit` command line: the typer app, the commands registered on it, and `main`, the one error
boundary every command runs inside.

Each command lives in the module of its group (data, predict, evaluate, train, export, serve) and only parses its
arguments, calls the API and prints. Heavy modules (torch above all) are imported inside the commands
that need them, so `mvit --help` and `mvit plugins` start fast.

`main` turns every expected failure into one line `error: ...` on stderr and a non-zero exit status:
a user mistake the library names (`MvitError`, exit 2), a usage mistake click finds (an unknown
option, an invalid value, a missing argument; exit 2), and the operating system's refusals that reach
it (permission denied, a folder where a file is needed or the other way round, a missing path, a full
disk, a read-only file system, an exceeded quota; exit 1, but 3 for a full disk or a spent quota,
as for `DiskFull`), each naming the path when the error carries one. Library code raises
`MvitError` where it knows more context; this catches what slips
through, so a new command inherits it. Anything else is a bug in mvit and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
from typing import Optional

import typer

from typer._click import exceptions as click_errors  # typer >= 0.26 carries its own copy of click

from mvit.cli import adapt, data, evaluate, export, predict, serve, train
from mvit.cli.output import error_line
from mvit.errors import DiskFull, MvitError, Terminated
from mvit.runtime.startup import fast_start

app = typer.Typer(
    name="mvit",
    help="Classify dermoscopic skin-lesion images with one ViT backbone and many classifier heads.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# in this order in `mvit --help` (groups come after the commands)
app.command("predict")(fast_start(predict.predict_command))
app.command("attention")(fast_start(predict.attention_command))
app.command("evaluate")(fast_start(evaluate.evaluate_command))
app.command("calibrate")(fast_start(evaluate.calibrate_command))
app.command("adapt")(fast_start(adapt.adapt_command))
app.command("info")(fast_start(adapt.info_command))
app.command("train")(train.train_command)
app.command("extract")(train.extract_command)
app.command("export")(fast_start(export.export_command))
app.command("serve")(fast_start(serve.serve_command))
app.add_typer(data.plugins_app, name="plugins")
app.add_typer(data.data_app, name="data")

EXIT_USER_ERROR = 2  # a mistake in what was asked: a file, a folder, a config, an option
EXIT_SYSTEM_ERROR = 1  # the system refused: permissions, a read-only disk (and `predict`: an image failed)
EXIT_DISK_FULL = 3  # no space left (or the quota spent): nothing half-written is left under a final name
EXIT_INTERRUPTED = 130


def main() -> None:
    """Run the command line; see the module's docstring for what becomes one sentence. Under
    torchrun, a process that failed after joining the process group ends here without interpreter
    teardown (`mvit.runtime.distributed.end_process`), its sentence said and its files closed."""
    from mvit.runtime.distributed import end_process, exit_status, group_joined, quiet_unless_rank_zero

    quiet_unless_rank_zero()  # under torchrun a run speaks once, usage errors included
    try:
        _run()
    except SystemExit as done:
        end_process(exit_status(done))
        raise
    except BaseException:  # a bug: its traceback, then the same end
        if not group_joined():
            raise
        sys.excepthook(*sys.exc_info())  # on a rank > 0, to its real stderr (quiet_unless_rank_zero)
        end_process(EXIT_SYSTEM_ERROR)


def _run() -> None:
    """The command, and the one sentence and exit status for what it raised (see `main`)."""
    from mvit.runtime.distributed import PeerStopped, group_joined

    try:
        code = app(standalone_mode=False)  # standalone mode would print click's own "Aborted!" for some errors
    except DiskFull as error:
        _failed(str(error))
        sys.exit(EXIT_DISK_FULL)
    except PeerStopped:  # the process that stopped says why (or torchrun does, for a signal)
        sys.exit(EXIT_SYSTEM_ERROR)
    except MvitError as error:
        from mvit.registry.catalog import debugging

        if debugging() and error.__cause__ is not None:  # a plugin author's view: where it really failed
            traceback.print_exception(error.__cause__)
        _failed(str(error))
        sys.exit(EXIT_USER_ERROR)
    except click_errors.NoArgsIsHelpError as error:  # `mvit` or `mvit data` alone: the help, printed already
        if error.format_message().strip():
            typer.echo(error.format_message(), err=True)
        sys.exit(error.exit_code)
    except click_errors.ClickException as error:
        error_line(usage_sentence(error))
        sys.exit(error.exit_code)
    except typer.Abort as abort:
        if isinstance(abort.__cause__, EOFError):
            # a file that ended early, met by code that did not say which: a bug, shown as one
            raise abort.__cause__ from None
        error_line("aborted")
        sys.exit(EXIT_SYSTEM_ERROR)
    except KeyboardInterrupt as interrupt:
        # under torchrun: Ctrl-C reaches every rank, and rank 0 says it; SIGTERM is torchrun stopping
        # the others because one failed, and that one says why
        if not group_joined() or not (isinstance(interrupt, Terminated) or _rank() > 0):
            error_line("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `mvit predict ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_SYSTEM_ERROR)
    except OSError as error:
        sentence = os_error_sentence(error)
        if sentence is None:
            raise  # not a refusal a user can act on: a bug, with its traceback
        _failed(sentence)
        sys.exit(EXIT_DISK_FULL if error.errno in (errno.ENOSPC, errno.EDQUOT) else EXIT_SYSTEM_ERROR)
    sys.exit(code if isinstance(code, int) else 0)


def _failed(sentence: str) -> None:
    """`error: SENTENCE`; under torchrun, from the rank that failed and naming it, once the ranks
    work on their own shares (`mvit.runtime.distributed.speaks_for_itself`)."""
    from mvit.runtime.distributed import environment_world, speaks_for_itself

    stream = speaks_for_itself()
    if stream is None:
        error_line(sentence)
        return
    before, sys.stderr = sys.stderr, stream
    try:
        error_line(f"rank {_rank()} of {environment_world()}: {sentence}")
    finally:
        sys.stderr = before


def _rank() -> int:
    from mvit.runtime.distributed import environment_rank

    return environment_rank()


def usage_sentence(error: click_errors.ClickException) -> str:
    """Click's complaint (unknown option, invalid value, missing argument) and where the help is."""
    message = " ".join(error.format_message().split()).replace("Value error, ", "").rstrip(".")
    context = getattr(error, "ctx", None)
    if context is None:
        return message
    return f"{message}; see `{context.command_path} --help`"


def os_error_sentence(error: OSError) -> Optional[str]:
    """The sentence for an operating-system refusal a user can act on, naming the path; None otherwise."""
    path = _path_of(error)
    at = f" ({path})" if path else ""
    if error.errno == errno.ENOSPC:
        return f"no space left on the device{at}; free some space, then run the command again"
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded{at}; free some space or raise the quota, then run the command again"
    if error.errno == errno.EROFS:
        return f"{path or 'the path'} is on a read-only file system; choose a location you can write to"
    if path is None:
        return None  # which file? without a path the sentence would not help: keep the traceback
    if isinstance(error, PermissionError):
        return f"permission denied: {path}; check its permissions, or choose another location"
    if isinstance(error, IsADirectoryError):
        return f"{path} is a folder where a file is needed; name a file"
    if isinstance(error, NotADirectoryError):
        return f"{path} is not a folder, or a part of it is a file; choose another path"
    if isinstance(error, FileExistsError):
        return f"{path} already exists and is not what is needed there (a file where a folder goes?); choose another path"
    if isinstance(error, FileNotFoundError):
        return f"{path} does not exist, or its folder does not; check the path"
    if error.errno == errno.ENAMETOOLONG:
        return f"the file name is too long: {path}; choose a shorter one"
    return None


def _path_of(error: OSError) -> Optional[str]:
    """The path an OSError is about: its filename, else the `name = '...'` HDF5 puts in its message."""
    for name in (error.filename, error.filename2):
        if isinstance(name, (str, bytes, os.PathLike)):
            return os.fsdecode(name)
    found = re.search(r"name = '([^']*)'", str(error))
    return found.group(1) if found else None
