"""`mvit extract`: fill the feature cache with the backbone features of every image of a config's
datasets, ahead of training (shared out between processes under torchrun)."""

from __future__ import annotations

from pathlib import Path

from mvit.data.dataset import BadImages
from mvit.runtime.distributed import Processes, environment_local_rank
from mvit.data.features import FeatureCache
from mvit.runtime.precision import autocast_dtype, resolve_device
from mvit.runtime.progress import progress_bar
from mvit.train.batches import decoding_workers
from mvit.train.config import TrainConfig
from mvit.train.model_setup import build_model
from mvit.train.tasks import build_tasks


def extract(config: TrainConfig, *, console=None) -> Path:
    """Fill the feature cache for every split of the config's datasets (sharded under torchrun)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    device = resolve_device(config.runtime.device, environment_local_rank())
    with Processes.from_environment(device.type) as processes:  # a clean run leaves the group at the end
        say = (lambda message: console.print(message, highlight=False, markup=False)) if processes.main else (lambda message: None)
        tasks = build_tasks(config, say)
        model = build_model(config, tasks, say).to(device)
        bad_images = BadImages(config.runtime.bad_images)  # "stop": one sentence naming the file; "skip": counted
        cache = FeatureCache(config.runtime.feature_cache or Path(config.output) / "features.h5", warn=say, bad_images=bad_images)
        if processes.main:
            cache.prepare()  # a cache that cannot be written is one sentence now, not after the first chunk
        processes.barrier()
        paths = list(dict.fromkeys(s.path for task in tasks for samples in task.splits.values() for s in samples))
        workers = decoding_workers(config, len(paths), device, processes.world)
        with progress_bar(console, disable=not processes.main) as progress:
            bar = progress.add_task("extracting features", total=len(paths))
            computed = cache.extract(model.backbone, config.preprocessing, paths, device=device,
                                     dtype=autocast_dtype(config.runtime.precision, device), workers=workers,
                                     batch_size=config.training.batch_size,  # the ranks' shares are whole batches of it
                                     processes=processes, progress=lambda n: progress.advance(bar, n))
        processes.barrier()
        skipped = len(bad_images.skipped)
        say(f"{len(paths) - skipped} images in {cache.path}; this process computed {computed - skipped}, the rest were cached")
        if skipped:
            say(f"warning: {bad_images.summary()}")
        return cache.path
