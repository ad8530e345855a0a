"""Crash-safe checkpoints of a simulated run, and resuming from the last one.

Every ``federation.checkpoint_every`` rounds the run directory's ``checkpoint/`` receives the global state
and the private state of every client trained since the previous checkpoint (safetensors files whose names
carry the round; a state already in the run's client store is hard-linked, not written again), then
``manifest.json`` naming the round, the resolved configuration and the SHA-256 of every file it needs,
written atomically last; the manifest it replaces becomes ``manifest.previous.json``.
A crash at any moment leaves the last complete checkpoint intact, and the one before it too; files neither
manifest names are removed. Random streams need no saving: every one is derived from (seed, purpose, round,
client), so a resumed round draws exactly what it would have drawn. Clients never trained since the start
are rebuilt from their seeded initialisation.

On resume every file is checked against its digest before anything is loaded: a truncated or overwritten
checkpoint is refused with one line, naming the older intact checkpoint to continue from where there is
one (:class:`DamagedCheckpointError`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from safetensors.torch import load_file

from pfedlora.algorithms.state import check_schema
from pfedlora.config import ExperimentConfig, config_to_dict, differences, run_config_from_dict
from pfedlora.errors import ConfigError, DiskWriteError
from pfedlora.simulation.federation import resolve_device
from pfedlora.simulation.loop import ServerSide, StatefulPool
from pfedlora.simulation.records import RoundRecord
from pfedlora.simulation.results import file_digest, save_atomic, write_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
MANIFEST = "manifest.json"
PREVIOUS_MANIFEST = "manifest.previous.json"


FREE_ON_RESUME = ("federation.rounds", "federation.client_memory_mb")
"""Keys a resumed run may change: the number of rounds (see :func:`check_config`) and where client states
live (which never changes the results)."""


class Manifest(TypedDict):
    """``manifest.json``: the round of the last complete checkpoint and the files that hold it."""

    round: int
    server: str
    clients: dict[str, str]
    """Client id (as text) -> the file of its private state, for every client trained so far."""
    sha256: NotRequired[dict[str, str]]
    """File name -> SHA-256 of its bytes, for the server file and every client file."""
    config: NotRequired[dict[str, Any]]
    """The resolved configuration the checkpoint was written under (:func:`config_to_dict`)."""
    rng: str
    wall_seconds: float


class DamagedCheckpointError(ConfigError):
    """The last checkpoint of a run cannot be trusted; ``previous`` is the round of an intact older one."""

    def __init__(self, message: str, previous: int | None) -> None:
        super().__init__(message)
        self.previous = previous

    def __reduce__(self) -> tuple[type[DamagedCheckpointError], tuple[str, int | None]]:
        return type(self), (str(self), self.previous)


class Checkpointer:
    """Writes the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, restored: Manifest | None = None) -> None:
        """``restored``: the checkpoint the run continues from (None: a run from round 1)."""
        self.path = Path(run_dir) / CHECKPOINT_DIR
        self.last = restored
        self.round = restored["round"] if restored else 0
        self.clients: dict[str, str] = dict(restored["clients"]) if restored else {}
        self.sha256: dict[str, str] = dict(restored.get("sha256", {})) if restored else {}

    def save(
        self,
        server: ServerSide,
        clients: StatefulPool,
        server_round: int,
        records: Sequence[RoundRecord],
        seconds: float,
    ) -> None:
        """Checkpoint the run after ``server_round``; ``records`` are all rounds so far, ``seconds`` the
        wall time spent on them. Where a file cannot be written (:class:`~pfedlora.errors.DiskWriteError`),
        the previous checkpoint stays as it was: its manifest is replaced only once every new file is."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DiskWriteError.of(self.path, error) from None
        try:
            trained = {
                client["client_id"]
                for record in records
                if record["round"] > self.round
                for client in record["clients"]
            }
            saved = clients.save_states(trained, self.path, server_round)
            for client_id, (name, digest) in sorted(saved.items()):
                self.sha256[name] = digest
                self.clients[str(client_id)] = name
            server_file = f"server-r{server_round}.safetensors"
            self.sha256[server_file] = save_atomic(server.server_state, self.path / server_file)
            names = {server_file, *self.clients.values()}
            for name in names - self.sha256.keys():  # carried over from a checkpoint without digests
                self.sha256[name] = file_digest(self.path / name)
            manifest: Manifest = {
                "round": server_round,
                "server": server_file,
                "clients": dict(self.clients),
                "sha256": {name: digest for name, digest in sorted(self.sha256.items()) if name in names},
                "config": config_to_dict(server.config),
                "rng": f"every stream derived from seed {server.config.seed} and (purpose, round, client)",
                "wall_seconds": seconds,
            }
            if self.last is not None:
                write_atomic(self.path / PREVIOUS_MANIFEST, json.dumps(self.last, indent=1) + "\n")
            write_atomic(self.path / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            keep = {MANIFEST, *names}
            if self.last is not None:
                keep |= {PREVIOUS_MANIFEST, self.last["server"], *self.last["clients"].values()}
            self.last, self.round, self.sha256 = manifest, server_round, dict(manifest["sha256"])
            for path in self.path.iterdir():
                if path.name not in keep:
                    path.unlink()
        except DiskWriteError:  # what this attempt wrote is no checkpoint: free its space again
            for path in self.path.glob(f"*-r{server_round}.safetensors"):
                path.unlink(missing_ok=True)
            raise


def _read_manifest_file(path: Path) -> Manifest:
    """A manifest, checked for the keys a resume needs; ConfigError when unreadable or incomplete."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"checkpoint manifest {path} is unreadable ({error})") from None
    keys = ("round", "server", "clients", "wall_seconds")
    missing = [key for key in keys if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise ConfigError(f"checkpoint manifest {path} is incomplete (no {', '.join(missing)})")
    names = (
        [manifest["server"], *manifest["clients"].values()] if isinstance(manifest["clients"], dict) else []
    )
    if not names or any(not isinstance(n, str) or n != Path(n).name or n.startswith(".") for n in names):
        raise ConfigError(f"checkpoint manifest {path} names files outside its folder or none at all")
    if "sha256" not in manifest:
        logger.warning("%s was written by an older pfedlora: its files carry no digests, unverified", path)
    checked: Manifest = manifest
    return checked


def _verify(folder: Path, manifest_name: str) -> Manifest:
    """The manifest ``manifest_name`` in ``folder`` once every file it names exists and matches its digest;
    ConfigError naming the first that does not."""
    manifest = _read_manifest_file(folder / manifest_name)
    for name in (manifest["server"], *manifest["clients"].values()):
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"checkpoint file {path} is missing")
        if "sha256" in manifest and file_digest(path) != manifest["sha256"].get(name):
            raise ConfigError(f"checkpoint file {path} is damaged (its SHA-256 differs from the manifest's)")
    return manifest


