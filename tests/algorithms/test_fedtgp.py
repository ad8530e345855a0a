import math

import torch
import torch.nn.functional as F

from pfedlora.algorithms import Upload
from pfedlora.algorithms.fedtgp import GENERATOR_KEYS, FedTGP, adaptive_margin, generate, margin_loss
from pfedlora.simulation import build_federation, run_federation


def test_the_adaptive_margin_is_the_largest_nearest_neighbour_distance_capped():
    centres = {0: torch.tensor([0.0, 0.0]), 1: torch.tensor([3.0, 4.0]), 4: torch.tensor([0.0, 1.0])}
    # nearest others: class 0 -> 1 (class 4), class 1 -> sqrt(9 + 9) (class 4), class 4 -> 1
    assert math.isclose(adaptive_margin(centres, 100.0), math.sqrt(18))
    assert adaptive_margin(centres, 2.0) == 2.0
    assert adaptive_margin({3: torch.zeros(2)}, 7.0) == 7.0  # one class: the cap


def test_the_margin_loss_on_hand_made_prototypes():
    generated = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    prototypes = torch.tensor([[0.0, 1.0], [3.0, 4.0]])
    labels = torch.tensor([0, 1])
    # distances: sample 0 to (0, 0): 1, to (3, 4): sqrt(9 + 9); sample 1: 5 and 0 (clamped to 1e-6)
    distances = torch.tensor([[1.0, math.sqrt(18)], [5.0, 1e-6]])
    pushed = distances + 2.0 * torch.eye(2)
    expected = F.cross_entropy(-pushed, labels)
    torch.testing.assert_close(margin_loss(prototypes, labels, generated, 2.0), expected)


def _algorithm(tiny_config, *extra):
    return FedTGP(tiny_config("algorithm=fedtgp", *extra), (1, 28, 28), num_classes=3)


def test_the_server_trains_the_generator_toward_the_client_prototypes(tiny_config):
    options = ("fedtgp.server_epochs=200", "fedtgp.server_lr=0.05", "fedtgp.margin_cap=1")
    algorithm = _algorithm(tiny_config, *options)
    template = algorithm.create_client("cnn5", torch.Generator().manual_seed(0))
    state = algorithm.initial_server_state(template)
    assert set(state) == {*GENERATOR_KEYS, "present"} and state["generator.embedding"].shape == (3, 500)
    assert algorithm.broadcast(state, 0, 1) == {}  # nothing uploaded yet
    generator = torch.Generator().manual_seed(1)
    centres = {0: 3 * torch.randn(500, generator=generator), 2: 3 * torch.randn(500, generator=generator)}
    uploads = [
        Upload(
            {
                f"prototype.{c}": centre + 0.1 * torch.randn(500, generator=generator)
                for c, centre in centres.items()
            },
            1,
        )
        for _ in range(3)
    ]
    pairs = [(u.tensors[f"prototype.{c}"], c) for u in uploads for c in centres]
    x, y = torch.stack([p for p, _ in pairs]), torch.tensor([c for _, c in pairs])
    margin = adaptive_margin(
        {c: torch.stack([u.tensors[f"prototype.{c}"] for u in uploads]).mean(0) for c in centres}, 1.0
    )

    def loss(s):
        return float(margin_loss(x, y, generate([s[k] for k in GENERATOR_KEYS]), margin))

    new = algorithm.aggregate(state, uploads, server_round=1)
    assert loss(new) < 0.5 * loss(state)
    assert new["present"].tolist() == [1.0, 0.0, 1.0]
    sent = algorithm.broadcast(new, 0, 2)
    assert set(sent) == {"prototype.0", "prototype.2"}
    generated = generate([new[k] for k in GENERATOR_KEYS])
    # each class's generated prototype is nearer its own clients' prototypes than the other class's
    for c, other in ((0, 2), (2, 0)):
        assert (sent[f"prototype.{c}"] - centres[c]).norm() < (generated[other] - centres[c]).norm()
    again = _algorithm(tiny_config, *options).aggregate(state, uploads, 1)
    assert all(torch.equal(again[k], new[k]) for k in new)  # the server's shuffling is seeded


def test_clients_send_prototypes_without_counts_and_two_rounds_run(tiny_dataset, tiny_config):
    config = tiny_config(
        "algorithm=fedtgp", "federation.rounds=2", "federation.sample_fraction=1.0", "fedtgp.server_epochs=5"
    )
    federation = build_federation(config, tiny_dataset)
    records = run_federation(federation)
    assert all(math.isfinite(r["mean_accuracy"]) for r in records)
    for client in records[1]["clients"]:
        held = len(set(tiny_dataset.train_y[federation.clients[client["client_id"]].train_indices].tolist()))
        assert client["bytes_up"] == held * 500 * 4  # one prototype per class held, no counts
    assert all(bool(state.prototype_mask.any()) for state in federation.client_states.values())
