"""resnet_scale.data: sources, on-disk formats, and the sharded device loader (CPU, simulated ranks)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    import _fixtures_data as fx
except ImportError:  # --import-mode=importlib, or tests/ made a package
    from tests import _fixtures_data as fx
from resnet_scale.data import SOURCES, DataError, DeviceLoader, ImageSet, build_datasets, native_image_size

REPO = Path(__file__).resolve().parents[1]


def indexed_set(n: int, size: int = 4, seed: int = 0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> ImageSet:
    """n random images whose label is the sample's index, so yielded labels name the samples."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n), [str(i) for i in range(n)], mean, std)


def ranks(data, world, **kw):
    return [DeviceLoader(data, rank=r, world_size=world, **kw) for r in range(world)]


# ----------------------------------------------------------------------------- sharding

SHARD_CASES = [  # (N, global batch, world size)
    (40, 8, 1), (37, 8, 1), (40, 8, 2), (37, 8, 2), (26, 8, 2), (13, 4, 2),
    (36, 12, 3), (29, 6, 3), (25, 12, 3), (5, 6, 3), (4, 3, 3),
]


@pytest.mark.parametrize("n,batch,world", SHARD_CASES)
@pytest.mark.parametrize("train", [True, False])
def test_every_sample_exactly_once(n, batch, world, train):
    data = indexed_set(n)
    full, rem = divmod(n, batch)
    for epoch in (0, 1):
        loaders = ranks(data, world, batch_size=batch, train=train, seed=3)
        per_rank = []
        for ld in loaders:
            ld.set_epoch(epoch)
            got = [y for _, y in ld]
            idx = ld.epoch_indices()
            assert len(got) == len(idx) == len(ld) == len(loaders[0])
            assert all(torch.equal(a, b) for a, b in zip(got, idx)), "yielded labels == epoch_indices"
            assert all(len(y) == batch // world for y in got[:full])
            assert ld.num_samples() == sum(len(y) for y in got)
            per_rank.append(got)
        tails = [len(got[-1]) for got in per_rank] if len(per_rank[0]) > full else []
        if tails:
            assert max(tails) - min(tails) <= 1 and sum(tails) == rem
        seen = torch.cat([y for got in per_rank for y in got]).tolist()
        assert len(seen) == len(set(seen)), "ranks are disjoint and no sample repeats"
        if train and 0 < rem < world:  # the documented rule: a remainder smaller than world_size is left out
            assert len(per_rank[0]) == full
            single = DeviceLoader(data, batch_size=batch, seed=3)
            single.set_epoch(epoch)
            order = torch.cat(single.epoch_indices())
            assert sorted(seen) == sorted(order[: n - rem].tolist())
            assert set(order[n - rem:].tolist()).isdisjoint(seen)
        else:
            assert sorted(seen) == list(range(n))
            if train:
                assert min(tails, default=1) >= 1
        if not train:  # in order: batch k of rank 0, rank 1, ... is one contiguous range
            merged = [torch.cat([got[k] for got in per_rank]) for k in range(len(per_rank[0]))]
            assert torch.cat(merged).tolist() == list(range(n))


def test_permutation_per_epoch_and_reproducible():
    data = indexed_set(50)
    a, b = DeviceLoader(data, batch_size=10, seed=1), DeviceLoader(data, batch_size=10, seed=1)
    e0 = torch.cat(a.epoch_indices())
    assert torch.equal(e0, torch.cat(b.epoch_indices()))
    assert torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in a])), "same epoch twice"
    a.set_epoch(1)
    assert not torch.equal(e0, torch.cat(a.epoch_indices()))
    assert not torch.equal(e0, torch.cat(DeviceLoader(data, batch_size=10, seed=2).epoch_indices()))
    assert not torch.equal(e0, torch.arange(50))


def test_batch_not_divisible_by_world_size():
    with pytest.raises(DataError, match=r"global batch size 10 .* world size 4.*multiple of 4"):
        DeviceLoader(indexed_set(20), batch_size=10, world_size=4, rank=0)


# ----------------------------------------------------------------------------- augmentation

