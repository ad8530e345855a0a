"""Tiny datasets written in the real file formats (IDX for Fashion-MNIST, CIFAR python pickles in tar.gz)."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pfedlora.data.datasets import CIFAR_LAYOUTS

FASHION_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic (0, 0, 0x08, ndim), big-endian uint32 dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


@dataclass
class TinyFashion:
    directory: Path
    train_images: np.ndarray  # (N, 28, 28)
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    sha256: dict[str, str]  # uncompressed file name -> SHA-256 of the IDX bytes


def write_fashion_mnist(
    root: Path, seed: int = 0, num_train: int = 12, num_test: int = 5, compress: bool = True, marker: int = 0
) -> TinyFashion:
    """Write ``root/fashion-mnist/`` with the four IDX files; ``marker`` is the first train pixel."""
    rng = np.random.default_rng(seed)
    train_images = rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8)
    train_images[0, 0, 0] = marker
    test_images = rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8)
    train_labels = rng.integers(0, 10, num_train, dtype=np.uint8)
    test_labels = rng.integers(0, 10, num_test, dtype=np.uint8)
    directory = root / "fashion-mnist"
    directory.mkdir(parents=True, exist_ok=True)
    sha256 = {}
    arrays = (train_images, train_labels, test_images, test_labels)
    for stem, array in zip(FASHION_STEMS, arrays, strict=True):
        raw = idx_bytes(array)
        sha256[stem] = hashlib.sha256(raw).hexdigest()
        if compress:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return TinyFashion(directory, train_images, train_labels, test_images, test_labels, sha256)


@dataclass
class TinyCifar:
    root: Path
    variant: str
    train_data: np.ndarray  # (N, 3072) channel-major rows, all train files concatenated in order
    train_labels: np.ndarray
    test_data: np.ndarray
    test_labels: np.ndarray
    names: tuple[str, ...]
    md5: dict[str, str]  # archive and member file name -> MD5

    @property
    def folder(self) -> Path:
        return self.root / CIFAR_LAYOUTS[self.variant].folder

    @property
    def archive(self) -> Path:
        return self.root / CIFAR_LAYOUTS[self.variant].archive


def _dump(path: Path, content: dict[bytes, object]) -> None:
    # The official pickles were written by Python 2: bytes keys, protocol 2.
    with path.open("wb") as handle:
        pickle.dump(content, handle, protocol=2)


def write_cifar(
    root: Path, variant: str, seed: int = 0, rows: int = 3, keep_folder: bool = False
) -> TinyCifar:
    """Write the official archive ``root/<archive>`` holding ``<folder>/`` with tiny pickles.

    Row 0 of the first train file has pixel (5, 7) set to 11, 22, 33 in the red, green and blue planes.
    """
    layout = CIFAR_LAYOUTS[variant]
    rng = np.random.default_rng(seed)
    num_classes = 10 if variant == "cifar10" else 100
    names = CIFAR10_NAMES if variant == "cifar10" else tuple(f"class_{i:02d}" for i in range(num_classes))
    folder = root / layout.folder
    folder.mkdir(parents=True, exist_ok=True)

    def batch(name: str, marked: bool = False) -> tuple[np.ndarray, np.ndarray]:
        data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
        if marked:  # row 0, pixel (5, 7) of each channel plane
            for channel, value in enumerate((11, 22, 33)):
                data[0, channel * 1024 + 5 * 32 + 7] = value
        labels = rng.integers(0, num_classes, rows)
        content: dict[bytes, object] = {b"data": data, b"filenames": [b"x.png"] * rows}
        if variant == "cifar10":
            content[b"labels"] = [int(v) for v in labels]
            content[b"batch_label"] = name.encode()
        else:
            content[b"fine_labels"] = [int(v) for v in labels]
            content[b"coarse_labels"] = [int(v) // 5 for v in labels]
        _dump(folder / name, content)
        return data, labels

    train = [batch(name, marked=i == 0) for i, name in enumerate(layout.train_files)]
    test_data, test_labels = batch(layout.test_files[0])
    encoded = [n.encode() for n in names]
    meta = {layout.names_key: encoded}
    if variant == "cifar100":
        meta[b"coarse_label_names"] = [f"super_{i}".encode() for i in range(20)]
    _dump(folder / layout.meta_file, meta)

    checksums = {name: md5(folder / name) for name in layout.files}
    with tarfile.open(root / layout.archive, "w:gz") as tar:
        tar.add(folder, arcname=layout.folder)
    checksums[layout.archive] = md5(root / layout.archive)
    if not keep_folder:
        shutil.rmtree(folder)
    return TinyCifar(
        root=root,
        variant=variant,
        train_data=np.concatenate([d for d, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_data=test_data,
        test_labels=test_labels,
        names=names,
        md5=checksums,
    )
