"""The client store: private states created when first needed, kept in memory up to a budget, beyond it on
disk; the same metrics whatever the budget, the workers or an interruption."""

import json
import os
import tempfile

import pytest
import torch

from pfedlora.algorithms import create_algorithm
from pfedlora.errors import ConfigError
from pfedlora.simulation import (
    TIMING_KEYS,
    build_federation,
    read_run,
    resume_run,
    run_experiment,
    run_federation,
)
from pfedlora.simulation.checkpoint import CHECKPOINT_DIR, file_digest
from pfedlora.simulation.experiment import STORE_DIR
from pfedlora.simulation.federation import create_client_state, initial_global_state
from pfedlora.simulation.loop import Server, run_rounds
from pfedlora.simulation.results import save_atomic
from pfedlora.simulation.store import state_bytes
from pfedlora.simulation.workers import WorkerPool
from tests.simulation.test_checkpoint import CRASH

TINY_BUDGET = "federation.client_memory_mb=0.001"  # about 1 KB: every state but the one in use spills


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _equal(left, right):
    return left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)


def test_states_are_created_when_first_needed_as_they_would_be_up_front(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config(), tiny_dataset)
    store, device = federation.client_states, torch.device("cpu")
    assert len(store) == 5 and not store.resident  # nothing created yet
    for cid in (3, 0, 4):
        up_front = create_client_state(federation.algorithm, cid, device).state_dict()
        assert _equal(store[cid].state_dict(), up_front)
    assert list(store.resident) == [3, 0, 4]

    lazy = run_federation(build_federation(tiny_config(), tiny_dataset))
    eager = build_federation(tiny_config(), tiny_dataset)
    for cid in range(5):  # every state created before round 1, in order, as pfedlora used to
        eager.client_states[cid]
    assert _strip(lazy) == _strip(run_federation(eager))


def test_a_small_budget_spills_states_to_disk_and_changes_no_metric(tmp_path, tiny_dataset, tiny_config):
    reference = run_federation(build_federation(tiny_config(), tiny_dataset))
    federation = build_federation(tiny_config(TINY_BUDGET), tiny_dataset, store_folder=tmp_path / "store")
    records = run_federation(federation)
    store = federation.client_states
    assert _strip(records) == _strip(reference)
    assert store.writes > 0 and len(store.resident) == 1  # only the state in use stays in memory
    assert all(p.grad is None for p in store[records[-1]["sampled"][-1]].parameters())  # gradients dropped
    assert store.bytes_in_memory() == state_bytes(next(iter(store.resident.values())))
    files = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert files == sorted(f"client-{cid}.safetensors" for cid in store.on_disk) and store.bytes_on_disk() > 0


def test_scoring_reads_a_state_without_keeping_it(tmp_path, tiny_dataset, tiny_config):
    store = build_federation(tiny_config(), tiny_dataset, store_folder=tmp_path).client_states
    viewed = store.view(2)
    assert 2 not in store.resident and _equal(viewed.state_dict(), store.state_dict(2))
    with pytest.raises(KeyError, match="client 9 is not held here"):
        store.view(9)


def test_a_client_moves_between_stores_whole(tmp_path, tiny_dataset, tiny_config):
    config = tiny_config(TINY_BUDGET)
    home = build_federation(config, tiny_dataset, client_ids=[0, 1], store_folder=tmp_path / "a")
    away = build_federation(config, tiny_dataset, client_ids=[2], store_folder=tmp_path / "b")
    with torch.no_grad():
        for tensor in home.client_states[0].parameters():
            tensor.add_(1.0)
    home.client_states[1]  # evicts client 0 to disk
    assert 0 in home.client_states.on_disk
    expected = home.client_states.state_dict(0)
    away.client_states.adopt(0, home.client_states.release(0))
    assert 0 not in home.client_states and not (tmp_path / "a" / "client-0.safetensors").exists()
    assert _equal(away.client_states[0].state_dict(), expected)


def test_a_checkpoint_links_the_files_already_on_disk(tmp_path, tiny_dataset, tiny_config):
    store = build_federation(
        tiny_config(TINY_BUDGET), tiny_dataset, store_folder=tmp_path / "s"
    ).client_states
    store[0], store[1]  # client 0 spills to disk
    digest = store.save(0, tmp_path / "checkpoint-0.safetensors")
    assert (
        os.stat(tmp_path / "checkpoint-0.safetensors").st_ino
        == os.stat(tmp_path / "s/client-0.safetensors").st_ino
    )
    assert digest == file_digest(tmp_path / "checkpoint-0.safetensors")
    store[0]  # back in memory: the store's file goes, the checkpoint's bytes stay
    assert not (tmp_path / "s/client-0.safetensors").exists()
    assert file_digest(tmp_path / "checkpoint-0.safetensors") == digest


@pytest.mark.parametrize("workers", [0, 2])
def test_spilled_runs_resume_to_the_uninterrupted_metrics(tmp_path, tiny_dataset, tiny_config, workers):
    config = tiny_config(*CRASH, TINY_BUDGET)
    run_experiment(tiny_config(*CRASH), tmp_path / "reference", dataset=tiny_dataset, workers=0)
    run_experiment(config, tmp_path / "run", dataset=tiny_dataset, workers=workers)
    assert not (tmp_path / "run" / STORE_DIR).exists()  # the store is a working folder, removed at the end
    assert _strip(read_run(tmp_path / "run")[0]) == _strip(read_run(tmp_path / "reference")[0])

    (tmp_path / "run" / "summary.json").unlink()  # as if it had stopped after its last checkpoint
    (tmp_path / "run" / STORE_DIR).mkdir()
    (tmp_path / "run" / STORE_DIR / "client-0.safetensors").write_bytes(b"left by the crash")
    resume_run(tmp_path / "run", dataset=tiny_dataset, workers=workers)
    assert _strip(read_run(tmp_path / "run")[0]) == _strip(read_run(tmp_path / "reference")[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_refuses_a_client_file_of_another_architecture(tmp_path, tiny_dataset, tiny_config, workers):
    run_dir = tmp_path / "run"
    run_experiment(tiny_config(*CRASH), run_dir, dataset=tiny_dataset, workers=0)
    (run_dir / "summary.json").unlink()
    folder = run_dir / CHECKPOINT_DIR
    manifest = json.loads((folder / "manifest.json").read_text())
    federation = build_federation(tiny_config(*CRASH), tiny_dataset)
    forged = folder / manifest["clients"]["0"]
    # client 1 runs another architecture; the digest is updated too: a consistent forgery
    manifest["sha256"][forged.name] = save_atomic(federation.client_states.state_dict(1), forged)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"cannot be loaded: .*does not hold client 0's state \(cnn1\)"):
        resume_run(run_dir, dataset=tiny_dataset, workers=workers)


def test_without_a_run_directory_the_workers_spill_to_a_folder_removed_at_the_end(
    tmp_path, tiny_dataset, tiny_config, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = tiny_config(TINY_BUDGET)
    algorithm = create_algorithm(config, tiny_dataset.input_shape, tiny_dataset.num_classes)
    server = Server(config, algorithm, initial_global_state(algorithm, torch.device("cpu")))
    with WorkerPool(config, tiny_dataset, workers=2) as pool:
        run_rounds(server, pool)
        assert sum(figures["writes"] for figures in pool.store_figures()) > 0
        assert len(list(tmp_path.glob("pfedlora-clients-*/client-*.safetensors"))) > 0
    assert not list(tmp_path.glob("pfedlora-clients-*"))
