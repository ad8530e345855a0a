"""Text corpora of one's own: the King James Bible by genre (``kjv``), before tokenization.

The KJV text (public domain) comes from Debian's ``bible-kjv-text`` package, whose ``bible`` program
(package ``bible-kjv``) prints it; the first read writes the dump to the user cache, and later reads take the
file, verified by its SHA-256. A file ``kjv/kjv.txt`` in that format under any lookup root (``--data-dir``,
``$PFEDLORA_DATA``, the user cache, ``/usr/share/datasets``) serves as well. Each verse is a sample labelled
by the genre of its book (law, history, wisdom, prophets, gospels and acts, epistles, apocalyptic); its
book is its source (``groups``), so the ``by-source`` partition can deal whole books to clients. Within each
book every fifth verse (the 5th, 10th, …) is a test verse, the rest are training verses: every book, and so
every client, has both.

A corpus becomes tensors in :mod:`pfedlora.data.text` (tokenized by each model family's tokenizer).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pfedlora.errors import ChecksumMismatchError, DataError, DatasetNotFoundError

KJV_DIR = "kjv"
KJV_FILE = "kjv.txt"
KJV_SHA256 = "6f74f5589333c56c263963e6347dba662bae2d96861302e690aaae0b4a855eda"
"""SHA-256 of ``bible -l0 "Gen1:1-Rev22:21"`` (bible-kjv 4.x): chapter headers, then one verse a line."""
KJV_VERSES = 31_102
KJV_PROGRAM_DATA = Path("/usr/lib/bible.data")
KJV_RANGE = "Gen1:1-Rev22:21"
TEST_EVERY = 5

KJV_GENRES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("law", ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy")),
    (
        "history",
        (
            "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles",
            "2 Chronicles", "Ezra", "Nehemiah", "Esther",
        ),
    ),
    ("wisdom", ("Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon")),
    (
        "prophets",
        (
            "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah",
            "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
        ),
    ),
    ("gospels and acts", ("Matthew", "Mark", "Luke", "John", "Acts")),
    (
        "epistles",
        (
            "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians",
            "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus",
            "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude",
        ),
    ),
    ("apocalyptic", ("Revelation",)),
)  # fmt: skip
KJV_BOOKS: tuple[str, ...] = tuple(book for _, books in KJV_GENRES for book in books)
_GENRE_OF = {book: genre for genre, (_, books) in enumerate(KJV_GENRES) for book in books}
_CHAPTER = re.compile(r"^(?P<book>\S.*?) (?P<chapter>\d+)$")
_VERSE = re.compile(r"^\s+(?P<verse>\d+) (?P<text>.+)$")


@dataclass(frozen=True)
class TextCorpus:
    """Labelled texts with their sources, split into train and test, before tokenization."""

    name: str
    train_texts: tuple[str, ...]
    train_y: torch.Tensor
    train_groups: torch.Tensor
    test_texts: tuple[str, ...]
    test_y: torch.Tensor
    test_groups: torch.Tensor
    classes: tuple[str, ...]
    group_names: tuple[str, ...]


def parse_kjv(text: str, source: Path | str = "kjv", whole: bool = True) -> TextCorpus:
    """The KJV corpus from ``bible -l0`` output: ``Book N`` chapter lines, then ``  v text`` verse lines.

    ``whole``: refuse anything but the whole text (31,102 verses in 66 books); False reads a slice.
    """
    verses: list[tuple[int, str]] = []
    book = -1
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        verse = _VERSE.match(line)
        if verse is not None:
            if book < 0:
                raise DataError(f"{source}:{number}: a verse before any chapter heading")
            verses.append((book, verse["text"].strip()))
            continue
        chapter = _CHAPTER.match(line)
        if chapter is None or chapter["book"] not in _GENRE_OF:
            raise DataError(
                f"{source}:{number}: neither a verse nor a chapter heading of a known book: {line!r}"
            )
        book = KJV_BOOKS.index(chapter["book"])
    books = {b for b, _ in verses}
    if whole and (len(verses) != KJV_VERSES or len(books) != len(KJV_BOOKS)):
        raise DataError(
            f"{source}: {len(verses)} verses in {len(books)} books; "
            f"the KJV has {KJV_VERSES} in {len(KJV_BOOKS)}"
        )
    train: list[tuple[int, str]] = []
    test: list[tuple[int, str]] = []
    position = dict.fromkeys(range(len(KJV_BOOKS)), 0)
    for b, verse_text in verses:
        position[b] += 1
        (test if position[b] % TEST_EVERY == 0 else train).append((b, verse_text))

    def labelled(part: list[tuple[int, str]]) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor]:
        groups = torch.tensor([b for b, _ in part], dtype=torch.int64)
        labels = torch.tensor([_GENRE_OF[KJV_BOOKS[b]] for b, _ in part], dtype=torch.int64)
        return tuple(t for _, t in part), labels, groups

    train_texts, train_y, train_groups = labelled(train)
    test_texts, test_y, test_groups = labelled(test)
    classes = tuple(genre for genre, _ in KJV_GENRES)
    return TextCorpus(
        "kjv", train_texts, train_y, train_groups, test_texts, test_y, test_groups, classes, KJV_BOOKS
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dump_kjv(target: Path) -> Path:
    """Write the ``bible`` program's text of the whole KJV to ``target/kjv/kjv.txt`` (atomically)."""
    program = shutil.which("bible")
    if program is None or not KJV_PROGRAM_DATA.is_file():
        raise DatasetNotFoundError("the `bible` program of Debian's bible-kjv package is not installed")
    done = subprocess.run(
        [program, "-l0", KJV_RANGE], capture_output=True, check=False, env={**os.environ, "COLUMNS": "0"}
    )
    if done.returncode != 0:
        raise DataError(f"`bible -l0 {KJV_RANGE}` failed ({done.returncode}): {done.stderr.decode()[:200]}")
    folder = target / KJV_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as handle:
        handle.write(done.stdout)
    Path(handle.name).replace(folder / KJV_FILE)
    return folder / KJV_FILE