def _batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_augmentation_deterministic_per_seed_and_epoch():
    data = indexed_set(24, size=8)
    kw = dict(batch_size=8, crop_padding=2, flip=True, seed=5)
    first, again = _batches(DeviceLoader(data, **kw)), _batches(DeviceLoader(data, **kw))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, again))
    by_label = {int(l): x for xb, yb in first for x, l in zip(xb, yb)}
    later = {int(l): x for xb, yb in _batches(DeviceLoader(data, **kw), 1) for x, l in zip(xb, yb)}
    assert any(not torch.equal(by_label[i], later[i]) for i in range(24)), "a new epoch re-draws crops/flips"


def _shift_of(out: torch.Tensor, inp: torch.Tensor, pad: int):
    """All (dy, dx, flipped) such that ``out`` is the zero-padded ``inp`` cropped at (dy, dx), maybe mirrored."""
    padded = torch.nn.functional.pad(inp, (pad, pad, pad, pad))
    h, w = inp.shape[1:]
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            hits += [(dy, dx, f) for f, c in ((False, crop), (True, crop.flip(2))) if torch.equal(c, out)]
    return hits


@pytest.mark.parametrize("pad,flip", [(3, False), (0, True), (2, True)])
def test_crop_is_shifted_copy_with_zero_border_and_flip_is_mirror(pad, flip):
    data = indexed_set(32, size=6)  # pixels 1..255, so a zero can only come from the padding
    (x, y), *_ = _batches(DeviceLoader(data, batch_size=32, crop_padding=pad, flip=flip, seed=0))
    found = []
    for out, label in zip(x, y):
        raw = (out * 255).round().to(torch.uint8)
        hits = _shift_of(raw, data.images[label], pad)
        assert len(hits) == 1, f"sample {int(label)}: not a unique shifted/mirrored copy ({hits})"
        found.append(hits[0])
    assert len({h[:2] for h in found}) > (1 if pad else 0), "offsets vary per sample"
    assert {h[2] for h in found} == ({False, True} if flip else {False})


def test_augmentation_same_for_one_and_two_ranks():
    data = indexed_set(40, size=8)
    kw = dict(batch_size=8, crop_padding=3, flip=True, seed=9)
    for epoch in (0, 1):
        one = {int(l): x for xb, yb in _batches(DeviceLoader(data, **kw), epoch) for x, l in zip(xb, yb)}
        two = {int(l): x for ld in ranks(data, 2, **kw) for xb, yb in _batches(ld, epoch) for x, l in zip(xb, yb)}
        assert one.keys() == two.keys() == set(range(40))
        assert all(torch.equal(one[i], two[i]) for i in range(40))


def test_eval_mode_does_not_augment_or_shuffle():
    data = indexed_set(10, size=5)
    xs, ys = zip(*_batches(DeviceLoader(data, batch_size=4, train=False, crop_padding=2, flip=True), 3))
    assert torch.equal(torch.cat(ys), torch.arange(10))
    assert torch.equal((torch.cat(xs) * 255).round().to(torch.uint8), data.images)


def test_normalisation_dtype_and_channels_last():
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    data = indexed_set(6, size=5, mean=mean, std=std)
    x, _ = next(iter(DeviceLoader(data, batch_size=6, train=False)))
    expected = (data.images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)
    x, _ = next(iter(DeviceLoader(data, batch_size=6, channels_last=True, dtype=torch.bfloat16)))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    assert x.stride()[1] == 1 and not x.is_contiguous()


# ----------------------------------------------------------------------------- synthetic, digits, folders

def test_native_sizes_and_unknown_source():
    assert SOURCES == ("cifar10", "cifar100", "digits", "synthetic", "imagefolder")
    assert [native_image_size(s) for s in SOURCES] == [32, 32, 16, 32, None]
    with pytest.raises(DataError, match="choose one of"):
        build_datasets("mnist")


