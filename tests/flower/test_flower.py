"""The Flower path against the simulator, in process: same configuration and seed, same metrics."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from safetensors.torch import load_file

from pfedlora.algorithms import Upload
from pfedlora.errors import ConfigError
from pfedlora.flower import node as node_module
from pfedlora.flower.apps import client_app
from pfedlora.flower.node import Node, NodeSettings
from pfedlora.flower.records import METRICS, TENSORS
from pfedlora.flower.server import FederationError, run_server
from pfedlora.simulation import TIMING_KEYS, read_run, run_experiment
from pfedlora.simulation.loop import ClientResult

from .harness import InProcessGrid, ServerDied

SETTING = ("federation.num_clients=4", "federation.sample_fraction=0.5", "federation.rounds=3")


@pytest.fixture
def tiny_nodes(monkeypatch, tiny_dataset):
    monkeypatch.setattr(node_module, "load_dataset", lambda *args, **kwargs: tiny_dataset)
    node_module.release_memory()
    yield
    node_module.release_memory()


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _nodes(config, state_dir, **extra):
    return [
        {
            "partition-id": i,
            "num-partitions": config.federation.num_clients,
            "arch": config.architecture_of(i),
            "state-dir": str(state_dir),
            **extra,
        }
        for i in range(config.federation.num_clients)
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        ("algorithm=pfedlora", "adapter.placement=branch"),
        ("algorithm=pfedlora", "adapter.placement=layers", "federation.drop_rate=0.3"),
        ("algorithm=fedapen",),
        ("algorithm=fedproto",),
        ("algorithm=fedgh", "federation.evaluate=after-download", "federation.eval_sample=2"),
        ("algorithm=lg-fedavg", "privacy.clip_norm=0.5", "privacy.noise_multiplier=0.1"),
    ],
)
def test_flower_run_equals_the_simulated_run(tmp_path, tiny_dataset, tiny_config, tiny_nodes, overrides):
    config = tiny_config(*SETTING, *overrides)
    run_experiment(config, tmp_path / "simulated", dataset=tiny_dataset)
    grid = InProcessGrid(client_app, _nodes(config, tmp_path / "state"))
    run_server(grid, config, tmp_path / "flower", experiment="t")
    simulated, flower = read_run(tmp_path / "simulated"), read_run(tmp_path / "flower")
    assert _strip(flower[0]) == _strip(simulated[0])
    strip = lambda s: {k: v for k, v in s.items() if k not in TIMING_KEYS}  # noqa: E731
    assert strip(flower[1]) == strip(simulated[1])
    # Private state lives in one checkpoint per client and round trained (a restarted server may replay
    # every round since its last checkpoint, none here yet); only shared tensors were sent.
    trained = {(c["client_id"], r["round"]) for r in flower[0] for c in r["clients"]}
    assert {p.name for p in (tmp_path / "state" / "t").iterdir()} == {
        f"client-{c}-r{r}.safetensors" for c, r in trained
    }


def test_messages_in_flight_are_bounded_and_change_nothing(tmp_path, tiny_dataset, tiny_config, tiny_nodes):
    config = tiny_config(*SETTING)
    run_experiment(config, tmp_path / "simulated", dataset=tiny_dataset)
    grid = InProcessGrid(client_app, _nodes(config, tmp_path / "state"))
    run_server(grid, config, tmp_path / "flower", experiment="t", in_flight=3)
    assert max(grid.batches) == 3 and grid.batches[0] == 3 and grid.batches[1] == 1  # 4 nodes identified
    assert _strip(read_run(tmp_path / "flower")[0]) == _strip(read_run(tmp_path / "simulated")[0])


def test_bad_updates_are_refused_on_flower_too(tmp_path, tiny_config, tiny_nodes, monkeypatch):
    config = tiny_config(*SETTING)
    original = Node.train

    def poisoned(self, message, server_round):
        result = original(self, message, server_round)
        if self.client_id == 1:
            tensors = {k: torch.full_like(v, float("inf")) for k, v in result.upload.tensors.items()}
            return ClientResult(Upload(tensors, result.upload.num_examples), result.train_flops, 1)
        return result

    monkeypatch.setattr(Node, "train", poisoned)
    run_server(InProcessGrid(client_app, _nodes(config, tmp_path / "state")), config, tmp_path / "run", "t")
    records, _ = read_run(tmp_path / "run")
    refused = [r for record in records for r in record["refused"]]
    sampled_1 = [record["round"] for record in records if 1 in record["sampled"]]
    assert sampled_1 and len(refused) == len(sampled_1)
    assert all(r["client_id"] == 1 and "NaN or Inf" in r["reason"] for r in refused)


def _malformed(message, reply):
    """Node 1001 replies to training without metrics, node 1002 without tensors, node 1003 with a fractional
    sample count; node 1001 claims 1000 correct of 10 evaluated, node 1002 a total it never declared."""
    node, kind = message.metadata.dst_node_id, message.metadata.message_type
    if reply.has_error() or node not in (1001, 1002, 1003):
        return reply
    content = reply.content
    if kind == MessageType.TRAIN:
        tensors, metrics = content.array_records[TENSORS], content.metric_records[METRICS]
        records = {
            1001: {TENSORS: tensors},
            1002: {METRICS: metrics},
            1003: {TENSORS: tensors, METRICS: MetricRecord({**metrics, "train-samples": 2.5})},
        }[node]
        return Message(RecordDict(records), reply_to=message)
    if kind == MessageType.EVALUATE and node in (1001, 1002):
        counts = {1001: (1000, 10), 1002: (1, content.metric_records[METRICS]["total"] + 1)}[node]
        correct, total = counts
        return Message(
            RecordDict({METRICS: MetricRecord({"correct": correct, "total": total})}), reply_to=message
        )
    return reply


def test_malformed_replies_are_refused_and_the_run_goes_on(tmp_path, tiny_config, tiny_nodes, caplog):
    config = tiny_config(*SETTING, "federation.sample_fraction=1")
    grid = InProcessGrid(client_app, _nodes(config, tmp_path / "state"), tamper=_malformed)
    run_server(grid, config, tmp_path / "run", "t")
    records, _ = read_run(tmp_path / "run")
    for record in records:
        reasons = {r["client_id"]: r["reason"] for r in record["refused"]}
        assert set(reasons) == {1, 2, 3} and record["aggregated"] == [0]
        assert "lacks 'metrics'" in reasons[1] and "lacks 'tensors'" in reasons[2]
        assert "train-samples is 2.5, not a whole number" in reasons[3]
        assert all(reason.startswith("malformed reply from node") for reason in reasons.values())
        accuracies = record["client_accuracies"]
        assert accuracies[1] is None and accuracies[2] is None and record["clients_without_eval_samples"] == 2
        assert record["mean_accuracy"] == pytest.approx((accuracies[0] + accuracies[3]) / 2)
    assert "correct = 1000 of total = 10 is impossible" in caplog.text
    assert "but the client declared" in caplog.text


@pytest.mark.parametrize("die_on_call", [7, 10], ids=["round-3-eval", "round-5-train"])
def test_a_restarted_server_continues_to_the_uninterrupted_metrics(
    tmp_path, tiny_config, tiny_nodes, die_on_call
):
    # Exchanges: 1 discovery, then a train and an evaluation per round (round r: 2r and 2r + 1).
    config = tiny_config(*SETTING, "federation.rounds=6", "federation.checkpoint_every=2")
    nodes = _nodes(config, tmp_path / "state")
    run_server(
        InProcessGrid(client_app, _nodes(config, tmp_path / "state-ref")), config, tmp_path / "ref", "t"
    )
    with pytest.raises(ServerDied):
        run_server(InProcessGrid(client_app, nodes, die_on_call=die_on_call), config, tmp_path / "run", "t")
    assert not (tmp_path / "run" / "summary.json").exists()
    edited = tiny_config(*SETTING, "federation.rounds=6", "federation.checkpoint_every=2", "train.lr=0.5")
    with pytest.raises(ConfigError, match=r"train\.lr 0\.05 -> 0\.5"):
        run_server(InProcessGrid(client_app, nodes), edited, tmp_path / "run", "t", resume=True)
    run_server(InProcessGrid(client_app, nodes), config, tmp_path / "run", "t", resume=True)
    resumed, reference = read_run(tmp_path / "run"), read_run(tmp_path / "ref")
    assert _strip(resumed[0]) == _strip(reference[0])
    assert [r["round"] for r in resumed[0]] == list(range(1, 7))
    # Every client ends bit for bit as in the uninterrupted run (the tiny task's accuracies saturate).
    finals = {}
    for folder in ("state", "state-ref"):
        files = sorted((tmp_path / folder / "t").iterdir(), key=lambda p: int(p.stem.rsplit("-r", 1)[1]))
        finals[folder] = {p.name.rsplit("-r", 1)[0]: load_file(str(p)) for p in files}  # the newest wins
    assert finals["state"].keys() == finals["state-ref"].keys()
    for client, state in finals["state"].items():
        assert all(torch.equal(v, finals["state-ref"][client][k]) for k, v in state.items()), client


def test_a_missing_or_duplicate_client_is_named(tmp_path, tiny_config, tiny_nodes):
    config = tiny_config(*SETTING)
    nodes = _nodes(config, tmp_path)
    with pytest.raises(FederationError, match=r"client ids \[3\]"):
        run_server(InProcessGrid(client_app, nodes[:3]), config, tmp_path / "a", "t")
    with pytest.raises(FederationError, match="two nodes claim client id 0"):
        run_server(InProcessGrid(client_app, [*nodes, nodes[0]]), config, tmp_path / "b", "t")


def test_node_settings_are_checked(tmp_path):
    settings = NodeSettings.from_node_config({"partition-id": 2, "num-partitions": 5, "arch": "cnn3"})
    assert (settings.client_id, settings.num_clients, settings.arch) == (2, 5, "cnn3")
    with pytest.raises(Exception, match="partition-id"):
        NodeSettings.from_node_config({"arch": "cnn1"})
    with pytest.raises(Exception, match="cnn9"):
        NodeSettings.from_node_config({"partition-id": 0, "arch": "cnn9"})


STOP_TARGET = Path(__file__).with_name("stop_target.py")


def _server(*args):
    return subprocess.Popen(
        [sys.executable, str(STOP_TARGET), *map(str, args)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_server_app_stops_in_one_line_and_its_resume_equals_the_uninterrupted_run(
    tmp_path, signum, status
):
    marker = tmp_path / "paused"
    server = _server(tmp_path / "run", tmp_path / "state", marker)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the server never reached round 3"
            time.sleep(0.05)
        signalled = time.monotonic()
        server.send_signal(signum)
        _, stderr = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == status, stderr
    assert time.monotonic() - signalled < 6
    assert "Traceback" not in stderr, stderr
    name = "SIGINT (Ctrl-C)" if signum == signal.SIGINT else "SIGTERM"
    assert [line for line in stderr.splitlines() if line.strip()] == [
        f"pfedlora on Flower: stopped by {name} in round 3 of 6 (last checkpoint: round 2); start it again "
        "with `resume = true` in the run config (same out-dir)"
    ]
    resumed = _server(tmp_path / "run", tmp_path / "state")
    reference = _server(tmp_path / "ref", tmp_path / "state-ref")
    for process in (resumed, reference):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    assert _strip(read_run(tmp_path / "run")[0]) == _strip(read_run(tmp_path / "ref")[0])
