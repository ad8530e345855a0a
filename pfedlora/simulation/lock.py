"""One writer per directory: an exclusive lock on a run, comparison or search directory, held by the process
that writes it.

The lock is ``fcntl.flock`` on ``DIR/.pfedlora.lock``: the kernel releases it when the holding process
exits, however it exits (a crash or SIGKILL never leaves a stale lock), and a second process that tries to
take it is refused at once with :class:`DirectoryBusyError`, naming the holder (its process id, host and
command, written into the lock file). The lock file stays in the directory (removing it would let two
processes lock two different files of one name). Within one process the lock is re-entrant, so a search
that runs comparisons in its own directory takes it once. Readers (``pfedlora report``) need no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from pfedlora.errors import ConfigError, DiskWriteError

LOCK_FILE = ".pfedlora.lock"


class DirectoryBusyError(ConfigError):
    """Another process holds the directory's lock."""


_HELD: dict[Path, int] = {}
"""The directories (resolved) whose locks are held, each with the id of the process holding it (a forked
child inherits this table, not the locks)."""


def _note(directory: Path) -> dict[str, object] | None:
    try:
        about = json.loads((directory / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return about if isinstance(about, dict) and {"pid", "host", "command", "since"} <= about.keys() else None


def holder(directory: str | Path) -> str:
    """Who holds (or last held) ``directory``'s lock, as its lock file says: process, host, command, since."""
    about = _note(Path(directory))
    if about is None:
        return "another process"
    return f"process {about['pid']} on {about['host']} (`{about['command']}`, since {about['since']})"


def live_writer(directory: str | Path) -> str | None:
    """The process that last locked ``directory`` (see :func:`holder`) if it still runs on this host, else
    None. Read from the lock file's note without touching the lock, so a reader never gets in a writer's way
    (a reused process id can fool it: it is for telling people, not for deciding)."""
    about = _note(Path(directory))
    if about is None or about["host"] != socket.gethostname() or not isinstance(about["pid"], int):
        return None
    try:
        os.kill(about["pid"], 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it runs, under another user
    return holder(directory)


@contextmanager
def directory_lock(directory: str | Path) -> Iterator[None]:
    """Hold ``directory``'s exclusive lock within the block (the directory must exist).

    Raises :class:`DirectoryBusyError` (a one-line ConfigError naming the directory and its holder) when
    another process holds it; re-entrant within this process.
    """
    directory = Path(directory)
    key = _key(directory)
    if _HELD.get(key) == os.getpid():
        yield  # the enclosing block holds it and releases it
        return
    try:
        handle = open(directory / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held for the block)
    except OSError as error:
        raise DiskWriteError.of(directory / LOCK_FILE, error) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DirectoryBusyError(
            f"{directory} is in use by {holder(directory)}: two processes writing one directory would "
            "corrupt it; wait for that one to end, or stop it (`pfedlora report` reads a run meanwhile)"
        ) from None
    except BaseException:
        handle.close()
        raise
    try:
        about = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python",
            "since": datetime.now().isoformat(timespec="seconds"),
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(about) + "\n")
        handle.flush()
    except OSError:
        pass  # the lock holds without the note (a full disk): refusals then name "another process"
    _HELD[key] = os.getpid()
    try:
        yield
    finally:
        del _HELD[key]
        handle.close()  # releases the lock


def _key(directory: Path) -> Path:
    return directory.resolve()