def test_synthetic():
    tr, te = build_datasets("synthetic", seed=4, synthetic_samples=(64, 16), num_classes=7, image_size=20)
    assert tr.images.shape == (64, 3, 20, 20) and te.images.shape == (16, 3, 20, 20) and len(tr) == 64
    assert tr.images.dtype == torch.uint8 and tr.labels.dtype == torch.int64 and int(tr.labels.max()) < 7
    assert tr.classes == [str(i) for i in range(7)] and te.mean == tr.mean and 0.45 < tr.mean[0] < 0.55
    again, _ = build_datasets("synthetic", seed=4, synthetic_samples=(64, 16), num_classes=7, image_size=20)
    other, _ = build_datasets("synthetic", seed=5, synthetic_samples=(64, 16), num_classes=7, image_size=20)
    assert torch.equal(tr.images, again.images) and not torch.equal(tr.images, other.images)
    assert not torch.equal(tr.images[:16], te.images)


def test_digits_fixed_stratified_split():
    pytest.importorskip("sklearn")
    tr, te = build_datasets("digits", seed=0)
    tr2, te2 = build_datasets("digits", seed=123)
    assert tr.images.shape == (1437, 3, 16, 16) and te.images.shape == (360, 3, 16, 16)
    assert tr.classes == [str(d) for d in range(10)]
    assert torch.equal(te.images, te2.images) and torch.equal(te.labels, te2.labels), "split ignores seed"
    counts = torch.bincount(te.labels, minlength=10)
    assert counts.min() >= 34, f"stratified: ~36 of each class in test, got {counts.tolist()}"
    assert torch.equal(tr.images[:, 0], tr.images[:, 2]) and int(tr.images.max()) == 255
    assert all(0 < m < 1 for m in tr.mean) and te.std == tr.std
    assert build_datasets("digits", image_size=32)[0].images.shape[-2:] == (32, 32)


def test_digits_read_without_scikit_learn_equal_load_digits_and_its_split():
    """The digits file read directly and the stored split are scikit-learn's own: ``load_digits`` and
    ``train_test_split(test_size=0.2, stratify=labels, random_state=0)``."""
    pytest.importorskip("sklearn")
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from resnet_scale.data.digits_split import TEST_INDICES
    from resnet_scale.data.sources import digits_arrays

    values, labels = digits_arrays()
    digits = load_digits()
    assert np.array_equal(values, digits.images) and np.array_equal(labels, digits.target)
    _, test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    assert tuple(sorted(int(i) for i in test)) == TEST_INDICES


def test_imagefolder(tmp_path):
    pytest.importorskip("PIL")
    written = fx.write_image_folder(tmp_path, classes=("dog", "cat"), size=(24, 20))
    with pytest.raises(DataError, match="image-size"):
        build_datasets("imagefolder", data_dir=str(tmp_path))
    tr, te = build_datasets("imagefolder", data_dir=str(tmp_path), image_size=20)
    assert tr.classes == ["cat", "dog"] and tr.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert tr.images.shape == (6, 3, 20, 20) and te.images.shape == (4, 3, 20, 20)
    # 24x20 at image_size 20: no resize, a 2-pixel center crop of the width.
    assert np.array_equal(tr.images[0].permute(1, 2, 0).numpy(), written["train"]["cat"][0][:, 2:22])
    (tmp_path / "test").rename(tmp_path / "val")
    assert len(build_datasets("imagefolder", data_dir=str(tmp_path), image_size=8)[1]) == 4


def test_imagefolder_errors(tmp_path):
    pytest.importorskip("PIL")
    for split in ("train", "test"):  # two classes (one is refused on its own)
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
    with pytest.raises(DataError, match=r"train[/\\]a: class folder holds no images"):
        build_datasets("imagefolder", data_dir=str(tmp_path), image_size=8)
    fx.write_image_folder(tmp_path / "x", classes=("a", "b"))
    (tmp_path / "x" / "test" / "b").rename(tmp_path / "x" / "test" / "c")
    with pytest.raises(DataError, match=r"only in train: \['b'\]; only in test: \['c'\]"):
        build_datasets("imagefolder", data_dir=str(tmp_path / "x"), image_size=8)
    with pytest.raises(DataError, match="missing train/"):
        build_datasets("imagefolder", data_dir=str(tmp_path / "nothing"), image_size=8)


# ----------------------------------------------------------------------------- CIFAR formats

