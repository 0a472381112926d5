"""Run the `mvit` command line the two ways tests need: in this process (fast) or as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import pytest

from mvit.cli.app import main
from mvit.registry import manager


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def call_mvit(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *args: str) -> Result:
    """`mvit ARGS` through `mvit.cli.app.main` in this process, with a freshly loaded registry."""
    monkeypatch.setattr(sys, "argv", ["mvit", *args])
    manager.reset()
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        manager.reset()
    out, err = capsys.readouterr()
    return Result(code, out, err)


def run_mvit(*args: str, env: Optional[Mapping[str, str]] = None, timeout: float = 120, cwd: Optional[Path] = None) -> Result:
    """`python -m mvit ARGS` as its own process (in folder `cwd`): entry points, exit status and streams for real."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "mvit", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd
    )
    return Result(done.returncode, done.stdout, done.stderr)
