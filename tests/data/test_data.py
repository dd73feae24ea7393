import gzip
import hashlib
import io
import struct

import numpy as np
import pytest
import torch

from pyro_vae.data import images as data
from pyro_vae.util.errors import DataError


def write_idx(path, array, compress=True):
    """Write ``array`` (uint8) as an IDX file: magic 0x0000080N, big-endian sizes, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", n) for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return payload


def tiny_mnist(folder, n_train=6, n_test=4, size=5):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, size, size)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, size, size)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    for key, (filename, _) in data.MNIST_FILES.items():
        write_idx(folder / filename, arrays[key])
    return arrays


def test_idx_round_trip_compressed_and_raw(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx.gz", array)
    write_idx(tmp_path / "a.idx", array, compress=False)
    for name in ("a.idx.gz", "a.idx"):
        out = data.read_idx(tmp_path / name)
        assert out.shape == (2, 3, 4) and out.dtype == np.uint8
        assert np.array_equal(out, array)


def test_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="bad magic"):
        data.read_idx(tmp_path / "bad.idx")
    array = np.zeros((3, 2, 2), dtype=np.uint8)
    payload = write_idx(tmp_path / "full.idx", array, compress=False)
    (tmp_path / "short.idx").write_bytes(payload[:-1])
    with pytest.raises(DataError, match="short.idx.*shape \\(3, 2, 2\\)"):
        data.read_idx(tmp_path / "short.idx")
    (tmp_path / "broken.idx.gz").write_bytes(gzip.compress(payload)[:20])
    with pytest.raises(DataError, match="broken.idx.gz"):
        data.read_idx(tmp_path / "broken.idx.gz")


def test_load_mnist_from_tiny_files(tmp_path):
    arrays = tiny_mnist(tmp_path)
    ds = data.load_mnist(tmp_path, verify=False)
    assert ds.train.images.shape == (6, 25) and ds.test.images.shape == (4, 25)
    assert ds.image_shape == (5, 5) and ds.input_dim == 25
    expected = torch.from_numpy(arrays["train_images"].reshape(6, -1)).float() / 255
    assert torch.allclose(ds.train.images, expected)
    assert torch.equal(ds.test.labels, torch.from_numpy(arrays["test_labels"]).long())


def test_load_mnist_verifies_checksums_and_names_the_file(tmp_path):
    tiny_mnist(tmp_path)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is corrupt"):
        data.load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz not found"):
        data.load_mnist(tmp_path, verify=False)


@pytest.mark.parametrize("load", [data.load_mnist, data.load_binarized_mnist])
def test_a_data_dir_that_is_a_file_or_missing_is_named(tmp_path, load):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DataError, match=r"^data_dir .*file is a file, not a folder$"):
        load(tmp_path / "file")
    with pytest.raises(DataError, match=r"^data_dir .*missing does not exist"):
        load(tmp_path / "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_mnist_folder_from_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError, match=data.DATA_DIR_ENV):
        data.load_mnist()
    tiny_mnist(tmp_path)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert len(data.load_mnist(verify=False).train) == 6


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_verifies_md5_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    contents = {filename: f"fake {filename}".encode() for filename, _ in data.MNIST_FILES.values()}
    served = []

    def fake_urlopen(url, timeout):
        served.append(url)
        return _FakeResponse(contents[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(DataError, match="checksum mismatch"):
        data.download_mnist(tmp_path, mirrors=("https://mirror.invalid/",))
    assert list(tmp_path.iterdir()) == []

    good = {filename: hashlib.md5(body).hexdigest() for filename, body in contents.items()}
    monkeypatch.setattr(
        data,
        "MNIST_FILES",
        {key: (filename, good[filename]) for key, (filename, _) in data.MNIST_FILES.items()},
    )
    data.download_mnist(tmp_path, mirrors=("https://mirror.invalid/",))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(contents)
    count = len(served)
    data.download_mnist(tmp_path, mirrors=("https://mirror.invalid/",))
    assert len(served) == count  # verified files are not fetched again


def test_digits_split_is_fixed_and_scaled():
    a, b = data.load_digits(), data.load_digits()
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == data.DIGITS_TEST_SIZE
    assert torch.equal(a.test.labels, b.test.labels)
    assert a.train.images.min() == 0 and a.train.images.max() == 1
    assert a.input_dim == 64


def test_fixed_binarization_is_seeded_and_dynamic_is_not():
    images = data.load_digits().test.images
    first = data.fixed_binarization(images, seed=3)
    assert torch.equal(first, data.fixed_binarization(images, seed=3))
    assert not torch.equal(first, data.fixed_binarization(images, seed=4))
    generator = torch.Generator().manual_seed(0)
    assert not torch.equal(data.binarize(images, generator), data.binarize(images, generator))
    assert set(first.unique().tolist()) == {0.0, 1.0}
    # a Bernoulli draw keeps the intensity as its mean
    many = data.binarize(images.expand(200, *images.shape), generator).mean(0)
    assert (many - images).abs().max() < 0.15


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        (torch.tensor([[0.0, float("nan")]]), {}, "NaN or infinite"),
        (torch.tensor([[0.0, float("inf")]]), {}, "NaN or infinite"),
        (torch.tensor([[0.0, 1.5]]), {}, "intensities in \\[0, 1\\]"),
        (torch.tensor([[0.0, 0.5]]), {"binary": True}, "must be binary"),
        (torch.zeros(2, 3, 4), {}, "shape \\[N, D\\]"),
        (torch.zeros(0, 4), {}, "is empty"),
        (torch.zeros(2, 4, dtype=torch.int64), {}, "floating-point"),
        (torch.zeros(2, 4), {"input_dim": 5}, "expects 5"),
        (torch.zeros(2, 4), {"labels": torch.tensor([0, 10]), "num_classes": 10}, "0..9"),
        (torch.zeros(2, 4), {"labels": torch.tensor([0, 1, 2])}, "labels of shape"),
        (torch.zeros(2, 4), {"labels": torch.tensor([0.0, 1.0])}, "integers"),
    ],
)
def test_validation_messages(images, kwargs, message):
    with pytest.raises(DataError, match=message):
        data.validate_images(images, **kwargs)
