"""Private client states whose memory follows the clients in use, not the size of the federation.

A :class:`ClientStore` holds the states of a share of the clients (all of them in one process; a worker's
share in a worker process). A client's state is created when first needed, from its own seeded stream
(the same numbers as creating every client up front). States in use stay in memory, least recently used
last, up to a budget of bytes; beyond it the oldest is written to the store's folder (one safetensors file
per client, written atomically) and read back when the client is needed again. A client that has never
been handed out for training holds nothing at all: it is recreated from its seed whenever it is scored.

Checkpoints reuse the store's files: a client already on disk is hard-linked into the checkpoint instead
of being written again (files are only ever replaced, never changed in place, so the link keeps the
checkpoint's bytes), and resuming links the checkpoint's files back into the store, to be read when each
client is next needed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from pfedlora.algorithms import State
from pfedlora.simulation.results import file_digest, save_atomic, writing

SavedFiles = dict[int, tuple[str, str]]
"""Client id -> (file name, SHA-256) of the state files a checkpoint received."""
StateFiles = Mapping[int, tuple[Path, str | None]]
"""Client id -> (path, SHA-256 if known) of state files to restore."""
StateFactory = Callable[[int], nn.Module]
"""A client's fresh private state, from its seeded initialisation, by client id."""


def checkpoint_file(client_id: int, server_round: int) -> str:
    """The name of client ``client_id``'s file in the checkpoint after ``server_round``."""
    return f"client-{client_id}-r{server_round}.safetensors"


