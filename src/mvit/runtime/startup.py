"""A fast start for a command that loads a model and runs it; its output is the same.

- Python's cyclic garbage collector is off from the command's start until `model_loaded`. Importing
  torch makes a few hundred thousand long-lived objects, and each full collection meanwhile scans
  them all again (about a second of a cold start, for nothing: they are all alive). `model_loaded`
  then freezes them, which also spares every later collection and the one at exit, and turns the
  collector back on; a command that fails before turns it on as it ends.
- OpenMP's threads sleep between operations instead of spinning (OMP_WAIT_POLICY=PASSIVE, unless
  the environment sets it; read when torch is imported, which the command does). Spinning threads
  take the cores from the thread that has the work when the machine is busy: one image's forward
  took 1.3 s instead of 0.03 s on two busy cores, a batch of 32 twice as long.
"""

from __future__ import annotations

import functools
import gc
import os


def fast_start(command):
    """`command` (a function), run with the collector off and OpenMP's threads passive."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        gc.disable()
        try:
            return command(*args, **kwargs)
        finally:
            gc.enable()

    return run


def model_loaded() -> None:
    """Start-up is over: what it made (torch's modules above all) lives as long as the process, so
    the collector need not scan it again; it comes back on here."""
    gc.freeze()
    gc.enable()
