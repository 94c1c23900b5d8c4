"""resnet_scale.data.StreamingLoader: the same batches as DeviceLoader, read from an image folder (CPU)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    import _fixtures_data as fx
except ImportError:  # --import-mode=importlib, or tests/ made a package
    from tests import _fixtures_data as fx
from resnet_scale.data import (
    DataError,
    DeviceLoader,
    ImageFolderIndex,
    StreamingLoader,
    build_datasets,
    estimate_imagefolder_bytes,
    index_imagefolder,
)
from resnet_scale.data.imagefolder import sample_stats
from resnet_scale.data.imageset import channel_stats

pytest.importorskip("PIL")

SIZE = 10  # the fixture's 13 x 11 images are resized (shorter side 11 -> 10) and center-cropped
N_TRAIN, N_TEST = 21, 9  # 3 classes x 7 and x 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(data_dir, (train ImageSet, test ImageSet), (train index, test index)) of one small PNG folder.

    The ImageSets carry the index's mean/std, so the two paths normalise with the same numbers.
    """
    root = tmp_path_factory.mktemp("folder")
    fx.write_image_folder(root, classes=("c", "a", "b"), counts={"train": 7, "test": 3}, size=(13, 11), seed=4)
    train_set, test_set = build_datasets("imagefolder", data_dir=str(root), image_size=SIZE)
    train_index, test_index = index_imagefolder(str(root), SIZE)
    sets = tuple(dataclasses.replace(s, mean=train_index.mean, std=train_index.std) for s in (train_set, test_set))
    return root, sets, (train_index, test_index), (train_set, test_set)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _assert_same(streaming, device, epoch):
    got, want = _epoch(streaming, epoch), _epoch(device, epoch)
    assert len(streaming) == len(device) == len(got) == len(want)
    assert streaming.num_samples() == device.num_samples()
    assert all(torch.equal(a, b) for a, b in zip(streaming.epoch_indices(), device.epoch_indices()))
    for (xs, ys), (xd, yd) in zip(got, want):
        assert xs.dtype == xd.dtype and xs.shape == xd.shape and xs.stride() == xd.stride()
        assert torch.equal(xs, xd) and torch.equal(ys, yd) and ys.dtype == torch.int64
    return got


# ----------------------------------------------------------------------------- the index

def test_index_matches_in_memory_path(folder):
    root, _, (tr, te), (train_set, test_set) = folder
    assert isinstance(tr, ImageFolderIndex) and len(tr) == N_TRAIN and len(te) == N_TEST
    assert tr.classes == te.classes == train_set.classes == ["a", "b", "c"] and tr.num_classes == 3
    assert torch.equal(tr.labels, train_set.labels) and torch.equal(te.labels, test_set.labels)
    assert Path(tr.files[0]).parts[-3:] == ("train", "a", "0.png")
    assert Path(te.files[-1]).parts[-3:] == ("test", "c", "2.png")
    assert tr.image_size == te.image_size == SIZE
    # Fewer than 1,000 train images: the sample is all of them, so the statistics are the in-memory ones.
    assert tr.mean == pytest.approx(train_set.mean, abs=1e-12)
    assert tr.std == pytest.approx(train_set.std, abs=1e-12)
    assert (te.mean, te.std) == (tr.mean, tr.std)
    assert estimate_imagefolder_bytes(str(root), SIZE) == train_set.images.nbytes + test_set.images.nbytes
    assert estimate_imagefolder_bytes(str(root), 224) == (N_TRAIN + N_TEST) * 3 * 224 * 224


