"""Tests for microfed.training.datasets: IDX, CIFAR-10 binary, image zips and folders.

All data is synthetic and written to tmp_path, except the Debian Fashion-MNIST check (skipped where the
package is not installed). Nothing here touches the network: downloads are replaced by fakes.
"""

from __future__ import annotations

import gzip
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microfed.training import named_datasets
from microfed.training.datasets import (
    DATASET_NAMES,
    default_data_dirs,
    load_dataset,
    read_idx,
)
from microfed.training.errors import MicrofedError
from tests.conftest import write_tree

pytestmark = pytest.mark.unit

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No dataset anywhere: empty HOME, no MICROFED_DATA_DIR, an empty system data folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MICROFED_DATA_DIR", raising=False)
    monkeypatch.setattr(named_datasets, "SYSTEM_DATA_DIR", tmp_path / "system")
    return home


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    """Write an unsigned-byte IDX file (the format is simple enough to state here)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist_like(folder: Path, *, gz: bool, n_train: int = 7, n_test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=gz)
    return arrays


def png(mode: str, size: tuple[int, int], color: int | tuple[int, ...]) -> bytes:
    """A solid-colour PNG; size is (width, height) as PIL takes it."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def mixed_upload() -> dict[str, bytes]:
    """The reference layout with the noise real uploads carry: top folder, __MACOSX/, .DS_Store.

    Most images are 8x6 (HxW); one RGB image is 12x10 and gets resized; 'cat' is grayscale.
    """
    return {
        "pets/train/dog/b.png": png("RGB", (6, 8), (200, 10, 20)),
        "pets/train/dog/a.png": png("RGB", (10, 12), (0, 100, 250)),
        "pets/train/cat/1.png": png("L", (6, 8), 77),
        "pets/train/cat/.DS_Store": b"\x00junk",
        "pets/test/cat/2.png": png("L", (6, 8), 30),
        "pets/test/dog/3.png": png("RGBA", (6, 8), (1, 2, 3, 0)),
        "pets/.DS_Store": b"\x00junk",
        "__MACOSX/pets/train/dog/._a.png": b"\x00not an image",
    }


# ----------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist_like(tmp_path / "mnist", gz=gz)

    loaded = load_dataset("MNIST", data_dir=tmp_path / "mnist", download=False)

    assert loaded.name == "mnist"
    assert loaded.train.images.shape == (7, 1, 28, 28)
    assert loaded.train.images.dtype == torch.uint8
    assert loaded.train.labels.dtype == torch.int64
    assert torch.equal(loaded.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]).byte())
    assert loaded.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert loaded.train.class_names == tuple("0123456789")


def test_read_idx_keeps_declared_shape(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)

    assert np.array_equal(read_idx(write_idx(tmp_path / "x-idx3-ubyte", array, gz=True)), array)


def test_idx_bad_magic_names_the_file(tmp_path: Path) -> None:
    write_mnist_like(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78" + bytes(100))

    with pytest.raises(MicrofedError, match=r"train-images-idx3-ubyte.*magic"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_truncated_names_the_file(tmp_path: Path, gz: bool) -> None:
    write_mnist_like(tmp_path, gz=gz)
    name = "t10k-labels-idx1-ubyte" + (".gz" if gz else "")
    (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:-3])

    with pytest.raises(MicrofedError, match=re.escape(name)):
        load_dataset("mnist", data_dir=tmp_path, download=False)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs apt package dataset-fashion-mnist")
def test_debian_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MICROFED_DATA_DIR", raising=False)

    loaded = load_dataset("fashion_mnist", download=False)

    assert loaded.train.images.shape == (60000, 1, 28, 28)
    assert loaded.test.images.shape == (10000, 1, 28, 28)
    assert loaded.train.labels.unique().tolist() == list(range(10))
    assert torch.bincount(loaded.test.labels).tolist() == [1000] * 10
    assert loaded.train.class_names[0] == "T-shirt/top"
    assert loaded.train.class_names[-1] == "Ankle boot"
    assert len(loaded.train.class_names) == 10


def test_default_data_dirs_order(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    monkeypatch.setenv("MICROFED_DATA_DIR", "/data")

    assert default_data_dirs("Fashion_MNIST") == [
        Path("/data/fashion-mnist"),
        named_datasets.SYSTEM_DATA_DIR / "fashion-mnist",
        isolated / ".cache/microfed/fashion-mnist",
    ]


def test_env_data_dir_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    write_mnist_like(tmp_path / "env" / "mnist", gz=True)
    monkeypatch.setenv("MICROFED_DATA_DIR", str(tmp_path / "env"))

    assert len(load_dataset("mnist", download=False).train.labels) == 7


def test_missing_without_download_says_where_to_put_files(isolated: Path) -> None:
    with pytest.raises(MicrofedError, match="MICROFED_DATA_DIR") as caught:
        load_dataset("fashion-mnist", download=False)

    assert "apt-get install dataset-fashion-mnist" in str(caught.value)
    assert str(named_datasets.SYSTEM_DATA_DIR / "fashion-mnist") in str(caught.value)


def test_download_reads_torchvision_raw_folder(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    import torchvision.datasets

    class FakeMNIST:  # writes what torchvision's download leaves behind: <root>/MNIST/raw/ plain files
        def __init__(self, root: str, train: bool, download: bool) -> None:
            write_mnist_like(Path(root) / "MNIST" / "raw", gz=False, n_train=5)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)

    loaded = load_dataset("mnist")

    assert loaded.train.images.shape == (5, 1, 28, 28)
    assert (isolated / ".cache/microfed/mnist-torchvision/MNIST/raw").is_dir()


def test_failed_download_explains_alternatives(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    import torchvision.datasets

    def offline(**_: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)

    with pytest.raises(MicrofedError, match=r"download failed.*MICROFED_DATA_DIR"):
        load_dataset("fashion-mnist")


# ------------------------------------------------------------------------------------------- CIFAR-10


def write_cifar_batch(path: Path, labels: list[int], seed: int) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], images.reshape(len(labels), -1)], 1)
    path.write_bytes(records.tobytes())
    return images