def state_bytes(module: nn.Module) -> int:
    """Bytes of the tensors of ``module``'s state dict."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class ClientStore(Mapping[int, nn.Module]):
    """The private states of the clients ``client_ids``, created when first needed (a mapping from client
    id to state; reading an entry hands the state out for training and keeps it).

    ``memory_bytes`` bounds the states kept in memory (0: no bound); beyond it the least recently used are
    written to ``folder`` (a temporary folder when None, made only if needed). ``kind_of`` names a
    client's architecture (states of one architecture have one schema, checked when restoring files).
    """

    def __init__(
        self,
        create: StateFactory,
        kind_of: Callable[[int], str],
        client_ids: Iterable[int],
        memory_bytes: int = 0,
        folder: Path | None = None,
    ) -> None:
        self.create, self.kind_of = create, kind_of
        self.memory_bytes = memory_bytes
        self.owned = set(client_ids)
        self.resident: OrderedDict[int, nn.Module] = OrderedDict()
        self.resident_bytes: dict[int, int] = {}
        self.on_disk: dict[int, str] = {}
        """Client id -> SHA-256 of its file in the folder (the latest state of a client not resident)."""
        self._folder = folder
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        self._schemas: dict[str, dict[str, tuple[list[int], torch.dtype]]] = {}
        self.writes = 0
        """States written to the folder by eviction (for the scale benchmark)."""

    # --- the Mapping protocol ----------------------------------------------------------------------------

    def __getitem__(self, client_id: int) -> nn.Module:
        """Client ``client_id``'s state, kept in memory (it may change: it is written out when evicted)."""
        self._check(client_id)
        module = self.resident.get(client_id)
        if module is None:
            module = self._materialize(client_id)
            self.resident[client_id] = module
            self.resident_bytes[client_id] = state_bytes(module)
            self._drop_file(client_id)  # the resident state is now the latest
        self.resident.move_to_end(client_id)
        self._evict()
        return module

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.owned))

    def __len__(self) -> int:
        return len(self.owned)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self.owned

    # --- reading without keeping ---------------------------------------------------------------------

    def view(self, client_id: int) -> nn.Module:
        """Client ``client_id``'s state to be read (scored), not changed: a state not in memory is loaded or
        recreated for the caller alone and is not kept."""
        self._check(client_id)
        module = self.resident.get(client_id)
        return module if module is not None else self._materialize(client_id)

    def state_dict(self, client_id: int) -> State:
        """Client ``client_id``'s state dict (its tensors, wherever they are)."""
        self._check(client_id)
        if client_id in self.resident:
            return self.resident[client_id].state_dict()
        if client_id in self.on_disk:
            return load_file(str(self._file(client_id)))
        return self.create(client_id).state_dict()

    # --- moving clients between stores, checkpoints ---------------------------------------------------

    def release(self, client_id: int) -> State:
        """Hand client ``client_id`` over (to another store): its state dict; this store forgets it."""
        state = self.state_dict(client_id)
        self.resident.pop(client_id, None)
        self.resident_bytes.pop(client_id, None)
        self._drop_file(client_id)
        self.owned.discard(client_id)
        return state

    def adopt(self, client_id: int, state: Mapping[str, torch.Tensor]) -> None:
        """Take client ``client_id`` over (from another store, or a checkpoint) with ``state``."""
        self.owned.add(client_id)
        self._drop_file(client_id)
        self.resident.pop(client_id, None)
        self[client_id].load_state_dict(state)

    def save(self, client_id: int, path: Path) -> str:
        """Write client ``client_id``'s state to ``path`` (a link to its store file when it is on disk);
        returns the SHA-256 of the file's bytes."""
        if client_id in self.on_disk:
            path.unlink(missing_ok=True)
            _link_or_copy(self._file(client_id), path)
            return self.on_disk[client_id]
        return save_atomic(self.state_dict(client_id), path)

    def restore(self, client_id: int, path: Path, digest: str | None = None) -> None:
        """Take client ``client_id``'s state from the safetensors file ``path`` (read when the client is next
        needed). ValueError naming the difference unless the file holds exactly the tensor names, shapes
        and dtypes of the client's architecture."""
        self._check(client_id)
        expected = self._schema(client_id)
        with safe_open(str(path), framework="pt") as handle:
            found = {
                key: (list(handle.get_slice(key).get_shape()), _dtype(handle.get_slice(key).get_dtype()))
                for key in handle.keys()  # noqa: SIM118 (a safetensors handle is not a mapping)
            }
        if found != expected:
            differing = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
            raise ValueError(
                f"{path.name} does not hold client {client_id}'s state ({self.kind_of(client_id)}): tensors "
                f"differ at {', '.join(differing[:5])}"
            )
        self.resident.pop(client_id, None)
        self.resident_bytes.pop(client_id, None)
        target = self._file(client_id)
        self._drop_file(client_id)
        _link_or_copy(path, target)
        self.on_disk[client_id] = digest or file_digest(target)

    # --- figures -------------------------------------------------------------------------------------------

    def bytes_in_memory(self) -> int:
        """Bytes of the states held in memory."""
        return sum(self.resident_bytes.values())

    def bytes_on_disk(self) -> int:
        """Bytes of the states held in the folder."""
        return sum(self._file(cid).stat().st_size for cid in self.on_disk)

    def figures(self) -> dict[str, int]:
        """Bytes in memory, bytes on disk, and states written to disk so far (for the scale benchmark)."""
        return {
            "bytes_in_memory": self.bytes_in_memory(),
            "bytes_on_disk": self.bytes_on_disk(),
            "writes": self.writes,
        }

    # --- internals -----------------------------------------------------------------------------------------

    def _check(self, client_id: int) -> None:
        if client_id not in self.owned:
            raise KeyError(f"client {client_id} is not held here")

    def _materialize(self, client_id: int) -> nn.Module:
        module = self.create(client_id)
        if client_id in self.on_disk:
            module.load_state_dict(load_file(str(self._file(client_id)), device=_device_of(module)))
        return module

    def _evict(self) -> None:
        """Write the least recently used states to the folder until the rest fit the budget (the most
        recent one always stays)."""
        if not self.memory_bytes:
            return
        while len(self.resident) > 1 and self.bytes_in_memory() > self.memory_bytes:
            client_id, module = self.resident.popitem(last=False)
            self.resident_bytes.pop(client_id)
            self.on_disk[client_id] = save_atomic(module.state_dict(), self._file(client_id))
            self.writes += 1

    def _schema(self, client_id: int) -> dict[str, tuple[list[int], torch.dtype]]:
        kind = self.kind_of(client_id)
        if kind not in self._schemas:
            state = self.create(client_id).state_dict()
            self._schemas[kind] = {key: (list(t.shape), t.dtype) for key, t in state.items()}
        return self._schemas[kind]

    @property
    def folder(self) -> Path:
        """Where evicted states go (created when first needed)."""
        if self._folder is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="pfedlora-clients-")
            self._folder = Path(self._temporary.name)
        with writing(self._folder):
            self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    def _file(self, client_id: int) -> Path:
        return self.folder / f"client-{client_id}.safetensors"

    def _drop_file(self, client_id: int) -> None:
        if self.on_disk.pop(client_id, None) is not None:
            self._file(client_id).unlink(missing_ok=True)


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a copy across file systems or where links are unsupported);
    :class:`~pfedlora.errors.DiskWriteError` where neither can be written."""
    try:
        os.link(source, target)
    except OSError:
        with writing(target, target):
            shutil.copyfile(source, target)


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _dtype(name: str) -> torch.dtype | str:
    return _DTYPES.get(name, name)


def _device_of(module: nn.Module) -> str:
    tensor = next(iter(module.state_dict().values()), None)
    return "cpu" if tensor is None else str(tensor.device)