def checkpoint_round(run_dir: str | Path) -> int:
    """The round of ``run_dir``'s last checkpoint as its manifest names it (0: none, or unreadable); files
    unverified, for telling people where a run stands."""
    try:
        manifest = json.loads((Path(run_dir) / CHECKPOINT_DIR / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    found = manifest.get("round") if isinstance(manifest, dict) else None
    return found if isinstance(found, int) else 0


def read_manifest(run_dir: str | Path, previous: bool = False) -> Manifest | None:
    """The manifest of the last intact checkpoint (``previous``: of the one before it), every file checked
    against its digest; None when there is no checkpoint.

    Raises :class:`DamagedCheckpointError` when the manifest or a file it names is unreadable, missing or
    damaged; its message names the intact older checkpoint, if there is one.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    latest, older = folder / MANIFEST, folder / PREVIOUS_MANIFEST
    if previous:
        if not older.is_file():
            raise ConfigError(f"{folder} holds no previous checkpoint to continue from")
        return _verify(folder, PREVIOUS_MANIFEST)
    if not latest.is_file():
        if older.is_file():  # only a crash between the two atomic writes of save() can leave this
            return _verify(folder, PREVIOUS_MANIFEST)
        return None
    try:
        return _verify(folder, MANIFEST)
    except ConfigError as error:
        try:
            fallback = _verify(folder, PREVIOUS_MANIFEST)["round"] if older.is_file() else None
        except ConfigError:
            fallback = None
        offer = (
            f"; the checkpoint of round {fallback} is intact: continue from it with "
            "`pfedlora run --resume RUN_DIR --previous-checkpoint`"
            if fallback is not None
            else "; no older intact checkpoint exists: start the run again"
        )
        raise DamagedCheckpointError(f"cannot resume: {error}{offer}", fallback) from None


def check_config(manifest: Manifest, config: ExperimentConfig, folder: Path) -> None:
    """Refuse to continue under a configuration other than the checkpoint's, naming every key that changed;
    ``federation.rounds`` (a run extended or shortened, see :func:`pfedlora.simulation.resume_run`) and the
    memory budget of the client store may differ."""
    if "config" not in manifest:
        logger.warning("%s records no configuration: config.toml is trusted as it is", folder)
        return
    details = differences(run_config_from_dict(manifest["config"]), config, FREE_ON_RESUME)
    if details:
        raise ConfigError(
            f"the configuration (config.toml) differs from the one checkpoint {folder} was written under "
            f"({details}): continuing would mix two configurations in one run; restore those keys, or start "
            "a new run"
        )


def restore(run_dir: str | Path, server: ServerSide, clients: StatefulPool, manifest: Manifest) -> None:
    """Load the checkpoint ``manifest`` (from :func:`read_manifest`) of ``run_dir`` into ``server`` and
    ``clients``.

    The global state must have exactly the keys, shapes and dtypes of the server's initial one, and every
    client file those of the client's architecture; else ConfigError. Client files are linked into the
    client store and read when each client is next needed.
    """
    device = resolve_device(server.config.device)
    folder = Path(run_dir) / CHECKPOINT_DIR
    try:
        server_state = load_file(str(folder / manifest["server"]))
        check_schema(server_state, server.server_state)
        server.server_state = {key: value.to(device) for key, value in server_state.items()}
        digests = manifest.get("sha256", {})
        clients.restore_states(
            {int(cid): (folder / name, digests.get(name)) for cid, name in manifest["clients"].items()}
        )
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise ConfigError(f"checkpoint in {folder} cannot be loaded: {error}") from error
