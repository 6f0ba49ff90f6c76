"""The decode cache: decode once, reuse across runs and processes, invalidate on change, open no image file in epochs."""

from __future__ import annotations

import builtins
import multiprocessing as mp
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from datamodules import ImageDataModule
from datamodules.cache import ImageCache
from datamodules.images import IMAGE_EXTENSIONS, load_image
from tests.datamodules.test_inputs import make_folder, write_image


@pytest.fixture
def counted_decodes(monkeypatch):
    calls = []
    original = ImageCache._decode_one

    def counting(self, data):
        calls.append(len(data))
        return original(self, data)

    monkeypatch.setattr(ImageCache, "_decode_one", counting)
    return calls


def test_second_resolve_decodes_nothing_and_matches_direct_load(tmp_path, counted_decodes):
    root = make_folder(tmp_path / "data", per_class=5)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    cache = ImageCache(tmp_path / "cache", (20, 24))
    view, slots, bad = cache.resolve(paths)
    assert len(counted_decodes) == 10 and not bad
    images = view.open()
    for p, s in zip(paths, slots, strict=True):
        np.testing.assert_array_equal(images[s], load_image(p, (20, 24)))
    ImageCache(tmp_path / "cache", (20, 24)).resolve(paths)
    assert len(counted_decodes) == 10  # nothing decoded again


def test_changed_file_is_decoded_again_and_renamed_file_is_not(tmp_path, counted_decodes):
    root = make_folder(tmp_path / "data", per_class=3)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    cache = ImageCache(tmp_path / "cache", (16, 16))
    cache.resolve(paths)
    write_image(Path(paths[0]), value=7)  # new content in place
    os.rename(paths[1], paths[1] + ".moved.png")  # same content, new name
    paths[1] += ".moved.png"
    view, slots, _ = cache.resolve(paths)
    assert len(counted_decodes) == 6 + 1
    assert view.open()[slots[0]].max() == 7


def test_bad_files_are_remembered(tmp_path, counted_decodes):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    cache = ImageCache(tmp_path / "cache", (8, 8))
    _, slots, errors = cache.resolve([str(bad)])
    assert slots[0] == -1 and "not a readable image" in errors[str(bad)]
    cache.resolve([str(bad)])
    assert len(counted_decodes) == 1


def test_a_new_geometry_reuses_the_file_hashes(tmp_path, counted_decodes, monkeypatch):
    root = make_folder(tmp_path / "data", per_class=2)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    ImageCache(tmp_path / "cache", (8, 8)).resolve(paths)
    view, slots, _ = ImageCache(tmp_path / "cache", (12, 12)).resolve(paths)
    assert len(counted_decodes) == 8 and view.shape == (4, 12, 12, 3)


def _resolve_in_process(args):
    cache_dir, paths = args
    view, slots, _ = ImageCache(cache_dir, (16, 16)).resolve(paths)
    return view.open()[slots].sum()


@pytest.mark.slow  # four processes each importing the data stack: ~8 s on 2 cores
def test_concurrent_processes_build_one_consistent_cache(tmp_path):
    root = make_folder(tmp_path / "data", per_class=20)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    with mp.get_context("spawn").Pool(3) as pool:
        sums = pool.map(_resolve_in_process, [(str(tmp_path / "cache"), paths)] * 3)
    assert len(set(int(s) for s in sums)) == 1
    view, _, _ = ImageCache(tmp_path / "cache", (16, 16)).resolve(paths)
    assert view.shape[0] == 40  # each image stored once


def test_epochs_open_no_image_file(tmp_path, monkeypatch):
    """Regression test for the cache: once prepared, iterating epochs never opens an image file."""
    dm = ImageDataModule(image_size=32, num_workers=0, batch_size=16, augmentation="chd", artifacts_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    opened: list[str] = []
    real_open, real_pil_open = builtins.open, PIL.Image.open

    def spy_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    def spy_pil(fp, *a, **k):
        opened.append(str(fp))
        return real_pil_open(fp, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(PIL.Image, "open", spy_pil)
    for epoch in range(2):
        opened.clear()
        n = sum(len(y) for _, y in dm.train_dataloader())
        assert n == 168
        image_files = [f for f in opened if f.lower().endswith(IMAGE_EXTENSIONS)]
        assert image_files == [], f"epoch {epoch} opened {image_files[:3]}"
    assert opened == []  # epoch 2: not even the cache file is re-opened


class _WhereFrom(torch.utils.data.Dataset):
    """Reports, from inside a loader worker, where an item's pixels came from."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        image, _ = self.inner[i]
        mapped = self.inner._images
        return os.getpid(), type(mapped).__name__, str(mapped.filename), image.numpy()


def test_workers_share_the_map(tmp_path):
    dm = ImageDataModule(image_size=32, num_workers=2, batch_size=8, artifacts_dir=str(tmp_path), persistent_workers=False)
    dm.setup("fit")
    dataset = dm.datasets["val"]
    # What each worker receives: settings and indices, not pixels (the map is never pickled).
    assert dataset._images is None and len(pickle.dumps(dataset)) < 20_000
    loader = torch.utils.data.DataLoader(_WhereFrom(dataset), num_workers=2, batch_size=4, collate_fn=list)
    items = [item for batch in loader for item in batch]
    pids = {pid for pid, *_ in items}
    assert len(pids) == 2 and os.getpid() not in pids
    # Every worker reads the one cache file through a memory map (shared OS page cache, no private copy).
    assert {(kind, file) for _, kind, file, _ in items} == {("memmap", str(Path(dm.resolve().view.file).resolve()))}
    direct = np.stack([dataset[i][0].numpy() for i in range(len(dataset))])
    np.testing.assert_array_equal(np.stack([image for *_, image in items]), direct)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is the worker start method on Linux only")
def test_loader_workers_fork_whatever_the_default_start_method(tmp_path):
    """A sweep's trial is a forkserver child, whose default start method is forkserver: workers started that
    way imported torch and the data modules again, ~4 s per loader (13 s per trial at 32 px)."""
    dm = ImageDataModule(image_size=32, num_workers=2, batch_size=8, artifacts_dir=str(tmp_path), persistent_workers=False)
    dm.setup("fit")
    loaders = dm.train_dataloader(), dm.val_dataloader(), dm._loader("train", dataset=dm.datasets["train"])
    assert [loader.multiprocessing_context.get_start_method() for loader in loaders] == ["fork"] * 3


def torch_cat(batches):
    return np.concatenate([b.numpy() for b in batches])
