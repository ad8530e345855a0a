"""A pool of worker processes that train and evaluate a run's clients in parallel.

Worker ``w`` of ``W`` starts owning the clients ``c`` with ``c mod W == w``: their private states live in
that process's client store (created when first needed, spilling to disk beyond ``1/W`` of the memory
budget) and stay there (a checkpoint asks each worker to write the files of its clients). Per round
only the server's messages go out and the uploads and their costs come back. A round's sampled clients
rarely split evenly between fixed owners (10 of 100 over 2 workers: 80% of the cores busy on average), so
before each round the pool moves the few private states that balance the round's estimated work
(training samples times the FLOPs per sample measured for the client's architecture); a move costs one
state dict through a pipe, milliseconds against a client's seconds of training.
The dataset is put in shared memory once and mapped by every worker. Each worker runs ``threads``
intra-op threads (one by default), so ``W`` workers on ``W`` cores never oversubscribe them.

Every client trains from its own seeded streams, whichever process holds it, and the server computes on
one thread in the parent (:data:`~pfedlora.simulation.loop.SERVER_THREADS`), so the metrics are the same
for any number of workers (as long as the thread count per worker is the same). A worker that dies stops
the run with :class:`WorkerError`; the run directory's last checkpoint is intact, and ``--resume`` continues
from it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import resource
import tempfile
import traceback
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch
import torch.multiprocessing as torch_mp

from pfedlora.algorithms import State
from pfedlora.config import ExperimentConfig
from pfedlora.data import Dataset
from pfedlora.errors import PfedloraError
from pfedlora.metrics import AccuracyReport, FlopMeter
from pfedlora.simulation.federation import build_federation, client_counts
from pfedlora.simulation.local import LocalClients
from pfedlora.simulation.loop import ClientResult
from pfedlora.simulation.store import SavedFiles, StateFiles
from pfedlora.stopping import exit_with_parent, leave_stops_to_parent
from pfedlora.tasks import TASKS

logger = logging.getLogger(__name__)

T = TypeVar("T")
STARTING = "start"


class WorkerError(PfedloraError):
    """A worker process died or failed; the run stops (its last checkpoint is intact)."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def owner(client_id: int, workers: int) -> int:
    """The worker that holds client ``client_id``."""
    return client_id % workers


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    connection: Connection


def balance(owners: Mapping[int, int], work: Mapping[int, float], workers: int) -> dict[int, tuple[int, int]]:
    """The moves ``{client: (from, to)}`` that even out the ``work`` of one round between ``workers``.

    Greedy and deterministic: while moving one client from the busiest worker to the idlest lowers the
    busiest worker's load, move the one that leaves the two closest to even.
    """
    where = {cid: owners[cid] for cid in work}
    moves: dict[int, tuple[int, int]] = {}
    while True:
        load = [0.0] * workers
        for cid, cost in work.items():
            load[where[cid]] += cost
        busiest = max(range(workers), key=lambda w: (load[w], -w))
        idlest = min(range(workers), key=lambda w: (load[w], w))
        gap = load[busiest] - load[idlest]
        candidates = [cid for cid in sorted(work) if where[cid] == busiest and 0 < work[cid] < gap]
        if not candidates:
            return moves
        chosen = min(candidates, key=lambda cid: abs(gap - 2 * work[cid]))
        source = moves.get(chosen, (busiest, busiest))[0]
        where[chosen] = idlest
        moves[chosen] = (source, idlest)
        if source == idlest:
            del moves[chosen]


