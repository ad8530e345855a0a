"""The pool of worker processes: the same metrics for any number of workers, and a worker that dies."""

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pfedlora.algorithms import ALGORITHMS
from pfedlora.errors import PfedloraError
from pfedlora.metrics import FlopMeter
from pfedlora.simulation import TIMING_KEYS, build_federation, read_run, resume_run, run_experiment
from pfedlora.simulation.local import LocalClients
from pfedlora.simulation.loop import SERVER_THREADS, broadcast
from pfedlora.simulation.workers import WorkerError, WorkerPool, balance, owner


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.parametrize("algorithm", ["pfedlora", "fedapen"])  # fedapen: private model, shared model, λ
def test_metrics_are_identical_for_one_two_and_three_workers(tmp_path, tiny_dataset, tiny_config, algorithm):
    config = tiny_config(f"algorithm={algorithm}", "federation.checkpoint_every=2")
    runs = {}
    for workers in (1, 2, 3):
        run_experiment(config, tmp_path / str(workers), dataset=tiny_dataset, workers=workers)
        records, summary = read_run(tmp_path / str(workers))
        runs[workers] = (_strip(records), {k: v for k, v in summary.items() if k not in TIMING_KEYS})
    assert runs[1] == runs[2] == runs[3]
    assert len(runs[1][0]) == config.federation.rounds and runs[1][0][-1]["train_flops"] > 0


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_the_server_computes_on_one_thread_whatever_the_runtime(
    request, monkeypatch, tmp_path, tiny_dataset, tiny_config, workers
):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a machine with cores to spare: the server must still use one
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    algorithm = ALGORITHMS["pfedlora"]
    seen: dict[str, set[int]] = {"broadcast": set(), "aggregate": set()}

    def recording(name):
        original = getattr(algorithm, name)

        def method(self, *args, **kwargs):
            seen[name].add(torch.get_num_threads())
            return original(self, *args, **kwargs)

        return method

    for name in seen:
        monkeypatch.setattr(algorithm, name, recording(name))
    run_experiment(tiny_config("federation.rounds=2"), tmp_path, dataset=tiny_dataset, workers=workers)
    assert seen == {"broadcast": {SERVER_THREADS}, "aggregate": {SERVER_THREADS}} and SERVER_THREADS == 1
    assert torch.get_num_threads() == 2  # given back after each round


def test_every_client_has_one_owner():
    assert [owner(c, 3) for c in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_balance_moves_the_fewest_states_that_even_out_a_round():
    owners = {c: owner(c, 2) for c in range(6)}
    assert balance(owners, {0: 1.0, 2: 1.0, 4: 1.0}, 2) == {0: (0, 1)}
    assert balance(owners, {0: 1.0, 2: 1.0, 4: 1.0, 1: 1.0}, 2) == {0: (0, 1)}  # 3 | 1 -> 2 | 2
    assert balance(owners, {0: 1.0, 2: 1.0, 1: 1.0, 3: 1.0}, 2) == {}  # already even
    assert balance(owners, {0: 3.0, 2: 1.0, 4: 1.0, 1: 1.0}, 2) == {0: (0, 1), 1: (1, 0)}  # 5 | 1 -> 3 | 3
    assert balance(owners, {0: 5.0, 1: 1.0}, 2) == {}  # nothing to gain: the big one alone is the floor
    moves = balance({c: owner(c, 3) for c in range(9)}, {0: 1.0, 3: 1.0, 6: 1.0}, 3)
    assert sorted(to for _, to in moves.values()) == [1, 2] and all(src == 0 for src, _ in moves.values())


def test_clients_moved_to_another_worker_train_and_evaluate_exactly_as_at_home(
    request, tiny_dataset, tiny_config
):
    config = tiny_config("algorithm=fedapen")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker: the same kernels, the same bits
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    home = build_federation(config, tiny_dataset)
    local = LocalClients(home, FlopMeter())
    with WorkerPool(config, tiny_dataset, workers=2) as pool:
        for server_round, sampled in enumerate(([0, 2, 4], [0, 4], [1, 2, 3]), start=1):  # all at worker 0
            messages = {cid: broadcast(home, cid, server_round) for cid in sampled}
            there = pool.train(server_round, messages, set())
            here = local.train(server_round, messages, set())
            assert there.keys() == here.keys()
            for cid in sampled:
                assert there[cid].upload.num_examples == here[cid].upload.num_examples
                assert all(
                    there[cid].upload.tensors[key].equal(tensor)
                    for key, tensor in here[cid].upload.tensors.items()
                )
        assert {pool.owners[c] for c in (0, 2, 4)} == {0, 1}  # some of worker 0's clients moved
        states = pool.state_dicts(set(range(5)))
        for cid in range(5):
            assert all(states[cid][k].equal(v) for k, v in home.client_states[cid].state_dict().items())
        assert pool.evaluate(3).per_client == local.evaluate(3).per_client


def _kill_worker_after(server_round, index=0):
    def on_round(record):
        if record["round"] == server_round:
            (victim,) = [p for p in multiprocessing.active_children() if p.name == f"pfedlora-worker-{index}"]
            os.kill(victim.pid, signal.SIGKILL)

    return on_round


def test_a_dead_worker_stops_the_run_with_a_clear_message_and_resume_finishes_it(
    tmp_path, tiny_dataset, tiny_config
):
    config = tiny_config(
        "algorithm=fedapen",
        "federation.rounds=5",
        "federation.checkpoint_every=2",
        "federation.sample_fraction=1.0",
    )
    run_experiment(config, tmp_path / "reference", dataset=tiny_dataset, workers=2)

    crashed = tmp_path / "crashed"
    with pytest.raises(
        WorkerError, match=r"worker 0 \(clients 0(, \d)*\) was killed by signal 9 during round 4"
    ):
        run_experiment(config, crashed, on_round=_kill_worker_after(3), dataset=tiny_dataset, workers=2)
    assert issubclass(WorkerError, PfedloraError)  # the CLI prints it as one line, exit status 2
    assert not (crashed / "summary.json").exists()

    resume_run(crashed, dataset=tiny_dataset, workers=1)  # any number of workers continues it
    (records, summary), (expected, expected_summary) = read_run(crashed), read_run(tmp_path / "reference")
    assert _strip(records) == _strip(expected)
    assert {k: v for k, v in summary.items() if k not in TIMING_KEYS} == {
        k: v for k, v in expected_summary.items() if k not in TIMING_KEYS
    }


def test_a_script_without_main_guard_is_told_what_to_do(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from conftest import make_tiny_dataset, TINY_OVERRIDES\n"
        "from pfedlora.config import load_config\n"
        "from pfedlora.simulation import run_experiment\n"
        "run_experiment(load_config(None, TINY_OVERRIDES), dataset=make_tiny_dataset(), workers=2)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert 'under `if __name__ == "__main__":`' in done.stderr, done.stderr[-2000:]
