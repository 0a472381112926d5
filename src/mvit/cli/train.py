"""`mvit train` and `mvit extract`: turn a training config and its overrides into a run, or a filled feature cache."""

from __future__ import annotations

from pathlib import Path

import typer

from mvit.cli.common import check_writable
from mvit.cli.output import stderr
from mvit.errors import MvitError


def train_command(
    config: Path = typer.Argument(None, help="Training config (TOML); see configs/ for examples."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this folder where it stopped; --epochs may extend it, --device and --set runtime.X change how it runs, nothing may change its recipe."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: --set training.epochs=5 (repeatable)."),
    epochs: int = typer.Option(None, help="Shortcut for --set training.epochs=N."),
    output: Path = typer.Option(None, help="Shortcut for --set output=DIR."),
    device: str = typer.Option(None, help="Shortcut for --set runtime.device=NAME (auto, cpu, cuda, mps)."),
) -> None:
    """Train heads (and fine-tune the backbone) on one or more datasets."""
    from mvit.train import trainer as train
    from mvit.train.config import load_config

    overrides = list(set_)
    if epochs is not None:
        overrides.append(f"training.epochs={epochs}")
    if device is not None:
        overrides.append(f'runtime.device="{device}"')
    if resume is not None:
        if config is not None:
            raise MvitError("give either a config or --resume RUN, not both")
        if output is not None:
            raise MvitError("a run resumes in its own folder, so --output cannot move it; copy the folder and resume the copy")
        train.resume(resume, overrides, console=stderr)  # a change of the recipe is one sentence
        return
    if config is None:
        raise MvitError("give a training config (TOML), or --resume RUN to continue a run")
    if output is not None:
        overrides.append(f'output="{output.absolute()}"')
    settings = load_config(config, overrides)
    check_writable(Path(settings.output), "output folder (--output DIR)", folder=True)  # before any work
    train.train(settings, console=stderr)


def extract_command(
    config: Path = typer.Argument(..., help="Training config (TOML) whose datasets, backbone and preprocessing to use."),
    cache: Path = typer.Option(None, help="HDF5 feature cache (default: the config's runtime.feature_cache, else OUTPUT/features.h5)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field (repeatable)."),
) -> None:
    """Fill the HDF5 feature cache with the backbone features of every image of the config's datasets."""
    from mvit.train.config import load_config
    from mvit.train.extract import extract

    overrides = list(set_) + ([f'runtime.feature_cache="{cache.absolute()}"'] if cache is not None else [])
    settings = load_config(config, overrides)
    target = settings.runtime.feature_cache or Path(settings.output) / "features.h5"
    check_writable(Path(target), "place for the feature cache (--cache FILE)", folder=False)  # before any work
    extract(settings, console=stderr)