class WorkerPool:
    """A :class:`~pfedlora.simulation.loop.ClientPool` whose clients live in ``workers`` processes.

    Use it as a context manager (or call :meth:`close`): the workers stop when it closes.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        dataset: Dataset,
        workers: int,
        threads: int = 1,
        store_folder: Path | None = None,
    ) -> None:
        """``store_folder``: where the workers' client stores spill over (a temporary folder, removed on
        :meth:`close`, when None); each worker gets ``1/workers`` of the memory budget
        ``federation.client_memory_mb``."""
        if workers < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {workers}")
        self.config = config
        self.declared = client_counts(config, dataset)
        # A fork server that has imported torch and pfedlora once forks every worker: starting one costs
        # milliseconds instead of the seconds of a fresh interpreter, and nothing forks a process whose
        # OpenMP threads are running.
        context = torch_mp.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        shared = dataset.share_memory()
        self.scratch = None if store_folder else tempfile.TemporaryDirectory(prefix="pfedlora-clients-")
        store_folder = Path(self.scratch.name) if self.scratch else store_folder
        num_clients = config.federation.num_clients
        self.owners = {cid: owner(cid, workers) for cid in range(num_clients)}
        self.flops_per_sample: dict[str, float] = {}  # measured per architecture, for balancing
        self.workers: list[_Worker] = []
        # Each worker ends itself when this pipe closes: when the pool closes, or this process dies.
        alive, self._alive = context.Pipe(duplex=False)
        try:
            for index in range(workers):
                clients = [c for c in range(num_clients) if self.owners[c] == index]
                here, there = context.Pipe()
                process = context.Process(
                    target=_serve,
                    args=(there, alive, config, shared, clients, threads, store_folder, 1 / workers),
                    name=f"pfedlora-worker-{index}",
                    daemon=True,
                )
                process.start()
                there.close()
                self.workers.append(_Worker(index, process, here))
            alive.close()
            for worker in self.workers:
                self._receive(worker, STARTING)
        except BaseException:
            self.close(now=True)
            raise

    # --- the ClientPool protocol ---------------------------------------------------------------------

    def declared_examples(self) -> Mapping[int, int]:
        return self.declared

    def train(
        self, server_round: int, messages: Mapping[int, State], dropping: Set[int]
    ) -> dict[int, ClientResult]:
        during = f"round {server_round}"
        self._rebalance([cid for cid in messages if cid not in dropping], during)
        busy = []
        for worker in self.workers:
            share = self._share(worker, messages)
            if share:
                self._send(worker, during, "train", server_round, share, set(dropping) & set(share))
                busy.append(worker)
        results: dict[int, ClientResult] = {}
        for worker in busy:
            results.update(self._receive(worker, during))
        for cid, result in results.items():
            if result.train_samples:
                arch = self.config.architecture_of(cid)
                self.flops_per_sample[arch] = result.train_flops / result.train_samples
        return {cid: results[cid] for cid in messages if cid in results}

    def _rebalance(self, training: list[int], during: str) -> None:
        """Move private states between workers so that the clients in ``training`` split their work evenly."""
        work = {
            cid: self.declared[cid] * self.flops_per_sample.get(self.config.architecture_of(cid), 1.0)
            for cid in training
        }
        moves = balance(self.owners, work, len(self.workers))
        if not moves:
            return
        states: dict[int, State] = {}
        for source in sorted({source for source, _ in moves.values()}):
            leaving = sorted(cid for cid, (src, _) in moves.items() if src == source)
            self._send(self.workers[source], during, "release", leaving)
            states.update(self._receive(self.workers[source], during))
        for target in sorted({target for _, target in moves.values()}):
            arriving = {cid: states[cid] for cid, (_, dst) in moves.items() if dst == target}
            self._send(self.workers[target], during, "adopt", arriving)
        for target in sorted({target for _, target in moves.values()}):
            self._receive(self.workers[target], during)
        for cid, (_, target) in moves.items():
            self.owners[cid] = target

    def evaluate(
        self, server_round: int, global_state: State | None = None, client_ids: Sequence[int] | None = None
    ) -> AccuracyReport:
        state = None if global_state is None else _cpu(global_state)
        during = f"the evaluation after round {server_round}"
        counts = self._ask_all(during, "evaluate", server_round, state, client_ids)
        everyone = self.config.federation.num_clients
        generative = TASKS[self.config.data.task].generative
        return AccuracyReport.from_counts(
            counts, everyone if client_ids is None else client_ids, losses=generative
        )

    def peak_memory(self) -> list[int]:
        """Each worker's peak resident memory so far, in bytes (pages of the shared dataset included)."""
        return [self._ask(worker, "a memory query", "peak_memory") for worker in self.workers]

    # --- checkpoints -----------------------------------------------------------------------------------

    def state_dicts(self, client_ids: Set[int]) -> dict[int, State]:
        """The private states of ``client_ids``, on the CPU."""
        asked = []
        for worker in self.workers:
            share = [cid for cid in sorted(client_ids) if self.owners[cid] == worker.index]
            if share:
                self._send(worker, "a checkpoint", "state_dicts", share)
                asked.append(worker)
        states: dict[int, State] = {}
        for worker in asked:
            states.update(self._receive(worker, "a checkpoint"))
        return states

    def save_states(self, client_ids: Set[int], folder: Path, server_round: int) -> SavedFiles:
        """Each worker writes the states of its clients among ``client_ids`` into ``folder``."""
        return self._ask_all("a checkpoint", "save_states", client_ids, folder, server_round)

    def restore_states(self, files: StateFiles) -> None:
        """Each worker takes the states of its clients among ``files`` from those files (resuming)."""
        for worker in self.workers:
            self._send(worker, "restoring a checkpoint", "restore_states", self._share(worker, files))
        for worker in self.workers:
            self._receive(worker, "restoring a checkpoint")

    def store_figures(self) -> list[dict[str, int]]:
        """Each worker's client store: bytes in memory, bytes on disk, states written to disk so far."""
        return [self._ask(worker, "a store query", "store_figures") for worker in self.workers]

    def _ask(self, worker: _Worker, during: str, command: str, *args: Any) -> Any:
        self._send(worker, during, command, *args)
        return self._receive(worker, during)

    def _ask_all(self, during: str, command: str, *args: Any) -> dict[Any, Any]:
        """Send ``command`` to every worker, then merge their replies (dictionaries)."""
        for worker in self.workers:
            self._send(worker, during, command, *args)
        merged: dict[Any, Any] = {}
        for worker in self.workers:
            merged.update(self._receive(worker, during))
        return merged

    # --- plumbing --------------------------------------------------------------------------------------

    def _share(self, worker: _Worker, per_client: Mapping[int, T]) -> dict[int, T]:
        """The entries of ``per_client`` that belong to ``worker``'s clients."""
        return {cid: value for cid, value in per_client.items() if self.owners[cid] == worker.index}

    def _send(self, worker: _Worker, during: str, command: str, *args: Any) -> None:
        """Send ``command``; a worker found dead is reported as dying ``during`` that step."""
        try:
            _send(worker.connection, (command, args))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise self._died(worker, during) from None

    def _receive(self, worker: _Worker, during: str) -> Any:
        ready = wait([worker.connection, worker.process.sentinel])
        if worker.connection not in ready:
            raise self._died(worker, during)
        try:
            status, payload = _receive(worker.connection)
        except (EOFError, ConnectionResetError):
            raise self._died(worker, during) from None
        if status == "invalid":  # the command's input was refused: the caller's own error
            raise ValueError(payload)
        if status == "failed":  # one of pfedlora's own errors (a full disk): the run's, as it is
            raise payload
        if status == "error":
            raise WorkerError(f"worker {worker.index} failed during {during}:\n{payload}")
        return payload

    def _died(self, worker: _Worker, during: str) -> WorkerError:
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        if during == STARTING:
            return WorkerError(
                f"worker {worker.index} {how} while starting. Worker processes import the main module: a "
                'script that starts a run must do so under `if __name__ == "__main__":` (or run its clients '
                "in one process: workers=0, --workers 0)."
            )
        return WorkerError(
            f"worker {worker.index} (clients {_ids(self._clients_of(worker))}) {how} during {during}; "
            "the run stopped. Its last checkpoint is intact: continue it with "
            "`pfedlora run --resume RUN_DIR`."
        )

    def _clients_of(self, worker: _Worker) -> list[int]:
        return [cid for cid, index in sorted(self.owners.items()) if index == worker.index]

    def close(self, now: bool = False) -> None:
        """Stop every worker: politely (each ends once it has answered its last command), then by force;
        ``now``: by force at once (a stop or a failure: whatever a worker is doing is no longer wanted, and
        the run's files are as a crash would leave them)."""
        for worker in self.workers:
            if worker.process.is_alive() and not now:
                with contextlib.suppress(OSError):  # it died meanwhile: nothing to tell it
                    _send(worker.connection, ("stop", ()))
        if not now:
            for worker in self.workers:
                worker.process.join(timeout=10)
        self._alive.close()  # every worker still running ends itself now
        for worker in self.workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.connection.close()
        self.workers = []
        if self.scratch is not None:
            self.scratch.cleanup()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close(now=kind is not None)


