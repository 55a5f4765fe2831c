"""The datasets a generative spec names in `dataset:` (`labfleet list datasets`).

- `digits`: scikit-learn's `load_digits`, 1797 images of 8x8 pixels with intensities 0..16 (kept as
  counts: the VAE's likelihood is a Binomial(16, p) per pixel), split 1257 / 270 / 270 into train /
  validation / test by a fixed permutation (seed 0), the same for every run.
- `ring8`: 8 Gaussians on the unit circle, sigma 0.01; `grid25`: 25 Gaussians on {-4,-2,0,2,4}^2,
  sigma 0.05 (the PacGAN / VEEGAN benchmarks). Samples are drawn from the mixture with the trial's
  seed: a fixed train set of `n_train` points, and fresh validation/test sets.
- `fashion_mnist`, `mnist`, `images`: uint8 images read from local files (`labfleet.data.images`), never
  downloaded. `fashion_mnist` is found where Debian's `dataset-fashion-mnist` package puts it (or under
  `$LABFLEET_DATA/fashion-mnist`); `dataset_kwargs.path` names any `.npz` file (`x_train`, `x_test`,
  optional `y_train`, `y_test`; (n, H, W) or (n, H, W, C)), a directory of IDX files, a folder of PNG /
  JPEG files in `train/` and `test/` (class subfolders as labels; `size: [H, W]` scales and centre-crops
  them), or a Hugging Face `save_to_disk` directory. The validation split
  is `n_valid` training images (default: a tenth, at most 5000) chosen by a fixed permutation; `limit: N`
  trains on the first N of the rest, `eval_limit: M` keeps the first M of the validation and test splits
  (both fixed, whatever the seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPLIT_SEED = 0


@dataclass
class Dataset:
    """Arrays of shape (n, *shape): float32, or uint8 for 8-bit images; `levels` is the number of intensity
    levels - 1 for count images (16 for digits, 255 for 8-bit images), None for continuous points. `modes` and
    `sigma` describe a Gaussian mixture (ring8, grid25)."""

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    shape: tuple[int, ...]
    levels: int | None = None
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    modes: np.ndarray | None = None
    sigma: float | None = None

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    summary: str
    load: Callable[..., Dataset]
    shape: tuple[int, ...]  # of one example: (C, H, W) images or (D,) points; () when read from the file
    kwargs: tuple[str, ...] = ()  # the dataset_kwargs its loader takes


def _split(n: int, sizes: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_valid, n_test = sizes
    return order[n_valid + n_test:], order[:n_valid], order[n_valid:n_valid + n_test]


def load_digits_dataset(seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), counts 0..16
    train, valid, test = _split(len(images), (270, 270))
    labels = bunch.target.astype(np.int64)
    return Dataset("digits", images[train], images[valid], images[test], (1, 8, 8), levels=16,
                   labels={"train": labels[train], "valid": labels[valid], "test": labels[test]})


def ring_modes(count: int = 8, radius: float = 1.0) -> np.ndarray:
    angles = 2 * math.pi * np.arange(count) / count
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1).astype(np.float32)


def grid_modes() -> np.ndarray:
    axis = np.array([-4.0, -2.0, 0.0, 2.0, 4.0], dtype=np.float32)
    return np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)


def sample_mixture(modes: np.ndarray, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points from the equal-weight Gaussian mixture with these means and isotropic `sigma`."""
    which = rng.integers(len(modes), size=n)
    return (modes[which] + sigma * rng.standard_normal((n, modes.shape[1]))).astype(np.float32)


def _mixture(name: str, modes: np.ndarray, sigma: float, seed: int, n_train: int = 100_000,
             n_eval: int = 10_000) -> Dataset:
    rng = np.random.default_rng([seed, 7919])
    return Dataset(name, sample_mixture(modes, sigma, n_train, rng), sample_mixture(modes, sigma, n_eval, rng),
                   sample_mixture(modes, sigma, n_eval, rng), (2,), modes=modes, sigma=sigma)


def load_ring8(seed: int = 0, n_train: int = 100_000) -> Dataset:
    return _mixture("ring8", ring_modes(), 0.01, seed, n_train)


def load_grid25(seed: int = 0, n_train: int = 100_000) -> Dataset:
    return _mixture("grid25", grid_modes(), 0.05, seed, n_train)


def default_n_valid(n_train: int) -> int:
    """Validation images held out of the training files unless `n_valid` says: a tenth, at most 5000."""
    return min(5000, max(1, n_train // 10))


def load_image_files(name: str, seed: int = 0, path: str | None = None, n_valid: int | None = None,
                     limit: int | None = None, eval_limit: int | None = None,
                     size: list[int] | None = None) -> Dataset:
    """8-bit images from local files (see `labfleet.data.images`), split into train / valid / test."""
    from labfleet.data import images

    arrays = images.read(name, path, None if size is None else (int(size[0]), int(size[1])))
    x_train, y_train = arrays["x_train"], arrays.get("y_train")
    n_valid = default_n_valid(len(x_train)) if n_valid is None else n_valid
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x_train))
    valid, train = order[:n_valid], order[n_valid:]
    train = np.sort(train)[:limit] if limit is not None else np.sort(train)
    valid = np.sort(valid)[:eval_limit]
    test = slice(0, eval_limit)
    labels = {} if y_train is None else {"train": y_train[train], "valid": y_train[valid]}
    if arrays.get("y_test") is not None:
        labels["test"] = arrays["y_test"][test]
    return Dataset(name, x_train[train], x_train[valid], arrays["x_test"][test], tuple(x_train.shape[1:]),
                   levels=255, labels=labels)


def _image_source(name: str) -> Callable[..., Dataset]:
    def load_named(seed: int = 0, **kwargs: Any) -> Dataset:
        return load_image_files(name, seed=seed, **kwargs)

    return load_named


IMAGE_KWARGS = ("path", "n_valid", "limit", "eval_limit", "size")

DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", "scikit-learn digits, 8x8 images (counts 0..16), 1257/270/270 split",
                          load_digits_dataset, (1, 8, 8)),
    "ring8": DatasetInfo("ring8", "8 Gaussians on the unit circle, sigma 0.01 (generated)", load_ring8, (2,),
                         ("n_train",)),
    "grid25": DatasetInfo("grid25", "25 Gaussians on {-4,-2,0,2,4}^2, sigma 0.05 (generated)", load_grid25, (2,),
                          ("n_train",)),
    "fashion_mnist": DatasetInfo("fashion_mnist", "Fashion-MNIST, 60k + 10k 28x28 images, 10 classes (Debian's "
                                 "dataset-fashion-mnist, or dataset_kwargs.path)", _image_source("fashion_mnist"),
                                 (1, 28, 28), IMAGE_KWARGS),
    "mnist": DatasetInfo("mnist", "MNIST from local files (dataset_kwargs.path: .npz or IDX directory)",
                         _image_source("mnist"), (1, 28, 28), IMAGE_KWARGS),
    "images": DatasetInfo("images", "8-bit images of any size, grey or RGB, from local files (dataset_kwargs.path)",
                          _image_source("images"), (), IMAGE_KWARGS),
}


def load(name: str, seed: int = 0, **kwargs: Any) -> Dataset:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name].load(seed=seed, **kwargs)
