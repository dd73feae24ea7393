"""Datasets (bundled 8×8 digits, MNIST from IDX files), binarization and input validation.

Images are returned as float32 tensors of shape ``[N, D]`` with intensities in [0, 1] and labels as
int64 tensors of shape ``[N]``. Nothing here touches the network unless ``download=True``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pyro_vae.util.errors import DataError
from pyro_vae.util.files import check_npz, regular_file
from pyro_vae.util.io import atomic_path

DATA_DIR_ENV = "PYRO_VAE_DATA_DIR"
DIGITS_TEST_SIZE = 300
DIGITS_SPLIT_SEED = 0
BINARIZATION_SEED_OFFSET = 7919
#: the most an IDX file may hold (MNIST's largest holds 47 MB)
IDX_LIMIT = 2**30

MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}
BINARIZED_MNIST_FILE = ("binarized_mnist.npz", "6a167d58bf86f02bdbe2f558ff907ce0")
BINARIZED_MNIST_SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class Split:
    """One split of a dataset: ``images`` ``[N, D]`` float32 in [0, 1], ``labels`` ``[N]`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    image_shape: tuple[int, int]
    num_classes: int

    @property
    def input_dim(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(
            self.name,
            self.train.to(device),
            self.test.to(device),
            self.image_shape,
            self.num_classes,
        )


def load_digits(test_size: int = DIGITS_TEST_SIZE, seed: int = DIGITS_SPLIT_SEED) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1,797 images, 64 pixels), scaled to [0, 1].

    The train/test split is a seeded permutation, the same on every machine.
    """
    from sklearn.datasets import load_digits as _sk_digits

    raw = _sk_digits()
    images = torch.as_tensor(raw.data, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(raw.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    return Dataset(
        "digits", Split(images[train], labels[train]), Split(images[test], labels[test]), (8, 8), 10
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array of its stored shape."""
    path = Path(path)
    regular_file(path, IDX_LIMIT)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read(IDX_LIMIT + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) > IDX_LIMIT:
        raise DataError(f"{path} holds more than the {IDX_LIMIT // 2**20} MiB an IDX file may hold")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataError(f"{path}: IDX header is truncated")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise DataError(
            f"{path}: IDX header promises shape {shape} ({expected} bytes of data), "
            f"the file holds {len(raw) - header_end}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header_end)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def md5sum(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        raise DataError(f"MNIST needs a folder: pass data_dir=DIR or set {DATA_DIR_ENV}")
    folder = Path(data_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DataError(f"data_dir {folder} is a file, not a folder")
    return folder


def download_mnist(data_dir: str | os.PathLike, mirrors: tuple[str, ...] = MNIST_MIRRORS) -> Path:
    """Download the four MNIST IDX files into ``data_dir``, verifying their published MD5 sums.

    Files already present with the right checksum are kept. Each file is written to a temporary
    name and renamed only once verified.
    """
    folder = Path(data_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for filename, md5 in MNIST_FILES.values():
        target = folder / filename
        if target.exists() and md5sum(target) == md5:
            continue
        errors = []
        for mirror in mirrors:
            try:
                with atomic_path(target, hold_signals=False) as tmp:  # Ctrl-C stops it
                    with (
                        urllib.request.urlopen(mirror + filename, timeout=60) as response,
                        open(tmp, "wb") as out,
                    ):
                        shutil.copyfileobj(response, out)
                    got = md5sum(tmp)
                    if got != md5:
                        raise DataError(f"checksum mismatch: expected {md5}, got {got}")
                break
            except (OSError, urllib.error.URLError, DataError) as exc:
                errors.append(f"{mirror}: {exc}")
        else:
            raise DataError(f"could not download {filename}: " + "; ".join(errors))
    return folder


def load_mnist(
    data_dir: str | os.PathLike | None = None, download: bool = False, verify: bool = True
) -> Dataset:
    """MNIST (60,000 train / 10,000 test, 28×28) from the four standard IDX files.

    ``data_dir`` defaults to the ``PYRO_VAE_DATA_DIR`` environment variable. With ``download=True``
    missing files are fetched; with ``verify=True`` every file's MD5 must match the published one.
    """
    folder = resolve_data_dir(data_dir)
    if download:
        download_mnist(folder)
    elif not folder.exists():
        raise DataError(f"data_dir {folder} does not exist (download=True fetches MNIST into it)")
    arrays = {}
    for key, (filename, md5) in MNIST_FILES.items():
        path = folder / filename
        if not path.exists():
            raise DataError(
                f"MNIST file {filename} not found in {folder} (fetch it with download=True)"
            )
        regular_file(path, IDX_LIMIT)
        if verify and md5sum(path) != md5:
            raise DataError(f"MNIST file {path} is corrupt: its MD5 is not the published {md5}")
        arrays[key] = read_idx(path)
    splits = {}
    image_shape = tuple(arrays["train_images"].shape[1:])
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if (
            images.ndim != 3
            or labels.ndim != 1
            or images.shape[0] != labels.shape[0]
            or images.shape[1:] != image_shape
        ):
            raise DataError(
                f"MNIST {split} files disagree: images {images.shape}, labels {labels.shape}"
            )
        splits[split] = Split(
            torch.from_numpy(images.reshape(len(images), -1)).float() / 255.0,
            torch.from_numpy(labels.astype(np.int64)),
        )
    return Dataset("mnist", splits["train"], splits["test"], image_shape, 10)


@dataclass(frozen=True)
class BinarizedMNIST:
    """The fixed binarized MNIST of Larochelle and Murray (2011): ``train`` (50 000), ``valid``
    (10 000) and ``test`` (10 000) images as float32 ``[N, 784]`` tensors of 0/1, each pixel
    drawn once from Bernoulli(intensity) and kept fixed (Salakhutdinov and Murray 2008)."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor


def load_binarized_mnist(
    data_dir: str | os.PathLike | None = None, verify: bool = True
) -> BinarizedMNIST:
    """The fixed binarized MNIST from ``binarized_mnist.npz`` (arrays ``train``, ``valid``,
    ``test`` of uint8 0/1, ``[N, 784]``) in ``data_dir`` (default ``$PYRO_VAE_DATA_DIR``).
    ``verify=True`` checks the file's MD5 and the published split sizes; every value must be
    0 or 1 either way. It is not downloaded: the ``.amat`` originals are text files of another
    format, so put the ``.npz`` in the folder."""
    folder = resolve_data_dir(data_dir)
    if not folder.exists():
        raise DataError(f"data_dir {folder} does not exist")
    name, md5 = BINARIZED_MNIST_FILE
    path = folder / name
    if not path.exists():
        raise DataError(
            f"{name} not found in {folder}: the fixed binarized MNIST is read "
            "from that file (arrays train, valid, test)"
        )
    check_npz(path)
    if verify and md5sum(path) != md5:
        raise DataError(f"{path} is not the published binarized MNIST: its MD5 is not {md5}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            parts = {split: arrays[split] for split in BINARIZED_MNIST_SIZES}
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    for split, array in parts.items():
        if array.ndim != 2 or array.shape[1] != 784:
            raise DataError(f"{path}: {split} has shape {list(array.shape)}, not [N, 784]")
        if verify and array.shape[0] != BINARIZED_MNIST_SIZES[split]:
            raise DataError(
                f"{path}: {split} has {array.shape[0]} images, not {BINARIZED_MNIST_SIZES[split]}"
            )
        if array.size and array.max() > 1:
            raise DataError(f"{path}: {split} holds values other than 0 and 1")
    return BinarizedMNIST(
        **{split: torch.from_numpy(array.astype(np.float32)) for split, array in parts.items()}
    )


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = False
) -> Dataset:
    if name == "digits":
        return load_digits()
    if name == "mnist":
        return load_mnist(data_dir, download=download)
    raise DataError(f"unknown dataset {name!r}: choose 'digits' or 'mnist'")


def validate_images(
    images: torch.Tensor,
    *,
    binary: bool = False,
    labels: torch.Tensor | None = None,
    num_classes: int | None = None,
    input_dim: int | None = None,
    what: str = "data",
) -> None:
    """Raise :class:`DataError` with a plain message if ``images`` (and ``labels``) are unusable.

    ``binary=True`` demands values in {0, 1} (a Bernoulli likelihood's support).
    """
    if not isinstance(images, torch.Tensor):
        raise DataError(f"{what} must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise DataError(f"{what} must be a floating-point tensor, got dtype {images.dtype}")
    if images.dim() != 2:
        raise DataError(f"{what} must have shape [N, D], got {list(images.shape)}")
    if images.shape[0] == 0:
        raise DataError(f"{what} is empty")
    if input_dim is not None and images.shape[1] != input_dim:
        raise DataError(
            f"{what} has {images.shape[1]} features per datapoint, the model expects {input_dim}"
        )
    if not torch.isfinite(images).all():
        raise DataError(f"{what} contains NaN or infinite values")
    if binary and not ((images == 0) | (images == 1)).all():
        raise DataError(
            f"{what} must be binary (0/1) for a Bernoulli likelihood; "
            "binarize it (dynamic or fixed)"
        )
    if not binary and ((images < 0) | (images > 1)).any():
        raise DataError(f"{what} must hold intensities in [0, 1]")
    if labels is not None:
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{what}: {images.shape[0]} images but labels of shape {list(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex():
            raise DataError(f"{what}: labels must be integers, got dtype {labels.dtype}")
        if num_classes is not None and ((labels < 0) | (labels >= num_classes)).any():
            raise DataError(f"{what}: labels must lie in 0..{num_classes - 1}")


def binarize(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw x ~ Bernoulli(intensity), using ``generator`` (on the images' device)."""
    return torch.bernoulli(images, generator=generator)


def fixed_binarization(images: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded, reproducible binarization, independent of the device the images live on."""
    generator = torch.Generator().manual_seed(seed + BINARIZATION_SEED_OFFSET)
    return binarize(images.cpu(), generator).to(images.device)
