"""Loaders read tiny datasets written in the official formats; checksums, lookup order, download path."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pooch
import pytest
import torch

from pfedlora.data import datasets
from pfedlora.data.datasets import Dataset, load_dataset, read_cifar, read_fashion_mnist, search_paths
from pfedlora.errors import ChecksumMismatchError, ConfigError, DataError, DatasetNotFoundError

from .builders import FASHION_STEMS, idx_bytes, md5, write_cifar, write_fashion_mnist

# --- Fashion-MNIST -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_fashion_mnist_round_trips_values(tmp_path: Path, compress: bool) -> None:
    tiny = write_fashion_mnist(tmp_path, compress=compress)

    ds = read_fashion_mnist(tiny.directory, checksums=tiny.sha256)

    assert ds.name == "fashion-mnist"
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.test_x.shape == (5, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), tiny.train_images)
    np.testing.assert_array_equal(ds.test_x[:, 0].numpy(), tiny.test_images)
    np.testing.assert_array_equal(ds.train_y.numpy(), tiny.train_labels)
    np.testing.assert_array_equal(ds.test_y.numpy(), tiny.test_labels)


def test_fashion_mnist_official_table_refuses_other_content(tmp_path: Path) -> None:
    tiny = write_fashion_mnist(tmp_path)
    with pytest.raises(ChecksumMismatchError):
        read_fashion_mnist(tiny.directory)  # default: the official SHA-256 table


def test_fashion_mnist_checksum_mismatch_names_file_and_digests(tmp_path: Path) -> None:
    tiny = write_fashion_mnist(tmp_path)
    labels = tiny.directory / "t10k-labels-idx1-ubyte.gz"
    tampered = tiny.test_labels.copy()
    tampered[0] = (tampered[0] + 1) % 10
    labels.write_bytes(gzip.compress(idx_bytes(tampered)))

    with pytest.raises(ChecksumMismatchError) as caught:
        read_fashion_mnist(tiny.directory, checksums=tiny.sha256)

    message = str(caught.value)
    assert str(labels) in message
    assert tiny.sha256["t10k-labels-idx1-ubyte"] in message
    assert hashlib.sha256(idx_bytes(tampered)).hexdigest() in message


def test_fashion_mnist_bad_magic_is_refused(tmp_path: Path) -> None:
    tiny = write_fashion_mnist(tmp_path, compress=False)
    path = tiny.directory / "train-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[3] = 3  # claims three dimensions
    path.write_bytes(bytes(raw))
    checksums = {**tiny.sha256, "train-labels-idx1-ubyte": hashlib.sha256(raw).hexdigest()}

    with pytest.raises(DataError, match="magic"):
        read_fashion_mnist(tiny.directory, checksums=checksums)


# --- CIFAR -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_read_cifar_archive_round_trips_channel_major_layout(tmp_path: Path, variant: str) -> None:
    tiny = write_cifar(tmp_path, variant)
    assert not tiny.folder.exists()

    ds = read_cifar(tiny.archive, variant, checksums=tiny.md5)

    assert ds.name == variant
    rows_per_file = 3
    num_train_files = 5 if variant == "cifar10" else 1
    assert ds.train_x.shape == (rows_per_file * num_train_files, 3, 32, 32)
    assert ds.test_x.shape == (rows_per_file, 3, 32, 32)
    assert ds.num_classes == (10 if variant == "cifar10" else 100)
    assert ds.classes == tiny.names
    assert ds.train_x[0, :, 5, 7].tolist() == [11, 22, 33]  # one pixel per channel plane
    np.testing.assert_array_equal(ds.train_x.reshape(-1, 3072).numpy(), tiny.train_data)
    np.testing.assert_array_equal(ds.test_x.reshape(-1, 3072).numpy(), tiny.test_data)
    np.testing.assert_array_equal(ds.train_y.numpy(), tiny.train_labels)
    np.testing.assert_array_equal(ds.test_y.numpy(), tiny.test_labels)
    assert tiny.folder.is_dir(), "the archive is extracted next to itself"


def test_read_cifar_folder_reads_extracted_files(tmp_path: Path) -> None:
    tiny = write_cifar(tmp_path, "cifar10", keep_folder=True)
    tiny.archive.unlink()

    ds = read_cifar(tiny.folder, "cifar10", checksums=tiny.md5)

    np.testing.assert_array_equal(ds.train_y.numpy(), tiny.train_labels)


def test_cifar_archive_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    tiny = write_cifar(tmp_path, "cifar10")
    checksums = {**tiny.md5, "cifar-10-python.tar.gz": "0" * 32}

    with pytest.raises(ChecksumMismatchError) as caught:
        read_cifar(tiny.archive, "cifar10", checksums=checksums)

    assert str(tiny.archive) in str(caught.value)
    assert tiny.md5["cifar-10-python.tar.gz"] in str(caught.value) and "0" * 32 in str(caught.value)
    assert not tiny.folder.exists(), "nothing is extracted from an unverified archive"


def test_cifar_extracted_file_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    tiny = write_cifar(tmp_path, "cifar10", keep_folder=True)
    with (tiny.folder / "data_batch_3").open("ab") as handle:
        handle.write(b"\0")

    with pytest.raises(ChecksumMismatchError, match="data_batch_3"):
        read_cifar(tiny.folder, "cifar10", checksums=tiny.md5)


def test_cifar_archive_in_read_only_root_extracts_into_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_roots: dict[str, Path]
) -> None:
    tiny = write_cifar(tmp_path / "readonly", "cifar100")
    real_access = os.access
    # Tests may run as root, for whom chmod does not make a folder read-only; pretend instead.
    monkeypatch.setattr(datasets.os, "access", lambda p, mode: Path(p) != tiny.root and real_access(p, mode))

    ds = read_cifar(tiny.archive, "cifar100", checksums=tiny.md5)

    assert ds.train_x.shape[0] == 3
    assert (isolated_roots["cache"] / "cifar-100-python" / "train").is_file()
    assert not tiny.folder.exists()


def test_unknown_cifar_variant_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cifar10, cifar100"):
        read_cifar(tmp_path, "cifar1000")


# --- lookup ------------------------------------------------------------------------------------------------


def test_search_paths_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_roots: dict[str, Path]
) -> None:
    monkeypatch.setenv("PFEDLORA_DATA", str(tmp_path / "env"))

    assert search_paths(tmp_path / "explicit") == [
        tmp_path / "explicit",
        tmp_path / "env",
        isolated_roots["cache"],
        isolated_roots["system"],
    ]
    monkeypatch.delenv("PFEDLORA_DATA")
    assert search_paths() == [isolated_roots["cache"], isolated_roots["system"]]


def test_lookup_order_explicit_env_cache_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_roots: dict[str, Path]
) -> None:
    roots = {
        "explicit": tmp_path / "explicit",
        "env": tmp_path / "env",
        "cache": isolated_roots["cache"],
        "system": isolated_roots["system"],
    }
    # A different first pixel in each root, so each root's files have their own checksums.
    tinies = {key: write_fashion_mnist(root, marker=i + 1) for i, (key, root) in enumerate(roots.items())}
    monkeypatch.setenv("PFEDLORA_DATA", str(roots["env"]))

    for i, key in enumerate(roots):
        # Reading any other root than the expected one would fail the checksum check.
        monkeypatch.setattr(datasets, "FASHION_MNIST_SHA256", tinies[key].sha256)
        ds = load_dataset("fashion-mnist", data_dir=roots["explicit"], download=False)
        assert ds.train_x[0, 0, 0, 0] == i + 1, key
        shutil.rmtree(tinies[key].directory)


def test_an_incomplete_folder_the_user_named_is_refused_and_elsewhere_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_roots: dict[str, Path]
) -> None:
    partial = write_fashion_mnist(tmp_path / "explicit", marker=1)
    (partial.directory / "t10k-labels-idx1-ubyte.gz").unlink()
    complete = write_fashion_mnist(isolated_roots["system"], marker=2)
    monkeypatch.setattr(datasets, "FASHION_MNIST_SHA256", complete.sha256)

    with pytest.raises(DataError, match=r"in .*explicit is incomplete: .*fashion-mnist lacks t10k-labels"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "explicit", download=False)
    shutil.move(partial.directory, isolated_roots["cache"] / "fashion-mnist")  # not named by the user
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.train_x[0, 0, 0, 0] == 2


@pytest.mark.parametrize(
    ("layout", "how"),
    [(".", "data_dir"), (".", "env"), ("FashionMNIST/raw", "data_dir")],
    ids=["directly-in-data-dir", "directly-in-PFEDLORA_DATA", "torchvision-layout"],
)
def test_fashion_mnist_files_where_the_user_put_them_are_read_not_passed_over(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    isolated_roots: dict[str, Path],
    layout: str,
    how: str,
) -> None:
    named = tmp_path / "mine"
    tiny = write_fashion_mnist(tmp_path / "made", marker=7)
    (named / layout).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(tiny.directory, named / layout if layout != "." else named)
    write_fashion_mnist(isolated_roots["system"], marker=2)  # the copy that used to be read instead
    monkeypatch.setattr(datasets, "FASHION_MNIST_SHA256", tiny.sha256)
    if how == "env":
        monkeypatch.setenv("PFEDLORA_DATA", str(named))
    ds = load_dataset("fashion-mnist", data_dir=named if how == "data_dir" else None, download=False)
    assert ds.train_x[0, 0, 0, 0] == 7


def test_fashion_mnist_files_in_a_layout_it_cannot_read_are_refused_naming_the_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_roots: dict[str, Path]
) -> None:
    named = tmp_path / "mine"
    tiny = write_fashion_mnist(tmp_path / "made")
    (named / "a").mkdir(parents=True)
    shutil.move(tiny.directory, named / "a" / "b")  # mine/a/b/*.gz
    system = write_fashion_mnist(isolated_roots["system"], marker=2)
    monkeypatch.setattr(datasets, "FASHION_MNIST_SHA256", system.sha256)
    with pytest.raises(DataError) as caught:
        load_dataset("fashion-mnist", data_dir=named, download=False)
    message = str(caught.value)
    assert "in a layout pfedlora does not read" in message
    assert str(named / "a" / "b" / "t10k-images-idx3-ubyte.gz") in message
    assert f"fashion-mnist/ with the four IDX files in {named}" in message
    # some of the four files directly in the named folder: the missing ones are named
    shutil.move(named / "a" / "b" / "train-images-idx3-ubyte.gz", named)
    with pytest.raises(DataError, match=r"mine lacks train-labels-idx1-ubyte.gz, t10k-images"):
        load_dataset("fashion-mnist", data_dir=named, download=False)


@pytest.mark.parametrize("named", ["extracted-folder", "archive-file"])
def test_cifar_named_as_its_folder_or_its_archive_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named: str
) -> None:
    tiny = write_cifar(tmp_path / "made", "cifar10", keep_folder=True)
    monkeypatch.setattr(datasets, "CIFAR10_MD5", tiny.md5)
    path = tiny.folder if named == "extracted-folder" else tiny.archive
    if named == "extracted-folder":
        tiny.archive.unlink()
    ds = load_dataset("cifar10", data_dir=path, download=False)
    assert ds.train_x.shape[1:] == (3, 32, 32) and ds.train_x[0, 0, 5, 7] == 11


def test_cifar_archive_in_a_layout_it_cannot_read_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path / "mine" / "downloads" / "cifar", "cifar10")  # the archive alone, two folders down
    with pytest.raises(DataError, match=r"holds cifar10 files in a layout .*downloads/cifar/cifar-10-python"):
        load_dataset("cifar10", data_dir=tmp_path / "mine", download=False)


def test_kjv_text_directly_in_a_named_folder_or_named_itself_is_found(tmp_path: Path) -> None:
    from pfedlora.data.corpora import KjvSource

    source = KjvSource(lambda: tmp_path / "cache")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "kjv.txt").write_text("Genesis 1\n")
    assert source.find(tmp_path / "mine", named=True) == tmp_path / "mine" / "kjv.txt"
    assert source.find(tmp_path / "mine" / "kjv.txt", named=True) == tmp_path / "mine" / "kjv.txt"
    assert source.find(tmp_path / "mine") is None  # a root nobody named keeps the documented layout
    (tmp_path / "other" / "texts").mkdir(parents=True)
    (tmp_path / "mine" / "kjv.txt").rename(tmp_path / "other" / "texts" / "kjv.txt")
    with pytest.raises(DataError, match=r"holds kjv files in a layout .*other/texts/kjv.txt"):
        load_dataset("kjv", data_dir=tmp_path / "other", download=False)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda raw: raw[: len(raw) // 2], "EOFError"),
        (lambda raw: raw[:20] + bytes(b ^ 0xFF for b in raw[20:60]) + raw[60:], "(BadGzipFile|error)"),
        (lambda raw: b"not gzip at all" + raw, "BadGzipFile"),
    ],
    ids=["truncated", "flipped", "foreign"],
)
def test_a_damaged_gz_is_one_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: Callable[[bytes], bytes], reason: str
) -> None:
    tiny = write_fashion_mnist(tmp_path / "explicit", num_train=200)
    monkeypatch.setattr(datasets, "FASHION_MNIST_SHA256", tiny.sha256)
    target = tiny.directory / "train-images-idx3-ubyte.gz"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(
        DataError, match=rf"train-images-idx3-ubyte\.gz: cannot be read \(.*{reason}.*delete it"
    ):
        load_dataset("fashion-mnist", data_dir=tmp_path / "explicit", download=False)


def test_a_damaged_cifar_archive_is_one_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = write_cifar(tmp_path / "explicit", "cifar10")
    tiny.archive.write_bytes(tiny.archive.read_bytes()[:300])
    with pytest.raises(ChecksumMismatchError, match=r"cifar-10-python\.tar\.gz: MD5 .* delete it"):
        load_dataset("cifar10", data_dir=tmp_path / "explicit", download=False)
    # Damaged in a way its checksum does not catch (the table itself names the damaged bytes):
    monkeypatch.setattr(datasets, "CIFAR10_MD5", {**tiny.md5, tiny.archive.name: md5(tiny.archive)})
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: cannot be read \(.*delete it"):
        load_dataset("cifar10", data_dir=tmp_path / "explicit", download=False)


def test_cifar_archive_in_a_root_is_found_and_extracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = write_cifar(tmp_path, "cifar10")
    monkeypatch.setattr(datasets, "CIFAR10_MD5", tiny.md5)
    monkeypatch.setenv("PFEDLORA_DATA", str(tmp_path))

    first = load_dataset("cifar10", download=False)
    tiny.archive.unlink()  # the second load reads the extracted folder
    second = load_dataset("cifar10", download=False)

    assert torch.equal(first.train_x, second.train_x)


def test_unknown_dataset_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_dataset("mnist", download=False)
    assert "'mnist'" in str(caught.value)
    assert "fashion-mnist, cifar10, cifar100" in str(caught.value)


def test_missing_fashion_mnist_without_download_names_paths_and_remedies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_roots: dict[str, Path]
) -> None:
    monkeypatch.setenv("PFEDLORA_DATA", str(tmp_path / "env"))

    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("fashion-mnist", data_dir=tmp_path / "explicit", download=False)

    message = str(caught.value)
    for root in (tmp_path / "explicit", tmp_path / "env", isolated_roots["cache"], isolated_roots["system"]):
        assert str(root) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "PFEDLORA_DATA" in message and "--data-dir" in message


def test_missing_cifar_without_download_names_the_archive(isolated_roots: dict[str, Path]) -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("cifar100", download=False)
    message = str(caught.value)
    assert "cifar-100-python.tar.gz" in message
    assert str(isolated_roots["cache"]) in message and str(isolated_roots["system"]) in message


# --- download ----------------------------------------------------------------------------------------------


def _fake_retrieve(source: Path, calls: list[dict[str, object]]):
    def retrieve(url: str, known_hash: str, fname: str, path: Path, progressbar: bool = False) -> str:
        calls.append({"url": url, "known_hash": known_hash, "fname": fname, "path": Path(path)})
        Path(path).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / fname, Path(path) / fname)
        return str(Path(path) / fname)

    return retrieve


def test_download_cifar_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = write_cifar(tmp_path / "server", "cifar10")
    monkeypatch.setattr(datasets, "CIFAR10_MD5", tiny.md5)
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(pooch, "retrieve", _fake_retrieve(tiny.root, calls))
    data_dir = tmp_path / "data"

    ds = load_dataset("cifar10", data_dir=data_dir)

    assert calls == [
        {
            "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "known_hash": f"md5:{tiny.md5['cifar-10-python.tar.gz']}",
            "fname": "cifar-10-python.tar.gz",
            "path": data_dir,
        }
    ]
    np.testing.assert_array_equal(ds.train_y.numpy(), tiny.train_labels)
    assert (data_dir / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_download_goes_to_cache_without_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_roots: dict[str, Path]
) -> None:
    tiny = write_cifar(tmp_path / "server", "cifar100")
    monkeypatch.setattr(datasets, "CIFAR100_MD5", tiny.md5)
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(pooch, "retrieve", _fake_retrieve(tiny.root, calls))

    load_dataset("cifar100")

    assert calls[0]["path"] == isolated_roots["cache"]
    assert (isolated_roots["cache"] / "cifar-100-python" / "meta").is_file()


def test_downloaded_archive_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = write_cifar(tmp_path / "server", "cifar10")
    monkeypatch.setattr(datasets, "CIFAR10_MD5", {**tiny.md5, "cifar-10-python.tar.gz": "f" * 32})
    monkeypatch.setattr(pooch, "retrieve", _fake_retrieve(tiny.root, []))

    with pytest.raises(ChecksumMismatchError, match=r"cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", data_dir=tmp_path / "data")


def test_download_fashion_mnist_fetches_the_four_official_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = write_fashion_mnist(tmp_path / "server")
    monkeypatch.setattr(datasets, "FASHION_MNIST_SHA256", tiny.sha256)
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(pooch, "retrieve", _fake_retrieve(tiny.directory, calls))

    ds = load_dataset("fashion-mnist", data_dir=tmp_path / "data")

    base = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    assert [(c["url"], c["known_hash"]) for c in calls] == [
        (base + "train-images-idx3-ubyte.gz", "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        (base + "train-labels-idx1-ubyte.gz", "md5:25c81989df183df01b3e8a0aad5dffbe"),
        (base + "t10k-images-idx3-ubyte.gz", "md5:bef4ecab320f06d8554ea6380940ec79"),
        (base + "t10k-labels-idx1-ubyte.gz", "md5:bb300cfdad3c16e7a12a480ee83cd310"),
    ]
    assert all(c["path"] == tmp_path / "data" / "fashion-mnist" for c in calls)
    np.testing.assert_array_equal(ds.train_y.numpy(), tiny.train_labels)
    assert sorted(p.name for p in (tmp_path / "data" / "fashion-mnist").iterdir()) == sorted(
        f"{stem}.gz" for stem in FASHION_STEMS
    )


def test_failed_download_is_one_clear_not_found_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_roots: dict[str, Path]
) -> None:
    def offline(*args: object, **kwargs: object) -> str:
        raise ConnectionError("no network")

    monkeypatch.setattr(pooch, "retrieve", offline)

    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("fashion-mnist")

    message = str(caught.value)
    assert "no network" in message
    assert str(isolated_roots["system"]) in message and "apt-get install dataset-fashion-mnist" in message


# --- Dataset -----------------------------------------------------------------------------------------------


def _toy_dataset() -> Dataset:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 2, 2, 2).contiguous()
    y = torch.tensor([0, 1, 1])
    return Dataset("toy", x, y, x[:1], y[:1], ("a", "b"), mean=(0.2, 0.5), std=(0.5, 0.25))


def test_normalize_exact_numbers() -> None:
    ds = _toy_dataset()

    out = ds.normalize(ds.train_x)

    assert out.dtype == torch.float32
    # channel 0: (x/255 - 0.2) / 0.5; channel 1: (x/255 - 0.5) / 0.25
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([-0.4, 0.0, 1.6]))
    torch.testing.assert_close(out[:, 1, 0, 0], torch.tensor([-2.0, -1.2, 2.0]))


def test_to_moves_every_tensor_and_keeps_metadata() -> None:
    ds = _toy_dataset()
    moved = ds.to("meta")
    assert all(t.device.type == "meta" for t in (moved.train_x, moved.train_y, moved.test_x, moved.test_y))
    assert (moved.name, moved.classes, moved.mean, moved.std) == (ds.name, ds.classes, ds.mean, ds.std)


def test_dataset_rejects_inconsistent_tensors() -> None:
    x = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(DataError):
        Dataset(
            "bad",
            x.float(),
            torch.zeros(2, dtype=torch.int64),
            x,
            torch.zeros(2, dtype=torch.int64),
            ("a",),
            (0.5,),
            (0.5,),
        )
    with pytest.raises(DataError):
        Dataset(
            "bad",
            x,
            torch.zeros(3, dtype=torch.int64),
            x,
            torch.zeros(2, dtype=torch.int64),
            ("a",),
            (0.5,),
            (0.5,),
        )
