"""Every file mvit writes whole or not at all (model files, ONNX exports, predictions, run states,
figures): written aside and renamed into place once complete, so that its final name never holds
half of it. A leaf any stage may use.

The partial lives in a hidden folder of its own beside the final path (`.NAME.PID.partial/`):
whatever the writer makes there (safetensors' own `.tmpXXXX`, a partial of a partial) goes with
it. On success the file is renamed over the final path (two commands writing the same path: the
last rename wins, whole); on any failure (an error, Ctrl-C, SIGTERM, a full disk) the folder is
removed and a file already at the final path stays as it was. Only kill -9 leaves the folder;
`remove_partials` clears such leftovers from a folder its caller holds (a locked run folder).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from mvit.errors import Terminated


@contextlib.contextmanager
def written_aside(path: Path) -> Iterator[Path]:
    """The path to write `path`'s content to; renamed into place when the block ends without error,
    with the permissions a plain `open` gives (0666 less the umask), whatever the writer set
    (safetensors writes owner-only files; a model file is meant to be shared)."""
    path = Path(path)
    if _is_special(path):  # /dev/stdout, a FIFO, a device: nothing to rename, written in place
        yield path
        return
    folder = path.with_name(f".{path.name}.{os.getpid()}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)  # as the model file's own writer does
    folder.mkdir()
    try:
        with _terminate_as_interrupt():
            try:
                yield folder / path.name
                os.chmod(folder / path.name, 0o666 & ~_umask())
                os.replace(folder / path.name, path)
            except Exception as error:
                _raise_disk_full(error, path)
                raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_partials(folder: Path) -> None:
    """Remove the partial folders (`.NAME.PID.partial`) that writers killed with -9 left in `folder`.
    Only for a folder the caller holds alone (a run folder under its lock): a live writer's partial
    would go too."""
    for leftover in Path(folder).glob(".*.*.partial"):
        if leftover.is_dir() and not leftover.is_symlink() and leftover.name.split(".")[-2].isdigit():
            shutil.rmtree(leftover, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def _is_special(path: Path) -> bool:
    try:
        return not stat.S_ISREG(path.stat().st_mode)
    except OSError:  # nothing there yet (or a folder check_writable has refused already)
        return False


def _raise_disk_full(error: Exception, path: Path) -> None:
    """A full disk, however the writer words it (an OSError naming the partial, or safetensors'
    "os error 28"), as the OSError the command line words: naming the final path, never the partial."""
    text = str(error)
    number = getattr(error, "errno", None)
    if number in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "os error 28" in text:
        number = number if number in (errno.ENOSPC, errno.EDQUOT) else errno.ENOSPC
        raise OSError(number, os.strerror(number), str(path)) from None


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a plain `kill`) raises `Terminated`, a KeyboardInterrupt, while the file is written, so that the
    partial is removed as on Ctrl-C; by default it would end the process on the spot. Processes
    forked meanwhile (decoding workers) keep the default."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    owner = os.getpid()

    def interrupt(number, frame):
        if os.getpid() != owner:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        raise Terminated

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)  # None: set outside Python