def test_stats_sample_is_fixed_and_spread(folder):
    _, (train_set, _), (tr, _), _ = folder
    picked = [i * N_TRAIN // 5 for i in range(5)]  # 0, 4, 8, 12, 16: every class
    mean, std = sample_stats(tr.files, SIZE, limit=5)
    want_mean, want_std = channel_stats(train_set.images[picked])
    assert mean == pytest.approx(want_mean, abs=1e-12) and std == pytest.approx(want_std, abs=1e-12)
    assert sample_stats(tr.files, SIZE, limit=5) == (mean, std)


def test_bad_folders_raise_data_error(tmp_path):
    for fn in (index_imagefolder, estimate_imagefolder_bytes):
        for split in ("train", "test"):  # two classes (one is refused on its own)
            for name in ("a", "b"):
                (tmp_path / "e" / split / name).mkdir(parents=True, exist_ok=True)
        with pytest.raises(DataError, match=r"train[/\\]a: class folder holds no images"):
            fn(str(tmp_path / "e"), 8)
        fx.write_image_folder(tmp_path / "x", classes=("a", "b"))
        (tmp_path / "x" / "test" / "b").rename(tmp_path / "x" / "test" / "c")
        with pytest.raises(DataError, match=r"only in train: \['b'\]; only in test: \['c'\]"):
            fn(str(tmp_path / "x"), 8)
        with pytest.raises(DataError, match="missing train/"):
            fn(str(tmp_path / "nothing"), 8)
        with pytest.raises(DataError, match="needs --image-size"):
            fn(str(tmp_path / "x"), None)
        with pytest.raises(DataError, match="needs --data-dir"):
            fn(None, 8)
        with pytest.raises(DataError, match="positive number of pixels"):
            fn(str(tmp_path / "x"), 0)
        (tmp_path / "x" / "test" / "c").rename(tmp_path / "x" / "test" / "b")
        fn(str(tmp_path / "x"), 8)
        (tmp_path / "x" / "test").rename(tmp_path / "x" / "val")
        assert len(index_imagefolder(str(tmp_path / "x"), 8)[1]) == 4 and fn(str(tmp_path / "x"), 8)
        shutil.rmtree(tmp_path / "e")
        shutil.rmtree(tmp_path / "x")
    fx.write_image_folder(tmp_path / "bad", classes=("a", "b"))
    (tmp_path / "bad" / "train" / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"1.png: cannot read this image"):  # decoded for the statistics
        index_imagefolder(str(tmp_path / "bad"), 8)
    assert estimate_imagefolder_bytes(str(tmp_path / "bad"), 8) == 10 * 3 * 64  # decodes nothing


def test_loader_argument_errors(folder):
    _, _, (tr, _), _ = folder
    with pytest.raises(DataError, match=r"global batch size 10 .* world size 4.*multiple of 4"):
        StreamingLoader(tr, batch_size=10, world_size=4, rank=0, num_workers=0)
    with pytest.raises(DataError, match="num_workers must be an int >= 0"):
        StreamingLoader(tr, batch_size=4, num_workers=-1)
    with pytest.raises(DataError, match="floating type"):
        StreamingLoader(tr, batch_size=4, dtype=torch.int32, num_workers=0)


# ----------------------------------------------------------------------------- same batches as DeviceLoader

@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("batch", [4, 8])  # train remainder 1 (dropped at world 2) / 5; eval remainder 1 / 1
def test_same_batches_as_device_loader(folder, world, batch):
    _, (train_set, test_set), (tr, te), _ = folder
    kw = dict(batch_size=batch, world_size=world, seed=7, crop_padding=2, flip=True)
    for rank in range(world):
        streaming = StreamingLoader(tr, rank=rank, num_workers=0, **kw)
        device = DeviceLoader(train_set, rank=rank, **kw)
        first = _assert_same(streaming, device, 0)
        second = _assert_same(streaming, device, 1)
        assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, second)), "a new epoch reshuffles"
        plain = StreamingLoader(tr, rank=rank, num_workers=0, **dict(kw, crop_padding=0, flip=False))
        assert not torch.equal(first[0][0], _epoch(plain, 0)[0][0]), "crop and flip were applied"
        ev = dict(kw, rank=rank, train=False, channels_last=True, dtype=torch.bfloat16)
        got = _assert_same(StreamingLoader(te, num_workers=0, **ev), DeviceLoader(test_set, **ev), 3)
        assert got[0][0].is_contiguous(memory_format=torch.channels_last)
        if world == 2 and rank == 1:
            assert got[-1][0].shape == (0, 3, SIZE, SIZE), "eval remainder 1 < 2 ranks: an empty last batch"


