"""Crash-safe checkpoints of a simulated run, and resuming from the last one.

Every ``federation.checkpoint_every`` rounds the run directory's ``checkpoint/`` receives the global state
and the private state of every client trained since the previous checkpoint (safetensors files whose names
carry the round), then ``manifest.json`` naming the round and the file of every saved client, written
atomically last. A crash at any moment leaves the previous manifest, and the files it names, intact; files
no manifest names are removed after the next one is written. Random streams need no saving: every one is
derived from (seed, purpose, round, client), so a resumed round draws exactly what it would have drawn.
Clients never trained since the start are rebuilt from their seeded initialisation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import torch
from safetensors.torch import load_file, save_file

from pfedlora.algorithms.state import check_schema
from pfedlora.errors import ConfigError
from pfedlora.simulation.federation import resolve_device
from pfedlora.simulation.loop import ServerSide, StatefulPool
from pfedlora.simulation.records import RoundRecord
from pfedlora.simulation.results import write_atomic

CHECKPOINT_DIR = "checkpoint"
MANIFEST = "manifest.json"


class Manifest(TypedDict):
    """``manifest.json``: the round of the last complete checkpoint and the files that hold it."""

    round: int
    server: str
    clients: dict[str, str]
    """Client id (as text) -> the file of its private state, for every client trained so far."""
    rng: str
    wall_seconds: float


def save_atomic(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` to a safetensors file so that readers see either the old or the whole new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


class Checkpointer:
    """Writes the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / CHECKPOINT_DIR
        manifest = read_manifest(run_dir)
        self.round = manifest["round"] if manifest else 0
        self.clients: dict[str, str] = dict(manifest["clients"]) if manifest else {}

    def save(
        self,
        server: ServerSide,
        clients: StatefulPool,
        server_round: int,
        records: Sequence[RoundRecord],
        seconds: float,
    ) -> None:
        """Checkpoint the run after ``server_round``; ``records`` are all rounds so far, ``seconds`` the
        wall time spent on them."""
        self.path.mkdir(parents=True, exist_ok=True)
        trained = {
            client["client_id"]
            for record in records
            if record["round"] > self.round
            for client in record["clients"]
        }
        for client_id, state in sorted(clients.state_dicts(trained).items()):
            name = f"client-{client_id}-r{server_round}.safetensors"
            save_atomic(state, self.path / name)
            self.clients[str(client_id)] = name
        server_file = f"server-r{server_round}.safetensors"
        save_atomic(server.server_state, self.path / server_file)
        manifest: Manifest = {
            "round": server_round,
            "server": server_file,
            "clients": self.clients,
            "rng": f"every stream derived from seed {server.config.seed} and (purpose, round, client)",
            "wall_seconds": seconds,
        }
        write_atomic(self.path / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        self.round = server_round
        keep = {MANIFEST, server_file, *self.clients.values()}
        for path in self.path.iterdir():
            if path.name not in keep:
                path.unlink()


def read_manifest(run_dir: str | Path) -> Manifest | None:
    """The last complete checkpoint's manifest, or None when there is none."""
    path = Path(run_dir) / CHECKPOINT_DIR / MANIFEST
    if not path.is_file():
        return None
    manifest: Manifest = json.loads(path.read_text(encoding="utf-8"))
    return manifest


def restore(run_dir: str | Path, server: ServerSide, clients: StatefulPool) -> Manifest | None:
    """Load the last checkpoint of ``run_dir`` into ``server`` and ``clients``; returns its manifest (None:
    none).

    The global state must have exactly the keys, shapes and dtypes of the server's initial one, and every
    client state those of the client's module (``load_state_dict`` is strict); else ConfigError.
    """
    device = resolve_device(server.config.device)
    manifest = read_manifest(run_dir)
    if manifest is None:
        return None
    folder = Path(run_dir) / CHECKPOINT_DIR
    try:
        server_state = load_file(str(folder / manifest["server"]))
        check_schema(server_state, server.server_state)
        server.server_state = {key: value.to(device) for key, value in server_state.items()}
        clients.load_state_dicts(
            {int(client_id): load_file(str(folder / name)) for client_id, name in manifest["clients"].items()}
        )
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise ConfigError(f"checkpoint in {folder} cannot be loaded: {error}") from error
    return manifest
