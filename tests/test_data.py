"""Tests of the dataset loaders (digits, and MNIST and CIFAR10 on generated files) and dequantisation."""

import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

from infocnf.config import DataConfig
from infocnf.data import Split, dequantize, iterate_batches, load_splits


def rows(split: Split) -> Counter:
    """Multiset of (image bytes, label) pairs, to compare splits without their order."""
    return Counter((image.numpy().tobytes(), int(label)) for image, label in zip(split.images, split.labels))


def test_digits_split_sizes():
    splits = load_splits(DataConfig(name="digits"))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1294, 144, 359)
    assert splits.shape == (1, 8, 8)
    assert (splits.levels, splits.num_classes) == (17, 10)
    assert splits.train.images.dtype == torch.uint8
    assert int(splits.train.images.max()) == 16
    assert not splits.flip_train


def test_digits_splits_deterministic():
    first = load_splits(DataConfig(name="digits", split_seed=4))
    second = load_splits(DataConfig(name="digits", split_seed=4))
    other = load_splits(DataConfig(name="digits", split_seed=5))
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(first, name).images, getattr(second, name).images)
        assert torch.equal(getattr(first, name).labels, getattr(second, name).labels)
    assert not torch.equal(first.test.labels, other.test.labels)


def test_digits_splits_disjoint():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = Split(
        torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1), torch.from_numpy(bunch.target.astype(np.int64))
    )
    splits = load_splits(DataConfig(name="digits"))
    # The three splits together are the whole dataset, each image used exactly once.
    assert rows(splits.train) + rows(splits.val) + rows(splits.test) == rows(full)


def test_dequantize_range():
    levels = 256
    # One million pixels at the top level: float32 rounding of (255 + u) / 256 would reach 1.0
    # for a few of them without the clamp.
    images = torch.cat([torch.zeros(1000, dtype=torch.uint8), torch.full((1_000_000,), 255, dtype=torch.uint8)])
    x = dequantize(images, levels, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32
    assert float(x.min()) >= 0.0
    assert float(x.max()) < 1.0
    # Each level k maps into [k / levels, (k + 1) / levels).
    assert float(x[:1000].max()) < 1 / levels
    assert float(x[1000:].min()) >= 255 / levels


def test_dequantize_seeded():
    images = torch.randint(0, 17, (4, 1, 8, 8), dtype=torch.uint8)
    first = dequantize(images, 17, torch.Generator().manual_seed(3))
    second = dequantize(images, 17, torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    assert torch.equal((first * 17).floor().to(torch.uint8), images)


def test_iterate_batches_covers_every_example():
    split = Split(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
    labels = torch.cat([labels for _, labels in iterate_batches(split, 4, shuffle=True, seed=1)])
    assert sorted(labels.tolist()) == list(range(10))
    dropped = list(iterate_batches(split, 4, shuffle=False, drop_last=True))
    assert [len(labels) for _, labels in dropped] == [4, 4]


def write_idx(path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file: magic 0x0000 08 <ndim>, big-endian sizes, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root, generator: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    written = {}
    for prefix, count in (("train", 20), ("t10k", 6)):
        images = generator.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = generator.integers(0, 10, count, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[prefix] = (images, labels)
    return written


def test_mnist_loads_idx_files(tmp_path):
    written = write_mnist(tmp_path, np.random.default_rng(0))
    splits = load_splits(DataConfig(name="mnist", data_root=str(tmp_path)))

    assert splits.shape == (1, 28, 28)
    assert (splits.levels, splits.num_classes) == (256, 10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 6)
    test_images, test_labels = written["t10k"]
    assert torch.equal(splits.test.images, torch.from_numpy(test_images).unsqueeze(1))
    assert torch.equal(splits.test.labels, torch.from_numpy(test_labels.astype(np.int64)))
    train_images, train_labels = written["train"]
    full_train = Split(torch.from_numpy(train_images).unsqueeze(1), torch.from_numpy(train_labels.astype(np.int64)))
    assert rows(splits.train) + rows(splits.val) == rows(full_train)
    assert not splits.flip_train


def write_cifar10(root, generator: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        # Rows of 3072 bytes: the red plane, then green, then blue, each 32x32 row-major.
        data = generator.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = generator.integers(0, 10, 3).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, handle)
        written[name] = (data, labels)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": classes}, handle)
    return written


def test_cifar10_loads_pickled_batches(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path, np.random.default_rng(0))
    # torchvision compares each CIFAR10 file with the md5 sum of the official release, which a
    # generated file cannot match. The check is replaced by "the file exists" for this test only;
    # everything else (unpickling, reshaping to images) is torchvision's own code.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    splits = load_splits(DataConfig(name="cifar10", data_root=str(tmp_path)))

    assert splits.shape == (3, 32, 32)
    assert (splits.levels, splits.num_classes) == (256, 10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (13, 2, 3)
    assert splits.flip_train
    test_data, test_labels = written["test_batch"]
    assert torch.equal(splits.test.images, torch.from_numpy(test_data).reshape(3, 3, 32, 32))
    assert splits.test.labels.tolist() == test_labels
    train_data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    full_train = Split(torch.from_numpy(train_data).reshape(15, 3, 32, 32), torch.tensor(train_labels))
    assert rows(splits.train) + rows(splits.val) == rows(full_train)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_load_splits_missing_folder(tmp_path, name):
    root = tmp_path / "absent"
    with pytest.raises(ValueError, match=f"data folder not found: .*absent \\(data.data_root for {name}\\)"):
        load_splits(DataConfig(name=name, data_root=str(root)))


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_load_splits_empty_folder(tmp_path, name):
    with pytest.raises(ValueError, match=f"{name} files not found or corrupted under"):
        load_splits(DataConfig(name=name, data_root=str(tmp_path)))
