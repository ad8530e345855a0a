"""Behaviour every registered algorithm must show, on tiny data, through the one round loop."""

import io
import math

import pytest
import torch

from pfedlora.algorithms import ALGORITHMS as REGISTRY
from pfedlora.algorithms import Upload
from pfedlora.metrics import Channel, FlopMeter, payload_bytes
from pfedlora.simulation import TIMING_KEYS, LocalClients, build_federation, run_federation, run_round
from pfedlora.simulation.rounds import client_update
from pfedlora.simulation.screening import upload_problem

from .helpers import client_context

ALGORITHMS = sorted(name for name, cls in REGISTRY.items() if "classification" in cls.tasks)
"""The algorithms that classify (the language-model ones have their contract in tests/text)."""


def _config(tiny_config, name, *extra):
    archs = ["federation.architectures=cnn5"] if REGISTRY[name].one_architecture else []
    return tiny_config(f"algorithm={name}", *archs, *extra)


class RecordingChannel(Channel):
    """A channel that also keeps every payload it carried."""

    def __init__(self):
        super().__init__()
        self.sent = {"down": [], "up": []}

    def download(self, client_id, payload):
        self.sent["down"].append((client_id, dict(payload)))
        return super().download(client_id, payload)

    def upload(self, client_id, payload):
        self.sent["up"].append((client_id, dict(payload)))
        return super().upload(client_id, payload)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_one_round_runs_and_evaluates(tiny_dataset, tiny_config, name):
    records = run_federation(
        build_federation(_config(tiny_config, name, "federation.rounds=1"), tiny_dataset)
    )
    assert len(records) == 1 and math.isfinite(records[0]["mean_accuracy"])
    assert records[0]["train_flops"] > 0


@pytest.mark.parametrize("name", ALGORITHMS)
def test_only_declared_tensors_travel_and_private_models_stay(tiny_dataset, tiny_config, name):
    federation = build_federation(_config(tiny_config, name), tiny_dataset)
    algorithm, channel = federation.algorithm, RecordingChannel()
    for server_round in (1, 2):
        record = run_round(federation, LocalClients(federation, FlopMeter()), server_round, channel)
        # The byte ledger counts exactly the payloads carried, per client and direction.
        for client in record["clients"]:
            for direction, key in (("down", "bytes_down"), ("up", "bytes_up")):
                carried = [p for cid, p in channel.sent[direction] if cid == client["client_id"]]
                assert client[key] == payload_bytes(carried[-1])
    for client_id, payload in channel.sent["up"]:
        state = federation.client_states[client_id].state_dict()
        private = {k: v for k, v in state.items() if not algorithm.is_shared(k)}
        for key, tensor in payload.items():
            if key in state:  # a state tensor may leave only if the algorithm declares it shared
                assert algorithm.is_shared(key), f"{name} uploaded private tensor {key}"
            assert not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in private.values()), (
                f"{name} upload {key} equals a private tensor"
            )
    if name == "standalone":
        assert all(not p for _, p in channel.sent["up"] + channel.sent["down"])


@pytest.mark.parametrize("name", ALGORITHMS)
def test_identical_seeds_give_identical_results(tiny_dataset, tiny_config, name):
    def run():
        records = run_federation(
            build_federation(_config(tiny_config, name, "federation.rounds=2"), tiny_dataset)
        )
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    assert run() == run()


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_state_survives_save_and_load(tiny_dataset, tiny_config, name):
    config = _config(tiny_config, name, "federation.sample_fraction=1.0")
    original = build_federation(config, tiny_dataset)
    run_round(original, LocalClients(original, FlopMeter()), 1, Channel())
    restored = build_federation(config, tiny_dataset)  # fresh initial states, then overwritten
    for client_id, state in original.client_states.items():
        restored.client_states[client_id].load_state_dict(_round_trip(state.state_dict()))
    restored.server_state = _round_trip(original.server_state)
    # Round 2 continues identically from the saved and the live state.
    a = run_round(original, LocalClients(original, FlopMeter()), 2, Channel())
    b = run_round(restored, LocalClients(restored, FlopMeter()), 2, Channel())
    assert a == b
    for client_id in original.client_states:
        left = original.client_states[client_id].state_dict()
        right = restored.client_states[client_id].state_dict()
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_real_uploads_pass_screening_and_corrupted_ones_do_not(tiny_dataset, tiny_config, name):
    federation = build_federation(_config(tiny_config, name), tiny_dataset)
    algorithm, server_state = federation.algorithm, federation.server_state
    ctx = client_context(federation, client_id=1)
    message = algorithm.broadcast(server_state, 1, 1)
    upload = client_update(algorithm, federation.client_states[1], message, ctx)
    declared = federation.clients[1].num_train

    def problem(tensors, count=upload.num_examples):
        return upload_problem(algorithm, server_state, Upload(tensors, count), declared)

    assert problem(upload.tensors) is None
    bound = algorithm.upload_bound(server_state)  # what Flower lets through before reading an upload
    assert len(upload.tensors) <= bound.tensors
    assert sum(t.numel() * t.element_size() for t in upload.tensors.values()) <= bound.bytes
    assert "unexpected" in problem({**upload.tensors, "smuggled": torch.zeros(3)})
    assert "sample count" in problem(upload.tensors, declared + 1)
    if upload.tensors:
        key = next(iter(upload.tensors))
        assert "NaN" in problem({**upload.tensors, key: torch.full_like(upload.tensors[key], float("nan"))})


@pytest.mark.parametrize("name", ALGORITHMS)
def test_what_travels_is_exactly_what_the_algorithm_declares_shared(tiny_dataset, tiny_config, name):
    federation = build_federation(_config(tiny_config, name), tiny_dataset)
    algorithm, channel = federation.algorithm, RecordingChannel()
    for server_round in (1, 2):
        run_round(federation, LocalClients(federation, FlopMeter()), server_round, channel)
    carried = {
        key for direction in ("down", "up") for _, payload in channel.sent[direction] for key in payload
    }
    assert all(algorithm.is_shared(key) for key in carried), f"{name} sent undeclared tensors"
    if algorithm.uploads_global_state:  # the shared part of the client state is what goes up and comes down
        shared = set(algorithm.shared_state(federation.client_states[0]))
        assert shared and all(set(p) == shared for _, p in channel.sent["up"] + channel.sent["down"])


@pytest.mark.parametrize("name", ALGORITHMS)
def test_undeclared_tensors_are_never_sent_nor_accepted(tiny_dataset, tiny_config, name, monkeypatch):
    federation = build_federation(_config(tiny_config, name), tiny_dataset)
    algorithm = federation.algorithm
    ctx = client_context(federation, client_id=1)
    upload = client_update(
        algorithm, federation.client_states[1], algorithm.broadcast(federation.server_state, 1, 1), ctx
    )
    smuggled = Upload({**upload.tensors, "private.weights": torch.zeros(2)}, upload.num_examples)
    reason = upload_problem(algorithm, federation.server_state, smuggled, federation.clients[1].num_train)
    assert reason is not None and "not shared" in reason and "private.weights" in reason

    original = type(algorithm).broadcast
    monkeypatch.setattr(
        type(algorithm),
        "broadcast",
        lambda self, state, cid, rnd: {**original(self, state, cid, rnd), "private.weights": torch.zeros(2)},
    )
    with pytest.raises(RuntimeError, match=r"does not share: private\.weights"):
        run_round(federation, LocalClients(federation, FlopMeter()), 1, Channel())