@pytest.fixture(scope="module")
def pixels():
    return fx.random_cifar(20, 4, seed=1)  # 5 train batches of 4 images + a test batch of 4


def _assert_written(pair, arrays, classes=None):
    tr, te = pair
    assert torch.equal(tr.images, torch.from_numpy(arrays[0])) and tr.labels.tolist() == list(arrays[1])
    assert torch.equal(te.images, torch.from_numpy(arrays[2])) and te.labels.tolist() == list(arrays[3])
    assert tr.mean == (0.4914, 0.4822, 0.4465) and te.std == (0.2470, 0.2435, 0.2616)
    if classes is not None:
        assert tr.classes == classes


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL, "numpy1"])
def test_cifar10_pickles(tmp_path, pixels, protocol):
    folder = fx.write_cifar10_pickles(tmp_path, *pixels, protocol=2 if protocol == "numpy1" else protocol)
    if protocol == "numpy1":  # the original files (and numpy 1.x) name numpy.core.multiarray._reconstruct
        for f in folder.iterdir():
            f.write_bytes(f.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    for where in (tmp_path, folder):  # the folder itself or its parent
        pair = build_datasets("cifar10", data_dir=str(where), download=False)
        _assert_written(pair, pixels, ["airplane", "automobile", "bird", "cat", "deer",
                                       "dog", "frog", "horse", "ship", "truck"])
    assert build_datasets("cifar10", data_dir=str(tmp_path), image_size=16)[0].images.shape == (20, 3, 16, 16)


def test_cifar100_pickles(tmp_path):
    arrays = fx.random_cifar(12, 5, num_classes=100, seed=2)
    fx.write_cifar100_pickles(tmp_path, *arrays)
    tr, te = build_datasets("cifar100", data_dir=str(tmp_path), download=False)
    assert torch.equal(tr.images, torch.from_numpy(arrays[0])) and te.labels.tolist() == list(arrays[3])
    assert len(tr.classes) == 100 and tr.classes[7] == "fine_07" and tr.mean == (0.5071, 0.4865, 0.4409)


@pytest.mark.parametrize("split_dirs", [False, True])
def test_cifar10_parquet_equals_pickles(tmp_path, pixels, split_dirs):
    pytest.importorskip("pyarrow")
    fx.write_cifar10_parquet(tmp_path / "pq", *pixels, train_shards=2, split_dirs=split_dirs)
    from_parquet = build_datasets("cifar10", data_dir=str(tmp_path / "pq"), download=False)
    fx.write_cifar10_pickles(tmp_path / "pk", *pixels)
    from_pickle = build_datasets("cifar10", data_dir=str(tmp_path / "pk"), download=False)
    for a, b in zip(from_parquet, from_pickle):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert (a.classes, a.mean, a.std) == (b.classes, b.mean, b.std)


def test_cifar100_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    arrays = fx.random_cifar(6, 3, num_classes=100, seed=3)
    fx.write_cifar10_parquet(tmp_path, *arrays, subdir="cifar100", image_col="img", label_col="fine_label",
                          label_names=[f"c{i}" for i in range(100)])
    tr, te = build_datasets("cifar100", data_dir=str(tmp_path), download=False)
    assert torch.equal(te.images, torch.from_numpy(arrays[2])) and tr.classes[99] == "c99"


def test_cifar10_save_to_disk_and_download_path(tmp_path, pixels, monkeypatch):
    datasets = pytest.importorskip("datasets")
    folder = fx.write_cifar10_save_to_disk(tmp_path, *pixels)
    _assert_written(build_datasets("cifar10", data_dir=str(tmp_path), download=False), pixels)
    _assert_written(build_datasets("cifar10", data_dir=str(folder), download=False), pixels)
    # The download path: load_dataset's DatasetDict goes through the same converter; with a
    # --data-dir it is saved there so the next (offline) run reads it.
    from resnet_scale.data import cifar

    calls = []
    monkeypatch.setattr(cifar, "_hub_unreachable", lambda _: None)
    fake_hub = lambda repo: calls.append(repo) or datasets.load_from_disk(str(folder))  # noqa: E731
    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    _assert_written(build_datasets("cifar10"), pixels)
    _assert_written(build_datasets("cifar10", data_dir=str(tmp_path / "new")), pixels)
    assert calls == ["uoft-cs/cifar10"] * 2 and (tmp_path / "new" / "cifar10" / "dataset_dict.json").is_file()
    _assert_written(build_datasets("cifar10", data_dir=str(tmp_path / "new"), download=False), pixels)


# ----------------------------------------------------------------------------- offline, corrupt input

def test_download_offline_fails_fast_with_advice(tmp_path):
    pytest.importorskip("datasets")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    code = ("from resnet_scale.data import build_datasets, DataError\n"
            "try:\n    build_datasets('cifar10', data_dir=None)\n"
            "except DataError as e:\n    print('DATAERROR', e)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30, "offline must fail fast, not after retries"
    assert "DATAERROR" in proc.stdout, proc.stdout + proc.stderr
    assert "--data-dir" in proc.stdout and "--data digits" in proc.stdout and "cifar-10-batches-py" in proc.stdout


def test_unreachable_hub_is_detected_fast_and_download_false(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import socket

    def refuse(*a, **k):
        raise OSError("Name or service not known")

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not try to download"))
    with pytest.raises(DataError, match=r"cannot connect.*--data-dir.*--data digits"):
        build_datasets("cifar100")
    with pytest.raises(DataError, match=r"downloading is disabled.*--data-dir.*--data digits"):
        build_datasets("cifar10", download=False)


def _rewrite(path: Path, **changes):
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")  # our own fixture file
    d.update({k.encode(): v for k, v in changes.items()})
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def test_corrupt_pickles(tmp_path, pixels):
    folder = fx.write_cifar10_pickles(tmp_path, *pixels)
    load = lambda: build_datasets("cifar10", data_dir=str(tmp_path), download=False)  # noqa: E731
    batch = folder / "data_batch_3"
    good = batch.read_bytes()
    batch.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"data_batch_3: .*truncated"):
        load()
    batch.write_bytes(good)
    _rewrite(batch, labels=[0, 1, 10, 2])
    with pytest.raises(DataError, match=r"data_batch_3: label 10 at position 2 is outside \[0, 10\)"):
        load()
    batch.write_bytes(good)
    _rewrite(batch, data=np.zeros((4, 3000), np.uint8))
    with pytest.raises(DataError, match=r"data_batch_3: 'data' has shape \(4, 3000\)"):
        load()
    batch.write_bytes(pickle.dumps({b"data": os.getcwd}, protocol=2))  # a global outside the allow-list
    with pytest.raises(DataError, match=r"data_batch_3: .*refusing to load global .*getcwd"):
        load()
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="missing test_batch"):
        load()


def test_corrupt_or_wrong_parquet_and_empty_dir(tmp_path, pixels):
    pytest.importorskip("pyarrow")
    folder = fx.write_cifar10_parquet(tmp_path, *pixels)
    test_file = folder / "test-00000-of-00001.parquet"
    test_file.write_bytes(test_file.read_bytes()[:100])
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet: cannot read"):
        build_datasets("cifar10", data_dir=str(tmp_path), download=False)
    small = (pixels[0][:, :, :28, :28].copy(), pixels[1], pixels[2], pixels[3])
    fx.write_cifar10_parquet(tmp_path / "small", *small)
    with pytest.raises(DataError, match=r"row 0: image is 28x28, cifar10 images are 32x32"):
        build_datasets("cifar10", data_dir=str(tmp_path / "small"), download=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no cifar10 data.*cifar-10-batches-py"):
        build_datasets("cifar10", data_dir=str(tmp_path / "empty"), download=False)
    (tmp_path / "empty" / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"holds cifar-10-python.tar.gz: extract it"):
        build_datasets("cifar10", data_dir=str(tmp_path / "empty"))


def test_import_needs_no_optional_dependency():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('datasets', 'pyarrow', 'sklearn', 'PIL', 'pandas'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from resnet_scale.data import build_datasets, DataError\n"
            "tr, te = build_datasets('synthetic', synthetic_samples=(8, 4))\n"
            "try:\n    build_datasets('digits')\nexcept DataError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'resnet-scale[demo]'" in proc.stdout
