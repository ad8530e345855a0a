import math

import pytest
import torch

from pfedlora.algorithms import Upload
from pfedlora.algorithms.fedkd import FedKD, compress, decompress, energy_rank, svd_factors
from pfedlora.metrics import payload_bytes
from pfedlora.models import build_model
from pfedlora.simulation import build_federation, run_federation

from .helpers import client_context as _context


def _orthogonal(n, seed):
    q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q


def _known_spectrum():
    """A rotated diag(4, 2, 1): energies 16, 4, 1 of 21, i.e. cumulative fractions 0.762, 0.952, 1."""
    return (
        _orthogonal(3, 0)
        @ torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
        @ _orthogonal(3, 1).T
    ).float()


def _rank_one(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], math.prod(shape[1:])
    return (torch.randn(rows, 1, generator=generator) @ torch.randn(1, cols, generator=generator)).reshape(
        shape
    )


def _low_rank_state(shapes, seed):
    """Rank-1 matrices and random vectors of the given shapes."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: _rank_one(shape, seed + i) if len(shape) > 1 else torch.randn(shape, generator=generator)
        for i, (key, shape) in enumerate(shapes.items())
    }


def _wire_keys_match(payload, shapes):
    """Every tensor of ``shapes`` travels whole, or as U (m, k), S (k,), V (n, k); nothing else travels."""
    seen = set()
    for key, shape in shapes.items():
        if key in payload:
            assert payload[key].shape == shape
            seen.add(key)
            continue
        u, s, v = payload[f"{key}.U"], payload[f"{key}.S"], payload[f"{key}.V"]
        rank = s.numel()
        assert u.shape == (shape[0], rank) and v.shape == (math.prod(shape[1:]), rank)
        seen.update({f"{key}.U", f"{key}.S", f"{key}.V"})
    assert seen == set(payload)


@pytest.mark.parametrize(
    ("energy", "rank"),
    [(0.5, 1), (0.76, 1), (0.77, 2), (0.95, 2), (0.953, 3), (1.0, 3)],
)
def test_svd_keeps_the_fewest_singular_values_that_hold_the_energy(energy, rank):
    u, s, v = svd_factors(_known_spectrum(), energy)
    assert s.numel() == rank
    assert u.shape == (3, rank) and v.shape == (3, rank)
    torch.testing.assert_close(s, torch.tensor([4.0, 2.0, 1.0])[:rank])


def test_a_fraction_reached_exactly_counts_as_held():
    # Energies 1, 1, 1, 1: cumulative fractions 0.25, 0.5, 0.75, 1, exact in floating point.
    assert [energy_rank(torch.ones(4), t) for t in (0.25, 0.5, 0.75, 1.0)] == [1, 2, 3, 4]


def test_svd_reconstruction_is_exact_at_full_energy_and_optimal_below():
    matrix = _known_spectrum()
    u, s, v = svd_factors(matrix, 1.0)
    torch.testing.assert_close((u * s) @ v.T, matrix, rtol=0, atol=1e-5)
    u, s, v = svd_factors(matrix, 0.9)  # drops the singular value 1: the error is exactly 1 (Eckart–Young)
    assert torch.linalg.matrix_norm(matrix - (u * s) @ v.T).item() == pytest.approx(1.0, abs=1e-5)


def test_energy_rank_of_a_zero_spectrum_is_zero_and_zero_updates_travel_as_empty_factors():
    assert energy_rank(torch.zeros(4), 0.95) == 0
    payload = compress({"w": torch.zeros(20, 30)}, 0.95)
    assert payload_bytes(payload) == 0
    assert torch.equal(decompress(payload, {"w": torch.Size([20, 30])})["w"], torch.zeros(20, 30))


def test_conv_weights_are_factorised_as_out_by_in_k_k_and_rebuilt_to_their_shape():
    weight, bias = _rank_one((32, 16, 5, 5), seed=0), torch.arange(32.0)
    payload = compress({"conv.weight": weight, "conv.bias": bias}, 0.95)
    assert set(payload) == {"conv.weight.U", "conv.weight.S", "conv.weight.V", "conv.bias"}
    assert payload["conv.weight.U"].shape == (32, 1) and payload["conv.weight.V"].shape == (400, 1)
    assert payload["conv.bias"] is bias  # 1-D tensors travel as they are
    rebuilt = decompress(payload, {"conv.weight": weight.shape, "conv.bias": bias.shape})
    torch.testing.assert_close(rebuilt["conv.weight"], weight, rtol=1e-4, atol=1e-5)
    assert torch.equal(rebuilt["conv.bias"], bias)


def test_a_matrix_whose_factors_would_be_larger_travels_whole():
    matrix = torch.randn(16, 25, generator=torch.Generator().manual_seed(0))  # full rank 16: 16·42 > 400
    payload = compress({"w": matrix}, 0.95)
    assert set(payload) == {"w"} and torch.equal(payload["w"], matrix)


def test_decompress_refuses_missing_and_unexpected_keys():
    payload = compress({"w": _rank_one((20, 30), seed=1)}, 0.95)
    with pytest.raises(KeyError, match="unexpected"):
        decompress({**payload, "x": torch.zeros(1)}, {"w": torch.Size([20, 30])})
    with pytest.raises(KeyError, match=r"w\.S"):
        decompress({k: v for k, v in payload.items() if k != "w.S"}, {"w": torch.Size([20, 30])})


def test_energy_rises_linearly_over_the_rounds(tiny_config):
    algorithm = FedKD(tiny_config("algorithm=fedkd", "federation.rounds=5"), (1, 28, 28), 4)
    assert algorithm.energy(1) == pytest.approx(0.95)
    assert algorithm.energy(3) == pytest.approx(0.965)
    assert algorithm.energy(5) == pytest.approx(0.98)
    assert algorithm.energy(9) == pytest.approx(0.98)  # past the schedule it stays at the end value


def test_one_round_runs_gives_finite_accuracies_and_compresses_the_upload(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedkd", "federation.rounds=1"), tiny_dataset)
    dense_bytes = payload_bytes(federation.server_state)
    (record,) = run_federation(federation)
    assert math.isfinite(record["mean_accuracy"])
    assert all(0.0 <= a <= 1.0 for a in record["client_accuracies"])
    for client in record["clients"]:
        assert 0 < client["bytes_up"] < dense_bytes
        assert 0 < client["bytes_down"] <= dense_bytes


def test_upload_is_the_compressed_mentee_update_and_nothing_private(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedkd"), tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[0]
    cnn5 = build_model("cnn5", (1, 28, 28), 4, torch.Generator().manual_seed(0)).state_dict()
    shapes = {f"shared.{k}": v.shape for k, v in cnn5.items()}
    assert {k: v.shape for k, v in federation.server_state.items()} == shapes
    message = algorithm.broadcast(federation.server_state, 0, 1)
    _wire_keys_match(message, shapes)
    upload = algorithm.train(client, message, _context(federation))
    _wire_keys_match(upload.tensors, shapes)
    assert not any(k.startswith(("local.", "projection")) for k in upload.tensors)
    assert client.projection.weight.shape == (500, 500)
    # T < 1: the factorised update is smaller than the update itself.
    assert payload_bytes(upload.tensors) < payload_bytes(federation.server_state)
    assert any(k.endswith(".U") for k in upload.tensors)


def test_client_trains_from_the_reconstructed_broadcast_and_uploads_its_update(tiny_dataset, tiny_config):
    # No training: the client's mentee is exactly the reconstruction, and the update is zero.
    federation = build_federation(tiny_config("algorithm=fedkd", "train.local_epochs=0"), tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[1]
    shapes = {k: v.shape for k, v in federation.server_state.items()}
    message = compress(_low_rank_state(shapes, seed=0), 0.95)
    upload = algorithm.train(client, message, _context(federation, client_id=1))
    for key, value in decompress(message, shapes).items():
        assert torch.equal(client.shared.state_dict()[key.removeprefix("shared.")], value)
    for value in decompress(upload.tensors, shapes).values():
        assert torch.count_nonzero(value) == 0


def test_upload_rebuilds_to_the_mentee_update_at_full_energy(tiny_dataset, tiny_config):
    config = tiny_config("algorithm=fedkd", "fedkd.energy_start=1.0", "fedkd.energy_end=1.0")
    federation = build_federation(config, tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[0]
    shapes = {k: v.shape for k, v in federation.server_state.items()}
    message = algorithm.broadcast(federation.server_state, 0, 1)
    received = decompress(message, shapes)
    upload = algorithm.train(client, message, _context(federation))
    after = algorithm.shared_state(client)
    for key, value in decompress(upload.tensors, shapes).items():
        assert torch.count_nonzero(value) > 0
        torch.testing.assert_close(value, after[key] - received[key], rtol=0, atol=1e-5)


def test_broadcast_recompresses_the_global_mentee(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedkd"), tiny_dataset)
    shapes = {k: v.shape for k, v in federation.server_state.items()}
    state = _low_rank_state(shapes, seed=5)
    message = federation.algorithm.broadcast(state, client_id=0, server_round=1)
    _wire_keys_match(message, shapes)
    assert {k for k in message if k.endswith(".U")} == {f"{k}.U" for k, s in shapes.items() if len(s) > 1}
    assert payload_bytes(message) < payload_bytes(state)
    for key, value in decompress(message, shapes).items():
        torch.testing.assert_close(value, state[key], rtol=1e-4, atol=1e-4)


def test_broadcast_at_full_energy_is_lossless(tiny_dataset, tiny_config):
    config = tiny_config("algorithm=fedkd", "fedkd.energy_start=1.0", "fedkd.energy_end=1.0")
    federation = build_federation(config, tiny_dataset)
    state = federation.server_state
    rebuilt = decompress(federation.algorithm.broadcast(state, 0, 1), {k: v.shape for k, v in state.items()})
    for key, value in state.items():
        torch.testing.assert_close(rebuilt[key], value, rtol=0, atol=1e-5)


def test_server_adds_the_sample_weighted_mean_of_the_reconstructed_updates(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedkd"), tiny_dataset)
    state = federation.server_state
    shapes = {k: v.shape for k, v in state.items()}
    deltas = [_low_rank_state(shapes, seed=0), _low_rank_state(shapes, seed=100)]
    uploads = [Upload(compress(deltas[0], 0.95), 1), Upload(compress(deltas[1], 0.95), 3)]
    assert any(k.endswith(".U") for k in uploads[0].tensors)
    new_state = federation.algorithm.aggregate(state, uploads, server_round=1)
    for key, value in state.items():
        expected = value + (deltas[0][key] + 3 * deltas[1][key]) / 4
        torch.testing.assert_close(new_state[key], expected, rtol=1e-4, atol=1e-4)
    assert federation.algorithm.aggregate(state, [], server_round=1) is state


def test_mentor_and_mentee_losses_reach_only_their_own_side(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedkd"), tiny_dataset)
    client = federation.client_states[0]
    x, y = next(federation.clients[0].train_batches(16, torch.Generator().manual_seed(0)))
    groups = {
        "local": list(client.local.parameters()),
        "shared": list(client.shared.parameters()),
        "projection": [client.projection.weight],
    }
    reached = {"mentor": ["local"], "mentee": ["shared", "projection"]}
    for index, name in enumerate(("mentor", "mentee")):
        client.zero_grad(set_to_none=True)
        federation.algorithm.losses(client, x, y)[index].backward()
        for group, params in groups.items():
            has_grad = all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in params)
            no_grad = all(p.grad is None for p in params)
            assert has_grad if group in reached[name] else no_grad, (name, group)


def test_prediction_is_the_mentor(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedkd"), tiny_dataset)
    client = federation.client_states[3]
    x, _ = next(federation.clients[3].eval_batches("test", 8))
    torch.testing.assert_close(federation.algorithm.predict(client, x), client.local(x))