def test_worker_processes_same_batches(folder):
    _, (train_set, test_set), (tr, te), _ = folder
    kw = dict(batch_size=6, world_size=2, seed=3, crop_padding=3, flip=True)
    ev = dict(batch_size=8, world_size=2, train=False)
    for rank in range(2):
        streaming = StreamingLoader(tr, rank=rank, num_workers=2, **kw)
        device = DeviceLoader(train_set, rank=rank, **kw)
        for epoch in (0, 1, 0):  # persistent workers follow set_epoch, back and forth
            _assert_same(streaming, device, epoch)
        evaluation = StreamingLoader(te, rank=rank, num_workers=2, **ev)  # rank 1's last batch is empty
        _assert_same(evaluation, DeviceLoader(test_set, rank=rank, **ev), 0)
    assert streaming._loader.pin_memory is False and streaming._loader.persistent_workers


def test_worker_decode_error_reaches_training_process(folder, tmp_path):
    """A file that breaks after indexing: the worker's DataError is raised in the training process."""
    _, _, (tr, _), _ = folder
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    broken = dataclasses.replace(tr, files=[str(bad)] + tr.files[1:])
    loader = StreamingLoader(broken, batch_size=N_TRAIN, train=False, num_workers=2)
    with pytest.raises(DataError, match="broken.png: cannot read this image"):
        list(loader)
    # The re-raised exception's traceback is a reference cycle holding the DataLoader iterator; torn
    # down by the garbage collector, its workers miss the stop message and each waits out torch's 5 s
    # status check. Stop them now.
    loader._loader._iterator._shutdown_workers()


# ----------------------------------------------------------------------------- sharding, like test_data.py

SHARD_CASES = [(40, 8, 1), (37, 8, 2), (26, 8, 2), (13, 4, 2), (29, 6, 3), (25, 12, 3), (5, 6, 3), (4, 3, 3)]


@pytest.mark.parametrize("n,batch,world", SHARD_CASES)
@pytest.mark.parametrize("train", [True, False])
def test_every_sample_exactly_once(folder, n, batch, world, train):
    """An index of n entries (one PNG repeated) whose label is the entry's position names the samples."""
    _, _, (tr, _), _ = folder
    index = ImageFolderIndex([tr.files[0]] * n, torch.arange(n), [str(i) for i in range(n)], tr.mean, tr.std, 4)
    full, rem = divmod(n, batch)
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            ld = StreamingLoader(index, batch_size=batch, rank=rank, world_size=world, train=train, seed=5,
                                 num_workers=0)
            ld.set_epoch(epoch)
            got = [y for _, y in ld]
            assert len(got) == len(ld) and all(torch.equal(a, b) for a, b in zip(got, ld.epoch_indices()))
            assert all(len(y) == batch // world for y in got[:full]) and ld.num_samples() == sum(map(len, got))
            per_rank.append(got)
        assert len({len(got) for got in per_rank}) == 1, "every rank takes the same number of steps"
        seen = torch.cat([y for got in per_rank for y in got]).tolist()
        assert len(seen) == len(set(seen)), "ranks are disjoint and no sample repeats"
        if train and 0 < rem < world:  # the documented rule: a remainder smaller than world_size is left out
            assert len(seen) == n - rem
        else:
            assert sorted(seen) == list(range(n))
        if not train:
            merged = [torch.cat([got[k] for got in per_rank]) for k in range(len(per_rank[0]))]
            assert torch.cat(merged).tolist() == list(range(n))


def test_index_validation():
    with pytest.raises(DataError, match="labels must be int64 of length 2"):
        ImageFolderIndex(["a", "b"], torch.zeros(3, dtype=torch.int64), ["x"], (0, 0, 0), (1, 1, 1), 4)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 1\)"):
        ImageFolderIndex(["a"], torch.tensor([1]), ["x"], (0, 0, 0), (1, 1, 1), 4)
    with pytest.raises(DataError, match="positive number of pixels"):
        ImageFolderIndex(["a"], torch.tensor([0]), ["x"], (0, 0, 0), (1, 1, 1), 0)
    index = ImageFolderIndex([Path("a")], [0], ["x"], (0, 0, 0), (1, 1, 1), 4)  # Paths and lists are fine
    assert index.files == ["a"] and index.labels.dtype == torch.int64 and index.mean == (0.0, 0.0, 0.0)