def test_cifar10_binary(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    train = [write_cifar_batch(folder / f"data_batch_{i}.bin", [i, 9 - i], seed=i) for i in range(1, 6)]
    test = write_cifar_batch(folder / "test_batch.bin", [3, 1, 4], seed=0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")

    loaded = load_dataset("CIFAR10", data_dir=tmp_path, download=False)

    assert loaded.train.images.shape == (10, 3, 32, 32)
    assert torch.equal(loaded.train.images, torch.from_numpy(np.concatenate(train)))
    assert loaded.train.labels.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    assert torch.equal(loaded.test.images, torch.from_numpy(test))
    assert loaded.test.labels.tolist() == [3, 1, 4]
    assert loaded.test.class_names == tuple(names)


def test_cifar10_truncated_batch_names_the_file(tmp_path: Path) -> None:
    for i in range(1, 6):
        write_cifar_batch(tmp_path / f"data_batch_{i}.bin", [0], seed=i)
    write_cifar_batch(tmp_path / "test_batch.bin", [0], seed=0)
    (tmp_path / "data_batch_3.bin").write_bytes(bytes(100))

    with pytest.raises(MicrofedError, match=re.escape("data_batch_3.bin")):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_cifar10_download_uses_binary_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    import torchvision.datasets.utils

    calls: list[str] = []

    def fake_download(url: str, download_root: str, **_: object) -> None:
        calls.append(url)
        folder = Path(download_root) / "cifar-10-batches-bin"
        folder.mkdir(parents=True)
        for name in [*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"]:
            write_cifar_batch(folder / name, [7], seed=0)

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)

    loaded = load_dataset("cifar10")

    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert loaded.train.labels.tolist() == [7] * 5
    assert loaded.train.class_names[7] == "horse"  # no batches.meta.txt: the standard names


# --------------------------------------------------------------------------------- image zips/folders


def test_zip_mixed_modes_and_sizes(tmp_path: Path) -> None:
    loaded = load_dataset(str(write_zip(tmp_path / "pets.zip", mixed_upload())))

    assert loaded.name == "pets.zip"
    assert loaded.train.class_names == ("cat", "dog")
    # One RGB image makes everything RGB; 8x6 is the most common size, so the 12x10 image is resized.
    assert loaded.train.images.shape == (3, 3, 8, 6)
    assert loaded.test.images.shape == (2, 3, 8, 6)
    assert loaded.train.labels.tolist() == [0, 1, 1]  # cat/1, dog/a, dog/b (sorted by path)
    assert loaded.test.labels.tolist() == [0, 1]
    # Solid colours stay solid through conversion and bilinear resizing: check every pixel.
    expected = [(77, 77, 77), (0, 100, 250), (200, 10, 20)]
    for image, rgb in zip(loaded.train.images, expected, strict=True):
        assert torch.equal(image, torch.tensor(rgb, dtype=torch.uint8)[:, None, None].expand(3, 8, 6))
    assert loaded.test.images[1, :, 0, 0].tolist() == [1, 2, 3]  # alpha dropped


def encoded(array: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_real_images_pass_the_per_image_limits(tmp_path: Path) -> None:
    """Pixels per byte of file is checked on every image, however small: photos, noise and flat synthetic images
    stay under the default (the figures measured for it are beside dataset_limits.MAX_PIXELS_PER_BYTE)."""
    y, x = np.mgrid[0:768, 0:1024]
    photo = np.stack([x / 4, y / 3, (x + y) / 7], axis=-1).astype(np.uint8)  # smooth, like a photo of the sky
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    files = {
        "train/photo/0.jpg": encoded(photo, "JPEG", quality=75),
        "train/photo/1.webp": encoded(photo, "WEBP", quality=80),
        "train/photo/2.png": encoded(photo, "PNG"),
        "train/flat/0.png": png("L", (64, 64), 128),
        "train/flat/1.png": png("L", (1000, 1000), 255),  # a blank page: 338 pixels per byte
        "test/photo/3.png": encoded(noise, "PNG"),
        "test/flat/2.png": png("RGB", (28, 28), (9, 9, 9)),
    }
    loaded = load_dataset(str(write_zip(tmp_path / "real.zip", files)), image_size=(32, 32))

    assert loaded.train.images.shape == (5, 3, 32, 32) and loaded.test.images.shape == (2, 3, 32, 32)


def test_folder_matches_zip(tmp_path: Path) -> None:
    from_zip = load_dataset(str(write_zip(tmp_path / "pets.zip", mixed_upload())))
    from_folder = load_dataset(write_tree(tmp_path / "upload", mixed_upload()))

    assert from_folder.name == "upload"
    for split in ("train", "test"):
        zipped, folder = getattr(from_zip, split), getattr(from_folder, split)
        assert torch.equal(zipped.images, folder.images)
        assert torch.equal(zipped.labels, folder.labels)
        assert zipped.class_names == folder.class_names


def test_image_size_resizes(tmp_path: Path) -> None:
    loaded = load_dataset(str(write_zip(tmp_path / "pets.zip", mixed_upload())), image_size=(5, 4))

    assert loaded.train.images.shape == (3, 3, 5, 4)
    assert loaded.test.images.shape == (2, 3, 5, 4)


def test_image_size_applies_to_named_datasets(tmp_path: Path) -> None:
    write_mnist_like(tmp_path, gz=False)

    loaded = load_dataset("mnist", data_dir=tmp_path, image_size=(32, 32), download=False)

    assert loaded.train.images.shape == (7, 1, 32, 32)
    assert loaded.train.images.dtype == torch.uint8


def test_all_grayscale_gives_one_channel_and_scales_16_bit(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(buffer, format="PNG")
    files = {
        "train/a/0.png": png("L", (4, 4), 10),
        "train/b/1.png": buffer.getvalue(),
        "test/a/2.png": png("1", (4, 4), 1),
    }

    loaded = load_dataset(write_tree(tmp_path / "gray", files))

    assert loaded.train.images.shape == (2, 1, 4, 4)
    assert loaded.train.images[:, 0, 0, 0].tolist() == [10, 255]
    assert loaded.test.images[0, 0, 0, 0].item() == 255


def test_zip_without_test_folder(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "only-train.zip", {"data/train/a/0.png": png("L", (2, 2), 0)})

    with pytest.raises(MicrofedError, match=r"only-train\.zip.*test/"):
        load_dataset(str(path))


def test_test_class_missing_in_train(tmp_path: Path) -> None:
    files = {"train/cat/0.png": png("L", (2, 2), 0), "test/zebra/1.png": png("L", (2, 2), 0)}

    with pytest.raises(MicrofedError, match="zebra"):
        load_dataset(str(write_zip(tmp_path / "x.zip", files)))


def test_undecodable_image_names_the_file(tmp_path: Path) -> None:
    files = {
        "top/train/cat/0.png": png("L", (2, 2), 0),
        "top/train/cat/broken.png": b"\x89PNG but not really",
        "top/test/cat/1.png": png("L", (2, 2), 0),
    }

    with pytest.raises(MicrofedError, match=re.escape("top/train/cat/broken.png")):
        load_dataset(str(write_zip(tmp_path / "x.zip", files)))


def test_truncated_image_data_names_the_file(tmp_path: Path) -> None:
    whole = png("RGB", (64, 64), (1, 2, 3))
    files = {"train/cat/cut.png": whole[: len(whole) // 2], "test/cat/1.png": png("L", (2, 2), 0)}

    with pytest.raises(MicrofedError, match=re.escape("train/cat/cut.png")):
        load_dataset(write_tree(tmp_path / "x", files))


def test_class_folder_without_images(tmp_path: Path) -> None:
    files = {
        "train/cat/0.png": png("L", (2, 2), 0),
        "train/empty/notes.txt": b"no images here",
        "test/cat/1.png": png("L", (2, 2), 0),
    }
    root = write_tree(tmp_path / "x", files)

    with pytest.raises(MicrofedError, match="train/empty/"):
        load_dataset(root)


def test_image_outside_class_folder(tmp_path: Path) -> None:
    files = {
        "train/cat/0.png": png("L", (2, 2), 0),
        "train/stray.png": png("L", (2, 2), 0),
        "test/cat/1.png": png("L", (2, 2), 0),
    }

    with pytest.raises(MicrofedError, match=re.escape("train/stray.png")):
        load_dataset(write_tree(tmp_path / "x", files))


def test_unknown_source_lists_names() -> None:
    with pytest.raises(MicrofedError) as caught:
        load_dataset("imagenet")

    assert all(name in str(caught.value) for name in DATASET_NAMES)
    assert "train/" in str(caught.value)


def test_bad_image_size(tmp_path: Path) -> None:
    with pytest.raises(MicrofedError, match="image_size"):
        load_dataset("mnist", data_dir=tmp_path, image_size=(0, 28), download=False)
