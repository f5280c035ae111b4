"""Datasets (embedded digits, MNIST, CIFAR10), seeded splits, dequantisation and batching."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import DataConfig

__all__ = ["Split", "DataSplits", "load_splits", "dequantize", "random_horizontal_flip", "iterate_batches"]

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Images as integer levels and their labels.

    ``images`` is uint8 of shape (batch, channels, height, width) with values in [0, levels - 1];
    ``labels`` is int64 of shape (batch,).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class DataSplits:
    """Train, validation and test splits of one dataset, with its shape and number of levels."""

    name: str
    train: Split
    val: Split
    test: Split
    shape: tuple[int, int, int]
    levels: int
    num_classes: int
    # Random horizontal flips during training (CIFAR10 only).
    flip_train: bool

    def to(self, device: torch.device | str) -> DataSplits:
        return DataSplits(
            self.name,
            self.train.to(device),
            self.val.to(device),
            self.test.to(device),
            self.shape,
            self.levels,
            self.num_classes,
            self.flip_train,
        )


def _split_off(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split a seeded random ``fraction`` off ``split``; returns (rest, held_out)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=generator)
    n_held = max(1, int(round(fraction * len(split))))
    held, rest = order[:n_held], order[n_held:]
    return Split(split.images[rest], split.labels[rest]), Split(split.images[held], split.labels[held])


def _load_digits(config: DataConfig) -> DataSplits:
    # scikit-learn ships the 1,797 UCI 8x8 digits with 17 grey levels (0..16); nothing is downloaded.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    full = Split(images, labels)
    rest, test = _split_off(full, config.test_fraction, config.split_seed)
    train, val = _split_off(rest, config.val_fraction, config.split_seed + 1)
    return DataSplits("digits", train, val, test, (1, 8, 8), 17, 10, flip_train=False)


def _check_root(config: DataConfig) -> Path:
    root = Path(config.data_root).expanduser()
    if not root.is_dir() and not config.download:
        raise ValueError(
            f"data folder not found: {root} (data.data_root for {config.name}); create it and put the "
            f"torchvision {config.name.upper()} files there, or set data.download = true where there is network"
        )
    return root


def _torchvision_dataset(cls: type, root: Path, train: bool, config: DataConfig):
    try:
        return cls(root=str(root), train=train, download=config.download)
    except RuntimeError as exc:
        raise ValueError(
            f"{config.name} files not found or corrupted under {root}: {exc}. Place the official files "
            f"there, or set data.download = true where there is network"
        ) from exc


def _load_mnist(config: DataConfig) -> DataSplits:
    from torchvision.datasets import MNIST

    root = _check_root(config)
    splits = []
    for train in (True, False):
        ds = _torchvision_dataset(MNIST, root, train, config)
        images = ds.data.to(torch.uint8).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
        splits.append(Split(images, ds.targets.to(torch.int64)))
    train, val = _split_off(splits[0], config.val_fraction, config.split_seed)
    return DataSplits("mnist", train, val, splits[1], (1, 28, 28), 256, 10, flip_train=False)


def _load_cifar10(config: DataConfig) -> DataSplits:
    from torchvision.datasets import CIFAR10

    root = _check_root(config)
    splits = []
    for train in (True, False):
        ds = _torchvision_dataset(CIFAR10, root, train, config)
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        splits.append(Split(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)))
    train, val = _split_off(splits[0], config.val_fraction, config.split_seed)
    return DataSplits("cifar10", train, val, splits[1], (3, 32, 32), 256, 10, flip_train=config.horizontal_flip)


_LOADERS = {"digits": _load_digits, "mnist": _load_mnist, "cifar10": _load_cifar10}


def load_splits(config: DataConfig) -> DataSplits:
    """Load a dataset and split it into train, validation and test sets.

    Digits: 20 % test and 10 % of the rest for validation with the default fractions, that is
    1,294 / 144 / 359 images. MNIST and CIFAR10: their own test set; validation held out of train.
    """
    if config.name not in _LOADERS:
        raise ValueError(f"unknown dataset {config.name!r}: choose one of {', '.join(_LOADERS)}")
    splits = _LOADERS[config.name](config)
    if config.max_examples:
        for name in ("train", "val", "test"):
            split = getattr(splits, name)
            if len(split) > config.max_examples:
                _, subset = _split_off(split, config.max_examples / len(split), config.split_seed + 2)
                setattr(splits, name, subset)
    log.info(
        "loaded %s: %d train, %d validation, %d test images of shape %s",
        splits.name,
        len(splits.train),
        len(splits.val),
        len(splits.test),
        splits.shape,
    )
    return splits


def dequantize(images: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Map integer levels to [0, 1) with uniform noise: x = (level + u) / levels, u ~ U(0, 1).

    Uniform dequantisation turns the discrete likelihood into a lower bound on the continuous one
    (Theis et al. 2016); for 8-bit data this is (255 x + u) / 256 with x in [0, 1].
    """
    noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=torch.float32)
    x = (images.float() + noise) / levels
    # In float32, levels - 1 + u rounds up to levels for u within about 1e-5 of 1 (255 + u for
    # 8-bit data), which would give exactly 1.0; clamp to the largest float32 below 1.
    return x.clamp_max(1.0 - 2.0**-24)


def random_horizontal_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of (batch, channels, height, width) left-right with probability 0.5."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def iterate_batches(
    split: Split, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches; the order depends only on ``seed`` when shuffled.

    A partial last batch is yielded unless ``drop_last``, so evaluation covers every example.
    """
    n = len(split)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(split.images.device)
    else:
        order = torch.arange(n, device=split.images.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield split.images[index], split.labels[index]