def _ids(clients: list[int]) -> str:
    shown = ", ".join(map(str, clients[:6]))
    return f"{shown}, … ({len(clients)} in all)" if len(clients) > 6 else shown


def _serve(
    connection: Connection,
    alive: Connection,
    config: ExperimentConfig,
    dataset: Dataset,
    clients: list[int],
    threads: int,
    store_folder: Path | None,
    memory_share: float,
) -> None:
    """A worker's main loop: set up the owned clients, then answer commands until told to stop (signals are
    its parent's to handle: the pool stops its workers when the run stops)."""
    leave_stops_to_parent()
    exit_with_parent(alive)
    torch.set_num_threads(threads)
    try:
        federation = build_federation(
            config, dataset, client_ids=clients, memory_share=memory_share, store_folder=store_folder
        )
        store = federation.client_states
        pool = LocalClients(federation, FlopMeter())
        _reply(connection, "ok", None)
    except BaseException:
        _reply(connection, "error", traceback.format_exc())
        return
    while True:
        try:
            command, args = _receive(connection)
        except (EOFError, OSError):  # the parent is gone
            return
        if command == "stop":
            return
        try:
            if command == "train":
                reply: Any = pool.train(*args)
            elif command == "evaluate":
                reply = pool.evaluate_counts(*args)
            elif command == "state_dicts":
                reply = {cid: _cpu(store.state_dict(cid)) for cid in args[0]}
            elif command == "peak_memory":
                reply = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
            elif command == "release":  # hand these clients over to another worker
                reply = {cid: _cpu(store.release(cid)) for cid in args[0]}
            elif command == "adopt":  # take these clients over from another worker
                for cid, state in args[0].items():
                    store.adopt(cid, state)
                reply = None
            elif command == "save_states":
                reply = pool.save_states(*args)
            elif command == "restore_states":
                try:
                    pool.restore_states(*args)
                except ValueError as error:
                    _reply(connection, "invalid", str(error))
                    continue
                reply = None
            elif command == "store_figures":
                reply = store.figures()
            else:
                raise ValueError(f"unknown command {command!r}")
        except PfedloraError as error:
            _reply(connection, "failed", error)
            continue
        except Exception:
            _reply(connection, "error", traceback.format_exc())
            continue
        _reply(connection, "ok", reply)


def _reply(connection: Connection, status: str, payload: Any) -> None:
    """Answer the parent; where it has gone (it stopped, it died), end quietly instead."""
    try:
        _send(connection, (status, payload))
    except (BrokenPipeError, ConnectionResetError, EOFError):
        os._exit(0)


def _send(connection: Connection, message: tuple[Any, ...]) -> None:
    """Send ``message`` as plain pickled bytes: tensors travel as copies, not as shared-memory handles (which
    multiprocessing passes through a helper thread that a stop could interrupt mid-transfer, and which
    cost a shared-memory segment per tensor)."""
    connection.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(connection: Connection) -> Any:
    return pickle.loads(connection.recv_bytes())


def _cpu(state: Mapping[str, torch.Tensor]) -> State:
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}
