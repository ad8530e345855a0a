"""Debian's fortunes by category: one sample per entry, every fifth entry of a category held out for test,
the category as label and source, the package verified by its digest."""

from __future__ import annotations

import pytest

from pfedlora.data import datasets
from pfedlora.data.corpora import FORTUNES_SYSTEM, FortunesSource, parse_fortunes
from pfedlora.errors import ChecksumMismatchError


def _folder(tmp_path):
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "cookie").write_text("".join(f"cookie {i}\nsecond line\n%\n" for i in range(1, 11)))
    (folder / "art").write_text("%\n".join(f"art {i}\n" for i in range(1, 6)))
    (folder / "art.dat").write_bytes(b"\x00\x02index")  # strfile's index: not a category
    (folder / "art.u8").symlink_to("art")
    return folder


def test_entries_are_samples_of_their_category_and_every_fifth_is_a_test_entry(tmp_path):
    corpus = parse_fortunes(_folder(tmp_path))
    assert corpus.classes == ("art", "cookie") == corpus.group_names
    assert len(corpus.train_texts) == 4 + 8 and len(corpus.test_texts) == 1 + 2
    assert corpus.test_texts == ("art 5", "cookie 5\nsecond line", "cookie 10\nsecond line")
    assert (
        corpus.train_y.tolist() == [0] * 4 + [1] * 8
        and corpus.train_groups.tolist() == corpus.train_y.tolist()
    )


def test_a_folder_that_is_not_the_package_s_text_is_refused_by_its_digest(tmp_path):
    source = FortunesSource(lambda: tmp_path / "cache", system=tmp_path / "none")
    folder = _folder(tmp_path)
    assert source.find(tmp_path) == folder and source.find(folder) is None
    assert source.find(folder, named=True) == folder
    with pytest.raises(ChecksumMismatchError, match=r"not the text of fortunes 1:1\.99\.1"):
        source.read(folder)


def test_the_installed_package_reads_as_43_categories_of_about_15000_entries():
    assert (FORTUNES_SYSTEM / "cookie").is_file(), "Debian's fortunes is not installed (make setup-test)"
    source = datasets.DATASETS["fortunes"]
    corpus = source.read(source.find(datasets.CACHE_DIR))
    assert len(corpus.classes) == 43
    assert len(corpus.train_texts) == 12_188 and len(corpus.test_texts) == 3_029
