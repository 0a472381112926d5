"""The HDF5 feature cache: reused when valid, rebuilt when stale or damaged, resumable, shareable."""

import multiprocessing

import h5py
import pytest
import torch

from mvit.data import features as features_module
from mvit.runtime.distributed import Processes
from mvit.data.features import FeatureCache, fingerprint
from mvit.core.preprocessing import Preprocessing
from mvit.core.vit import VisionTransformer
from conftest import TINY
from training_data import paint

PRE = Preprocessing(image_size=32, crop_fraction=1.0)


def backbone(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(TINY).eval()


@pytest.fixture
def images(tmp_path):
    paths = []
    for i in range(10):
        path = tmp_path / "images" / f"img{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        paint(path, i % 3)
        paths.append(path)
    return paths


def extract(cache, net, paths, **options):
    return cache.extract(net, PRE, paths, device=torch.device("cpu"), batch_size=4, **options)


def test_features_equal_the_backbone_and_are_reused(tmp_path, images):
    cache, net = FeatureCache(tmp_path / "cache.h5"), backbone()
    assert extract(cache, net, images) == 10
    assert extract(cache, net, images) == 0  # everything came from the cache
    stored = cache.load(net, PRE, images, device=torch.device("cpu"))
    from mvit.data.images import load_image
    from mvit.data.transforms import eval_transform

    with torch.no_grad():
        direct = net(torch.stack([eval_transform(PRE)(load_image(p)) for p in images]))
    torch.testing.assert_close(stored, direct, atol=1e-5, rtol=1e-5)


def test_a_changed_backbone_or_preprocessing_never_reads_stale_features(tmp_path, images):
    cache, net = FeatureCache(tmp_path / "cache.h5"), backbone()
    extract(cache, net, images)
    with torch.no_grad():
        net.final_norm.bias.add_(0.1)
    assert extract(cache, net, images) == 10
    assert cache.extract(net, Preprocessing(image_size=32, crop_fraction=0.9), images, device=torch.device("cpu")) == 10
    assert fingerprint(net, PRE) != fingerprint(backbone(), PRE)


def test_a_changed_image_is_recomputed(tmp_path, images):
    cache, net = FeatureCache(tmp_path / "cache.h5"), backbone()
    extract(cache, net, images)
    paint(images[0], 2, size=44)  # same path, new content
    assert extract(cache, net, images) == 1


def test_an_interrupted_extraction_resumes_where_it_stopped(tmp_path, images, monkeypatch):
    monkeypatch.setattr(features_module, "CHUNK", 4)
    cache, net = FeatureCache(tmp_path / "cache.h5"), backbone()
    real_compute, calls = FeatureCache._compute, []

    def crash_on_second_chunk(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_compute(self, *args)

    monkeypatch.setattr(FeatureCache, "_compute", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        extract(cache, net, images)
    monkeypatch.setattr(FeatureCache, "_compute", real_compute)
    assert extract(cache, net, images) == 6  # the first chunk of 4 was kept


def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, images):
    path = tmp_path / "cache.h5"
    net = backbone()
    extract(FeatureCache(path), net, images)
    path.write_bytes(path.read_bytes()[:2000])  # truncated, as a crash or full disk leaves it
    warnings = []
    cache = FeatureCache(path, warn=warnings.append)
    assert extract(cache, net, images) == 10
    assert warnings and "damaged" in warnings[0]
    assert list(tmp_path.glob("cache.h5.damaged-*"))
    with h5py.File(path) as file:
        assert int(file[fingerprint(net, PRE)].attrs["rows"]) == 10


def _extract_in_process(path, image_paths):
    torch.set_num_threads(1)
    extract(FeatureCache(path), backbone(), image_paths)


def test_two_processes_filling_one_cache_do_not_corrupt_or_duplicate_it(tmp_path, images):
    path = tmp_path / "cache.h5"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_extract_in_process, args=(path, images)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    with h5py.File(path) as file:
        group = file[fingerprint(backbone(), PRE)]
        keys = group["keys"][: int(group.attrs["rows"])]
        assert len(keys) == len(set(keys)) == 10


def test_sharded_extraction_splits_the_work(tmp_path, images):
    cache, net = FeatureCache(tmp_path / "cache.h5"), backbone()
    # whole batches of 4 to each rank in turn: rank 0 takes images 0-3 and 8-9, rank 1 images 4-7
    assert extract(cache, net, images, processes=Processes(0, 2)) == 6
    assert extract(cache, net, images, processes=Processes(1, 2)) == 4
    assert extract(cache, net, images) == 0