def read_kjv(path: Path, sha256: str = KJV_SHA256) -> TextCorpus:
    """The KJV corpus from a ``kjv.txt`` dump, verified by SHA-256."""
    raw = path.read_bytes()
    if _sha256(raw) != sha256:
        raise ChecksumMismatchError(
            f"{path}: SHA-256 is {_sha256(raw)}, expected {sha256}; the file is corrupt or not the text of "
            "bible-kjv (delete it to dump it again)"
        )
    return parse_kjv(raw.decode("utf-8"), path)


class KjvSource:
    """The KJV by genre: ``<root>/kjv/kjv.txt``, or Debian's bible-kjv (dumped once into the cache)."""

    kind = "text"
    looked_for = f"{KJV_DIR}/{KJV_FILE} (or Debian's bible-kjv package)"
    file_names: tuple[str, ...] = (KJV_FILE,)

    def __init__(self, cache: Callable[[], Path]) -> None:
        self._cache = cache

    def find(self, root: Path, named: bool = False) -> Path | None:
        """``<root>/kjv/kjv.txt``; where the user named ``root``, also ``<root>/kjv.txt`` or ``root`` as the
        file itself; in the cache, Debian's bible-kjv (dumped there on first read)."""
        path = root / KJV_DIR / KJV_FILE
        if path.is_file():
            return path
        if named and (root / KJV_FILE).is_file():
            return root / KJV_FILE
        if named and root.is_file() and root.name == KJV_FILE:
            return root
        if root == self._cache() and shutil.which("bible") and KJV_PROGRAM_DATA.is_file():
            return KJV_PROGRAM_DATA
        return None

    def incomplete(self, root: Path, named: bool = False) -> str | None:
        folder = root / KJV_DIR
        return f"{folder} lacks {KJV_FILE}" if folder.is_dir() and not (folder / KJV_FILE).is_file() else None

    def read(self, path: Path) -> TextCorpus:
        if path == KJV_PROGRAM_DATA:
            path = dump_kjv(self._cache())
        return read_kjv(path)

    def download(self, target: Path) -> Path:
        raise DatasetNotFoundError("the KJV text has no download here; it comes with Debian's bible-kjv")

    def how_to_get(self) -> str:
        return (
            "To get it: `apt-get install bible-kjv` (Debian/Ubuntu; it brings bible-kjv-text), or put the "
            f"output of `bible -l0 {KJV_RANGE}` in <dir>/{KJV_DIR}/{KJV_FILE} and pass --data-dir <dir>."
        )


