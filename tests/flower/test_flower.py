"""The Flower path against the simulator, in process: same configuration and seed, same metrics."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
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
from tests.conftest import TINY_OVERRIDES

from .harness import InProcessGrid, ServerDied

SETTING = ("federation.num_clients=4", "federation.sample_fraction=0.5", "federation.rounds=3")


@pytest.fixture
def tiny_nodes(monkeypatch, tiny_dataset):
    monkeypatch.setattr(node_module, "load_run_dataset", lambda *args, **kwargs: tiny_dataset)
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
        ("algorithm=fd",),
        ("algorithm=fedtgp", "fedtgp.server_epochs=3"),
        ("algorithm=fedgen", "fedgen.server_steps=3"),
        ("algorithm=fedssa",),
        ("algorithm=pfedes",),
        ("algorithm=pfedafm",),
        ("algorithm=fedmrl",),
        ("algorithm=pfedmoe",),
        ("algorithm=fedl2g-feat",),
        ("algorithm=fedl2g-logit", "fedl2g-logit.warm_up_rounds=1"),
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
        assert accuracies[1] is None and accuracies[2] is None
        # refused evaluations are clients that gave none, not clients without samples
        assert record["clients_unanswered"] == 2 and record["clients_without_eval_samples"] == 0
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


def test_a_missing_client_is_named_and_a_second_claimant_refused_while_the_run_goes_on(
    tmp_path, tiny_config, tiny_nodes, caplog
):
    config = tiny_config(*SETTING)
    nodes = _nodes(config, tmp_path)
    with pytest.raises(FederationError, match=r"client ids \[3\]"):
        run_server(InProcessGrid(client_app, nodes[:3]), config, tmp_path / "a", "t")
    grid = InProcessGrid(client_app, [*nodes, nodes[0]])  # node 1004 claims client 0, as node 1000 did
    run_server(grid, config, tmp_path / "b", "t")
    assert "node 1004 claims client id 0, which node 1000 claimed first: node 1004 is refused" in caplog.text
    assert (tmp_path / "b" / "summary.json").is_file()
    asked_later = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type != MessageType.QUERY}
    assert asked_later == {1000, 1001, 1002, 1003}


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


def test_a_hung_node_costs_one_timeout_then_is_left_alone_and_probed_again(
    tmp_path, tiny_config, tiny_nodes, caplog
):
    config = tiny_config(*SETTING, "federation.sample_fraction=1", "federation.rounds=8")
    hung = lambda message: message.metadata.dst_node_id == 1002 and message.metadata.message_type != "query"  # noqa: E731
    grid = InProcessGrid(client_app, _nodes(config, tmp_path / "state"), hung=hung)
    run_server(grid, config, tmp_path / "run", "t", timeout=30.0, quiet_rounds=2)
    to_hung = [(m.metadata.message_type, int(m.metadata.group_id)) for m in grid.sent if hung(m)]
    assert to_hung == [("train", 1), ("train", 4), ("train", 7)]  # 3 timeouts in 8 rounds, not 16
    assert grid.timeouts == 3
    assert all(m.metadata.ttl == 30.0 for m in grid.sent if m.metadata.message_type != "query")
    records, _ = read_run(tmp_path / "run")
    assert all(record["dropped"] == [2] for record in records)
    assert all(r["clients_unanswered"] == 1 and r["clients_without_eval_samples"] == 0 for r in records)
    assert (
        "client 2 (node 1002) did not answer the training within 30 s: it is not asked again before round 4"
        in caplog.text
    )
    assert "no test samples" not in caplog.text


def test_a_node_that_answers_again_is_asked_again(tmp_path, tiny_config, tiny_nodes):
    config = tiny_config(*SETTING, "federation.sample_fraction=1", "federation.rounds=5")
    hung = lambda message: message.metadata.dst_node_id == 1002 and message.metadata.group_id == "1"  # noqa: E731
    grid = InProcessGrid(client_app, _nodes(config, tmp_path / "state"), hung=hung)
    run_server(grid, config, tmp_path / "run", "t", quiet_rounds=1)
    rounds = sorted(
        {
            int(m.metadata.group_id)
            for m in grid.sent
            if m.metadata.dst_node_id == 1002 and m.metadata.message_type == "train"
        }
    )
    assert rounds == [1, 3, 4, 5]  # silent in round 1, left alone in round 2, heard from round 3 on
    records, _ = read_run(tmp_path / "run")
    assert [r["dropped"] for r in records] == [[2], [2], [], [], []]


def test_an_oversized_upload_is_refused_before_it_is_turned_into_tensors(
    tmp_path, tiny_config, tiny_nodes, monkeypatch
):
    config = tiny_config(*SETTING, "federation.sample_fraction=1", "federation.rounds=1")

    def inflate(message, reply):
        if message.metadata.dst_node_id != 1001 or message.metadata.message_type != MessageType.TRAIN:
            return reply
        tensors = reply.content.array_records[TENSORS]
        key = next(iter(tensors))
        big = ArrayRecord({**tensors.to_torch_state_dict(), key: torch.zeros(4_000_000)})  # 16 MB
        return Message(
            RecordDict({TENSORS: big, METRICS: reply.content.metric_records[METRICS]}), reply_to=message
        )

    converted = []
    original = ArrayRecord.to_torch_state_dict
    monkeypatch.setattr(
        ArrayRecord,
        "to_torch_state_dict",
        lambda self, **kw: converted.append(self.count_bytes()) or original(self, **kw),
    )
    grid = InProcessGrid(client_app, _nodes(config, tmp_path / "state"), tamper=inflate)
    run_server(grid, config, tmp_path / "run", "t")
    [record] = read_run(tmp_path / "run")[0]
    [refused] = record["refused"]
    assert refused["client_id"] == 1
    assert re.fullmatch(
        r"oversized upload from node 1001: the upload holds 6 arrays of 16,0\d\d,\d{3} bytes, more than the "
        r"algorithm's uploads can \(6 arrays, [\d,]+ bytes\); refused unread",
        refused["reason"],
    ), refused["reason"]
    assert sorted(record["aggregated"]) == [0, 2, 3]
    assert max(converted) < 1_000_000  # the 16 MB record was never converted


def test_a_failing_server_app_says_so_in_one_line_and_raises(tmp_path, tiny_config, tiny_nodes, caplog):
    from flwr.app import Context

    from pfedlora.flower.apps import serve

    config = tiny_config(*SETTING)
    grid = InProcessGrid(client_app, _nodes(config, tmp_path / "state")[:3])
    run_config = {
        "overrides": " ".join(f"{k}" for k in [*TINY_OVERRIDES, *SETTING]),
        "out-dir": str(tmp_path / "run"),
    }
    with pytest.raises(FederationError):  # Flower's runner then ends the process with status 1
        serve(grid, Context(1, 0, {}, RecordDict(), run_config))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        "pfedlora on Flower: error: 1 of 4 clients were identified by no node (client ids [3]); start one "
        "SuperNode per client with node config partition-id=<id>"
    ]


def test_a_client_app_process_that_outlives_its_time_limit_ends_itself(tmp_path):
    script = (
        "import sys, time\n"
        "sys.argv[0] = '/usr/bin/flwr-clientapp'\n"
        "from flwr.app import ConfigRecord, Message, RecordDict\n"
        "from flwr.supercore.task_identity import TaskIdentity\n"
        "TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1\n"
        "from pfedlora.flower import apps\n"
        "message = Message(RecordDict({'settings': ConfigRecord({'time-limit': 1.0})}), 5, 'train')\n"
        "with apps._time_limit(message):\n"
        "    time.sleep(60)  # a hung training\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 124, done.stderr
    assert time.monotonic() - started < 20
    assert "no reply within 1 s, the server stopped waiting: exiting" in done.stderr
