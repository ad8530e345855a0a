"""Dataset loaders for Fashion-MNIST, CIFAR-10 and CIFAR-100 from their official file formats.

Fashion-MNIST is read from the four IDX files (gz or uncompressed) and verified by the SHA-256 of the
decompressed bytes, so upstream's gz files and Debian's recompressed copies (package
``dataset-fashion-mnist``) are both accepted. CIFAR is read from the official python pickle batches and
verified by the MD5s published with the archives (the constants that torchvision's ``cifar.py`` also uses).

Lookup order (SPEC §5): explicit ``data_dir``, ``$PFEDLORA_DATA``, the user cache directory, the system
dataset directory. If the data is in none of them, the official files are downloaded with checksum
verification unless downloading is disabled. Whole datasets are returned in memory as uint8 tensors.

Each dataset is a :class:`DatasetSource` registered in ``DATASETS`` under its name: it says how to find its
files under a lookup root, read them, download them and tell a user how to get them. A new dataset joins
by registering a source; the lookup itself (:func:`load_dataset`) names no dataset.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import logging
import os
import pickle
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import platformdirs
import torch

from pfedlora.data.corpora import FortunesSource, KjvSource, TextCorpus
from pfedlora.errors import ChecksumMismatchError, ConfigError, DataError, DatasetNotFoundError, PfedloraError
from pfedlora.registry import Registry

logger = logging.getLogger(__name__)

# Lookup roots after the explicit directory and $PFEDLORA_DATA; read at call time, so tests can patch them.
CACHE_DIR: Path = platformdirs.user_cache_path("pfedlora")  # pooch's os_cache, without importing pooch
SYSTEM_DATA_DIR: Path = Path("/usr/share/datasets")
ENV_VAR = "PFEDLORA_DATA"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole classification dataset in memory, of one of two kinds.

    - ``"image"``: uint8 images (N, C, H, W) with per-channel ``mean``/``std``;
    - ``"text"``: int32 (N, 2·V, L), each sample's token ids and attention mask as each of the run's V
      tokenizers made them (:func:`pfedlora.data.text.tokenize_corpus`); ``mean``/``std`` are empty.

    Labels are int64 (N,). ``train_groups``/``test_groups`` optionally give each sample's source (e.g. the
    book a verse comes from), named by ``group_names``; the ``by-source`` partition deals whole sources.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment_by_default: bool = False
    """Whether ``data.augment = "auto"`` turns augmentation (random crop + flip) on for this dataset."""
    kind: str = "image"
    train_groups: torch.Tensor | None = None
    test_groups: torch.Tensor | None = None
    group_names: tuple[str, ...] = ()
    # mean/std tensors per device, so normalising a batch does not copy them host-to-device every time
    _stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if self.kind == "image" and (x.dtype != torch.uint8 or x.dim() != 4):
                raise DataError(
                    f"{self.name}: {split}_x must be uint8 (N, C, H, W), got {x.dtype} {list(x.shape)}"
                )
            if self.kind == "text" and (
                x.dtype != torch.int32 or x.dim() != 3 or x.shape[1] < 2 or x.shape[1] % 2
            ):
                raise DataError(
                    f"{self.name}: {split}_x must be int32 (N, 2·views, length), got {x.dtype} "
                    f"{list(x.shape)}"
                )
            if y.dtype != torch.int64 or y.shape != x.shape[:1]:
                raise DataError(f"{self.name}: {split}_y must be int64 (N,), got {y.dtype} {list(y.shape)}")
        if self.kind not in ("image", "text"):
            raise DataError(f"{self.name}: kind {self.kind!r} is unknown; allowed: image, text")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(f"{self.name}: train and test samples differ in shape")
        if self.kind == "image" and not len(self.mean) == len(self.std) == self.train_x.shape[1]:
            raise DataError(f"{self.name}: mean/std need one value per channel ({self.train_x.shape[1]})")
        for split, groups, y in (
            ("train", self.train_groups, self.train_y),
            ("test", self.test_groups, self.test_y),
        ):
            if groups is not None and (groups.dtype != torch.int64 or groups.shape != y.shape):
                raise DataError(f"{self.name}: {split}_groups must be int64 (N,) like the labels")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (C, H, W) of an image, (2, length) of a text."""
        return tuple(int(d) for d in self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _tensors(self) -> list[torch.Tensor]:
        tensors = [self.train_x, self.train_y, self.test_x, self.test_y]
        return tensors + [g for g in (self.train_groups, self.test_groups) if g is not None]

    def to(self, device: str | torch.device) -> Dataset:
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def share_memory(self) -> Dataset:
        """This dataset with its tensors moved into shared memory (in place), so that worker processes map
        it instead of copying it."""
        for tensor in self._tensors():
            tensor.share_memory_()
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel values (B, C, H, W) in 0..255 -> float32 ``(x / 255 - mean) / std`` per channel; text
        (token ids and mask) unchanged."""
        if self.kind == "text":
            return x
        stats = self._stats.get(x.device)
        if stats is None:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
            stats = self._stats[x.device] = (mean, std)
        mean, std = stats
        return (x.to(torch.float32) / 255.0 - mean) / std


# --- Fashion-MNIST -----------------------------------------------------------------------------------------

FASHION_MNIST_DIR = "fashion-mnist"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# SHA-256 of the decompressed IDX files (computed from Debian's dataset-fashion-mnist, which holds the
# original content recompressed), keyed by the uncompressed file name.
FASHION_MNIST_SHA256: Mapping[str, str] = MappingProxyType(
    {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }
)
# MD5 of upstream's gz files (zalandoresearch/fashion-mnist README; torchvision FashionMNIST.resources),
# used only to verify downloads.
FASHION_MNIST_GZ_MD5: Mapping[str, str] = MappingProxyType(
    {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }
)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
_IDX_UBYTE = 0x08


def _fashion_mnist_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _has_fashion_mnist(directory: Path) -> bool:
    return all(_fashion_mnist_file(directory, stem) is not None for stem in FASHION_MNIST_SHA256)


def _parse_idx(raw: bytes, path: Path, ndim: int) -> np.ndarray:
    """An IDX file's uint8 array; the header is magic (0, 0, type, ndim) then ndim big-endian uint32 dims."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise DataError(f"{path}: not an unsigned-byte IDX file with {ndim} dimension(s) (bad magic number)")
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path}: IDX header says {shape} but holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_fashion_mnist(directory: str | Path, checksums: Mapping[str, str] | None = None) -> Dataset:
    """Read Fashion-MNIST from the four IDX files (``*.gz`` or uncompressed) in ``directory``.

    ``checksums`` maps each uncompressed file name to the SHA-256 of its decompressed bytes; it defaults to
    ``FASHION_MNIST_SHA256``.
    """
    directory = Path(directory)
    checksums = FASHION_MNIST_SHA256 if checksums is None else checksums
    arrays: dict[str, np.ndarray] = {}
    for stem in FASHION_MNIST_SHA256:
        path = _fashion_mnist_file(directory, stem)
        if path is None:
            raise DatasetNotFoundError(f"{directory}: missing {stem}.gz (or uncompressed {stem})")
        try:
            raw = path.read_bytes()
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:  # truncated or corrupted gzip, unreadable file
            raise DataError(f"{path}: cannot be read ({_describe(error)}); {_GET_AGAIN}") from None
        _verify(path, hashlib.sha256(raw).hexdigest(), checksums[stem], "SHA-256 of the decompressed bytes")
        arrays[stem] = _parse_idx(raw, path, ndim=3 if "images" in stem else 1)

    def split(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{directory}: {prefix} has {images.shape[0]} images but {labels.shape[0]} labels"
            )
        x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
        return x, _labels(labels, len(FASHION_MNIST_CLASSES), directory)

    train_x, train_y = split("train")
    test_x, test_y = split("t10k")
    classes, mean, std = FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return Dataset("fashion-mnist", train_x, train_y, test_x, test_y, classes, mean, std)