FORTUNES_DIR = "fortunes"
FORTUNES_SYSTEM = Path("/usr/share/games/fortunes")
FORTUNES_SHA256 = "2e046be295bc248ada14e24c527d1958e46e21517d0d616093f83c4bf13d29f6"
"""SHA-256 over the 43 category files of Debian's ``fortunes`` 1:1.99.1-7.3 (each name, NUL, its bytes, NUL;
in name order)."""
FORTUNES_PACKAGE = "fortunes 1:1.99.1 (Debian 12)"


def _fortune_files(folder: Path) -> list[Path]:
    """The category files of a fortune folder: plain files, neither the ``.dat`` indexes nor ``.u8`` links."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.is_symlink() and path.suffix not in (".dat", ".u8")
    )


def fortunes_digest(folder: Path) -> str:
    """The SHA-256 :data:`FORTUNES_SHA256` is of, for the category files of ``folder``."""
    digest = hashlib.sha256()
    for path in _fortune_files(folder):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def parse_fortunes(folder: Path) -> TextCorpus:
    """The fortunes of ``folder`` as a corpus: one sample per entry (entries end at a line holding only
    ``%``), labelled and grouped by its category file; every fifth entry of a category is a test entry."""
    files = _fortune_files(folder)
    if not files:
        raise DatasetNotFoundError(f"{folder} holds no fortune category files")
    train: list[tuple[int, str]] = []
    test: list[tuple[int, str]] = []
    for category, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        entries = [entry.strip() for entry in re.split(r"^%$", text, flags=re.MULTILINE) if entry.strip()]
        for position, entry in enumerate(entries, start=1):
            (test if position % TEST_EVERY == 0 else train).append((category, entry))

    def labelled(part: list[tuple[int, str]]) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor]:
        categories = torch.tensor([c for c, _ in part], dtype=torch.int64)
        return tuple(t for _, t in part), categories, categories.clone()

    names = tuple(path.name for path in files)
    train_texts, train_y, train_groups = labelled(train)
    test_texts, test_y, test_groups = labelled(test)
    return TextCorpus(
        "fortunes", train_texts, train_y, train_groups, test_texts, test_y, test_groups, names, names
    )


class FortunesSource:
    """Debian's ``fortunes`` by category: ``<root>/fortunes/`` holding the category files, or the installed
    package (``/usr/share/games/fortunes``), verified by :data:`FORTUNES_SHA256`. Each entry is a sample of
    its category (43 of them, about 15,000 entries); the category is its label and its source, so the
    ``by-source`` partition gives each client a few whole categories."""

    kind = "text"
    looked_for = f"{FORTUNES_DIR}/ with the category files (or Debian's fortunes package)"
    file_names: tuple[str, ...] = ("cookie", "computers", "definitions")

    def __init__(self, cache: Callable[[], Path], system: Path = FORTUNES_SYSTEM) -> None:
        self._cache, self._system = cache, system

    def find(self, root: Path, named: bool = False) -> Path | None:
        """``<root>/fortunes/``; where the user named ``root``, also ``root`` itself; in the cache, the
        installed package."""
        for folder in (root / FORTUNES_DIR, *((root,) if named else ())):
            if folder.is_dir() and (folder / "cookie").is_file():
                return folder
        if root == self._cache() and (self._system / "cookie").is_file():
            return self._system
        return None

    def incomplete(self, root: Path, named: bool = False) -> str | None:
        folder = root / FORTUNES_DIR
        return (
            f"{folder} lacks the category files" if folder.is_dir() and not _fortune_files(folder) else None
        )

    def read(self, path: Path) -> TextCorpus:
        digest = fortunes_digest(path)
        if digest != FORTUNES_SHA256:
            raise ChecksumMismatchError(
                f"{path}: SHA-256 of the category files is {digest}, expected {FORTUNES_SHA256}; not the "
                f"text of {FORTUNES_PACKAGE} (this version is what the results were measured on)"
            )
        return parse_fortunes(path)

    def download(self, target: Path) -> Path:
        raise DatasetNotFoundError("the fortunes have no download here; they come with Debian's fortunes")

    def how_to_get(self) -> str:
        return (
            "To get them: `apt-get install fortunes` (Debian/Ubuntu), or put the category files in "
            f"<dir>/{FORTUNES_DIR}/ and pass --data-dir <dir>."
        )