# --- CIFAR -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR variant's official archive and pickles are and which keys they use."""

    variant: str
    folder: str
    archive: str
    url: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    labels_key: bytes
    names_key: bytes
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR_LAYOUTS: Mapping[str, CifarLayout] = MappingProxyType(
    {
        "cifar10": CifarLayout(
            variant="cifar10",
            folder="cifar-10-batches-py",
            archive="cifar-10-python.tar.gz",
            url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
            test_files=("test_batch",),
            meta_file="batches.meta",
            labels_key=b"labels",
            names_key=b"label_names",
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
        ),
        "cifar100": CifarLayout(
            variant="cifar100",
            folder="cifar-100-python",
            archive="cifar-100-python.tar.gz",
            url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            train_files=("train",),
            test_files=("test",),
            meta_file="meta",
            labels_key=b"fine_labels",
            names_key=b"fine_label_names",
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
        ),
    }
)
# Official MD5s of the archives and their member files (as published in torchvision/datasets/cifar.py).
CIFAR10_MD5: Mapping[str, str] = MappingProxyType(
    {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    }
)
CIFAR100_MD5: Mapping[str, str] = MappingProxyType(
    {
        "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    }
)


def _cifar_checksums(variant: str) -> Mapping[str, str]:
    # Looked up at call time so that tests can substitute the module-level tables.
    return CIFAR10_MD5 if variant == "cifar10" else CIFAR100_MD5


def _cifar_layout(variant: str) -> CifarLayout:
    if variant not in CIFAR_LAYOUTS:
        raise ConfigError(f"CIFAR variant {variant!r} is unknown; allowed: {', '.join(CIFAR_LAYOUTS)}")
    return CIFAR_LAYOUTS[variant]


def _has_cifar_folder(directory: Path, layout: CifarLayout) -> bool:
    return all((directory / name).is_file() for name in layout.files)


def read_cifar(path: str | Path, variant: str, checksums: Mapping[str, str] | None = None) -> Dataset:
    """Read CIFAR-10 or CIFAR-100 (``variant`` "cifar10" / "cifar100") from the official archive or folder.

    ``path`` is either the ``.tar.gz`` archive, which is verified and extracted next to itself (or into the
    cache directory if that is not writable), or the extracted folder (``cifar-10-batches-py`` /
    ``cifar-100-python``). ``checksums`` maps the archive and member file names to MD5s; it defaults to the
    official table of the variant.
    """
    layout = _cifar_layout(variant)
    checksums = _cifar_checksums(variant) if checksums is None else checksums
    path = Path(path)
    if path.is_file():
        _verify(path, _md5(path), checksums[layout.archive], "MD5")
        path = _extract(path, layout)
    for name in layout.files:
        member = path / name
        if not member.is_file():
            raise DatasetNotFoundError(f"{path}: missing {name} of {layout.variant}")
        _verify(member, _md5(member), checksums[name], "MD5")

    classes = tuple(n.decode("utf-8") for n in _unpickle(path / layout.meta_file)[layout.names_key])

    def split(files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for name in files:
            batch = _unpickle(path / name)
            images.append(np.asarray(batch[b"data"], dtype=np.uint8))
            labels.append(np.asarray(batch[layout.labels_key], dtype=np.int64))
        data = np.concatenate(images)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: {layout.variant} data must be (N, 3072), got {data.shape}")
        # Each row is channel-major: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
        x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # (N, 3, 32, 32)
        return x, _labels(np.concatenate(labels), len(classes), path)

    train_x, train_y = split(layout.train_files)
    test_x, test_y = split(layout.test_files)
    return Dataset(layout.variant, train_x, train_y, test_x, test_y, classes, layout.mean, layout.std, True)


def _unpickle(path: Path) -> dict[bytes, Any]:
    # The files are checksum-verified before this is called; the official pickles come from Python 2.
    with path.open("rb") as handle:
        return pickle.load(handle, encoding="bytes")


def _extract(archive: Path, layout: CifarLayout) -> Path:
    """Extract ``archive`` safely next to itself (or into the cache dir); returns the extracted folder."""
    target = archive.parent
    if not os.access(target, os.W_OK):
        target = CACHE_DIR
        target.mkdir(parents=True, exist_ok=True)
    folder = target / layout.folder
    if _has_cifar_folder(folder, layout):
        return folder  # verified by the caller, file by file
    logger.info("extracting %s into %s", archive, target)
    with tempfile.TemporaryDirectory(dir=target, prefix=".extract-") as scratch:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(scratch, filter="data")
        extracted = Path(scratch) / layout.folder
        if not extracted.is_dir():
            raise DataError(f"{archive}: the archive has no folder {layout.folder}/")
        folder.mkdir(exist_ok=True)
        for name in layout.files:
            if (extracted / name).is_file():
                os.replace(extracted / name, folder / name)
    return folder


# --- shared helpers ----------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_GET_AGAIN = "the file is damaged: delete it and get it again"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _verify(path: Path, actual: str, expected: str, kind: str) -> None:
    if actual != expected:
        raise ChecksumMismatchError(
            f"{path}: {kind} is {actual}, expected {expected}; the file is corrupt or not the official one: "
            "delete it and get it again"
        )


def _labels(labels: np.ndarray, num_classes: int, source: Path) -> torch.Tensor:
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels outside 0..{num_classes - 1}")
    return torch.from_numpy(labels)


# --- lookup and download -----------------------------------------------------------------------------------


def search_paths(data_dir: str | Path | None = None) -> list[Path]:
    """The roots searched for datasets, in order: ``data_dir``, ``$PFEDLORA_DATA``, cache dir, system dir."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env).expanduser())
    roots += [CACHE_DIR, SYSTEM_DATA_DIR]
    return list(dict.fromkeys(roots))  # drop repeats, keep order


class DatasetSource(Protocol):
    """How one dataset is found, read, downloaded and explained: a ``DATASETS`` entry."""

    kind: str
    """What its samples are: "image" or "text"."""

    looked_for: str
    """What a lookup root must hold, for the "not found" message (e.g. ``fashion-mnist/ with ...``)."""

    file_names: tuple[str, ...]
    """Names of the dataset's files (or folders), to spot them under a folder the user named but in a
    layout :meth:`find` does not read."""

    def find(self, root: Path, named: bool = False) -> Path | None:
        """What to read under ``root`` (a folder or an archive), or None when the dataset is not there.
        ``named``: the user named ``root`` (``--data-dir``, ``$PFEDLORA_DATA``), so the files may also lie
        directly in it (or ``root`` may be the file itself)."""
        ...

    def incomplete(self, root: Path, named: bool = False) -> str | None:
        """What is missing where ``root`` (``named``: as for :meth:`find`, which found nothing there) holds
        the dataset's folder, or some of its files, but not all (else None)."""
        ...

    def read(self, path: Path) -> Dataset | TextCorpus:
        """The dataset (a text corpus, for text) from what :meth:`find` or :meth:`download` returned,
        checksums verified."""
        ...

    def download(self, target: Path) -> Path:
        """Download the official files (checksum-verified) into ``target``; what to read."""
        ...

    def how_to_get(self) -> str:
        """One or two sentences telling a user how to get the files."""
        ...


DATASETS: Registry[DatasetSource] = Registry("data.dataset")
"""Every dataset, by name (the ``data.dataset`` values)."""


def _progressbar() -> bool:
    return sys.stderr.isatty() and importlib.util.find_spec("tqdm") is not None


class FashionMnistSource:
    """Fashion-MNIST: the four IDX files in ``<root>/fashion-mnist/``."""

    kind = "image"
    looked_for = f"{FASHION_MNIST_DIR}/ with the four IDX files"
    file_names = tuple(name for stem in FASHION_MNIST_SHA256 for name in (stem, f"{stem}.gz"))

    def _folders(self, root: Path, named: bool) -> list[Path]:
        """Where the four files may lie: ``<root>/fashion-mnist/``; in a folder the user named, also the
        folder itself and torchvision's ``FashionMNIST/raw/``."""
        return [root / FASHION_MNIST_DIR, *((root, root / "FashionMNIST" / "raw") if named else ())]

    def find(self, root: Path, named: bool = False) -> Path | None:
        return next((f for f in self._folders(root, named) if _has_fashion_mnist(f)), None)

    def incomplete(self, root: Path, named: bool = False) -> str | None:
        for folder in self._folders(root, named):
            missing = [f"{s}.gz" for s in FASHION_MNIST_SHA256 if _fashion_mnist_file(folder, s) is None]
            canonical = folder == root / FASHION_MNIST_DIR
            if folder.is_dir() and missing and (canonical or len(missing) < len(FASHION_MNIST_SHA256)):
                return f"{folder} lacks {', '.join(missing)}"
        return None

    def read(self, path: Path) -> Dataset:
        return read_fashion_mnist(path, FASHION_MNIST_SHA256)

    def download(self, target: Path) -> Path:
        folder = target / FASHION_MNIST_DIR
        import pooch  # imported for downloads only: it imports tqdm.auto, which warns in a notebook

        for fname, md5 in FASHION_MNIST_GZ_MD5.items():
            url = FASHION_MNIST_URL + fname
            pooch.retrieve(url, known_hash=f"md5:{md5}", fname=fname, path=folder, progressbar=_progressbar())
        return folder

    def how_to_get(self) -> str:
        files = ", ".join(f"{stem}.gz" for stem in FASHION_MNIST_SHA256)
        return (
            "To get it: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or allow downloading "
            f"(data.download = true), or put the four files ({files}) in <dir>/{FASHION_MNIST_DIR}/ and pass "
            f"--data-dir <dir> or set {ENV_VAR}=<dir>."
        )


DATASETS.add("fashion-mnist", FashionMnistSource())


class CifarSource:
    """CIFAR-10 or CIFAR-100: the extracted folder or the official archive under a root."""

    kind = "image"

    def __init__(self, variant: str) -> None:
        self.layout = _cifar_layout(variant)
        self.looked_for = f"{self.layout.folder}/ or {self.layout.archive}"
        # The batch files of CIFAR-100 have names too common ("train", "meta") to tell anything.
        batches = (*self.layout.train_files[:1], self.layout.meta_file) if variant == "cifar10" else ()
        self.file_names = (self.layout.archive, self.layout.folder, *batches)

    def find(self, root: Path, named: bool = False) -> Path | None:
        """The extracted folder or the archive under ``root``; where the user named ``root``, also ``root``
        itself as the extracted folder or as the archive."""
        layout = self.layout
        if _has_cifar_folder(root / layout.folder, layout):
            return root / layout.folder
        archive = root / layout.archive
        if archive.is_file():
            return archive
        if named and root.is_file() and root.name == layout.archive:
            return root
        return root if named and _has_cifar_folder(root, layout) else None

    def incomplete(self, root: Path, named: bool = False) -> str | None:
        layout = self.layout
        if (root / layout.archive).is_file():
            return None
        for folder in (root / layout.folder, *((root,) if named else ())):
            present = [name for name in layout.files if (folder / name).is_file()]
            missing = [name for name in layout.files if name not in present]
            if folder.is_dir() and missing and (folder != root or present):
                return f"{folder} lacks {', '.join(missing)}"
        return None

    def read(self, path: Path) -> Dataset:
        return read_cifar(path, self.layout.variant, _cifar_checksums(self.layout.variant))

    def download(self, target: Path) -> Path:
        layout = self.layout
        md5 = _cifar_checksums(layout.variant)[layout.archive]
        import pooch

        fetched = pooch.retrieve(
            layout.url, known_hash=f"md5:{md5}", fname=layout.archive, path=target, progressbar=_progressbar()
        )
        return Path(fetched)

    def how_to_get(self) -> str:
        return (
            f"To get it: allow downloading (data.download = true), or place the official archive "
            f"{self.layout.archive} ({self.layout.url}) in one "
            f"of these directories (or pass --data-dir <dir> / set {ENV_VAR}=<dir>)."
        )


for _variant in CIFAR_LAYOUTS:
    DATASETS.add(_variant, CifarSource(_variant))
DATASETS.add("kjv", KjvSource(lambda: CACHE_DIR))
DATASETS.add("fortunes", FortunesSource(lambda: CACHE_DIR))


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = True,
    tokenize: Callable[[TextCorpus], Dataset] | None = None,
) -> Dataset:
    """Load dataset ``name`` from the first lookup root holding it, downloading it if allowed and needed.

    Downloads go to ``data_dir`` if given, else to the user cache directory. A text dataset is turned into
    tensors by ``tokenize`` (the clients' tokenizer), which it needs.
    """
    source = DATASETS[name]
    roots = search_paths(data_dir)
    named = {
        Path(p).expanduser() for p in (data_dir, os.environ.get(ENV_VAR)) if p
    }  # --data-dir, $PFEDLORA_DATA
    for root in roots:
        by_user = root in named
        found = source.find(root, by_user)
        if found is not None:
            logger.info("reading %s from %s", name, found)
            return _tensors(name, _read(source, found), tokenize)
        if not by_user:
            continue
        missing = source.incomplete(root, by_user)
        if missing:
            raise DataError(
                f"dataset {name!r} in {root} is incomplete: {missing}. Add the missing files, or remove the "
                f"folder to use the other locations. {source.how_to_get()}"
            )
        stray = _stray_file(root, source.file_names)
        if stray is not None:
            raise DataError(
                f"{root} holds {name} files in a layout pfedlora does not read ({stray}); expected "
                f"{source.looked_for} in {root}, or the files directly in it. Move them there, or name "
                "another folder."
            )

    searched = ", ".join(str(root) for root in roots)
    message = f"dataset {name!r} not found: looked for {source.looked_for} in {searched}."
    if not download:
        raise DatasetNotFoundError(f"{message} Downloading is disabled. {source.how_to_get()}")

    target = Path(data_dir).expanduser() if data_dir is not None else CACHE_DIR
    logger.info("downloading %s into %s", name, target)
    try:
        fetched = source.download(target)
    except Exception as error:  # pooch raises requests/OSError/ValueError alike; report them as one message
        raise DatasetNotFoundError(f"{message} Downloading failed: {error}. {source.how_to_get()}") from error
    return _tensors(name, _read(source, fetched), tokenize)


STRAY_SEARCH_DEPTH = 3
STRAY_SEARCH_ENTRIES = 20_000


def _stray_file(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first file or folder named one of ``names`` below ``root`` (at most :data:`STRAY_SEARCH_DEPTH`
    folders down, and :data:`STRAY_SEARCH_ENTRIES` entries looked at; hidden folders skipped)."""
    if not root.is_dir():
        return None
    seen = 0
    for folder, subfolders, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        for entry in sorted([*subfolders, *files]):
            if entry in names:
                return Path(folder) / entry
        seen += len(subfolders) + len(files)
        if seen > STRAY_SEARCH_ENTRIES:
            return None
        subfolders[:] = [] if depth >= STRAY_SEARCH_DEPTH else sorted(d for d in subfolders if d[0] != ".")
    return None


def _read(source: DatasetSource, path: Path) -> Dataset | TextCorpus:
    """``source.read(path)``, any error of reading or decoding a file turned into one DataError naming it."""
    try:
        return source.read(path)
    except PfedloraError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, pickle.UnpicklingError, tarfile.TarError) as error:
        raise DataError(
            f"{path}: cannot be read ({_describe(error)}); {_GET_AGAIN}. {source.how_to_get()}"
        ) from None


def _tensors(
    name: str, read: Dataset | TextCorpus, tokenize: Callable[[TextCorpus], Dataset] | None
) -> Dataset:
    if isinstance(read, Dataset):
        return read
    if tokenize is None:
        raise ConfigError(
            f"dataset {name!r} is text: its clients must be transformer architectures (minilm-l<k>, hf-l<k>) "
            "whose tokenizer turns it into tokens"
        )
    return tokenize(read)
