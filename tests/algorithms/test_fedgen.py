import copy

import pytest
import torch
import torch.nn.functional as F

from pfedlora.algorithms import Upload
from pfedlora.algorithms.fedgen import draw_labels_and_noise
from pfedlora.algorithms.lg_fedavg import LGFedAvg
from pfedlora.metrics import FlopMeter
from pfedlora.simulation import build_federation

from .helpers import client_context


def test_without_a_label_distribution_a_client_trains_as_lg_fedavg_does(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedgen"), tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[2]
    message = algorithm.broadcast(federation.server_state, 2, 1)
    assert float(message["label_distribution"].sum()) == 0  # round 1: no labels seen yet
    reference = copy.deepcopy(client)
    upload = algorithm.train(client, message, client_context(federation, 2))
    lg = LGFedAvg(tiny_config("algorithm=lg-fedavg"), algorithm.input_shape, algorithm.num_classes)
    head = {k: v for k, v in message.items() if k.startswith("fc3.")}
    lg.train(reference, head, client_context(federation, 2))
    assert all(
        torch.equal(a, b)
        for a, b in zip(client.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    data = federation.clients[2]
    counts = torch.bincount(data.dataset.train_y[data.train_indices], minlength=algorithm.num_classes)
    assert set(upload.tensors) == {"fc3.weight", "fc3.bias", "label_counts"}
    assert upload.tensors["label_counts"].tolist() == counts.float().tolist()


def test_the_server_averages_heads_sums_labels_and_trains_the_generator(tiny_dataset, tiny_config):
    config = tiny_config("algorithm=fedgen", "fedgen.server_steps=150", "fedgen.generator_lr=0.01")
    federation = build_federation(config, tiny_dataset)
    algorithm, state = federation.algorithm, federation.server_state
    generator = torch.Generator().manual_seed(0)
    heads = [
        {
            "fc3.weight": torch.randn(4, 500, generator=generator),
            "fc3.bias": torch.randn(4, generator=generator),
        }
        for _ in range(2)
    ]
    uploads = [
        Upload({**heads[0], "label_counts": torch.tensor([3.0, 0.0, 1.0, 0.0])}, 4),
        Upload({**heads[1], "label_counts": torch.tensor([0.0, 2.0, 10.0, 0.0])}, 12),
    ]
    meter = FlopMeter()
    new = algorithm.aggregate(state, uploads, server_round=1, meter=meter)
    torch.testing.assert_close(
        new["fc3.weight"], (4 * heads[0]["fc3.weight"] + 12 * heads[1]["fc3.weight"]) / 16
    )
    assert new["label_counts"].tolist() == [3.0, 2.0, 11.0, 0.0]
    assert meter.total > 0  # the server's training, counted apart

    def loss(server_state):
        module = algorithm.load_generator(server_state).eval()
        labels, noise = draw_labels_and_noise(new["label_counts"], 256, 32, torch.Generator().manual_seed(5))
        with torch.no_grad():
            logits = F.linear(module(labels, noise), new["fc3.weight"], new["fc3.bias"])
        return float(F.cross_entropy(logits, labels))

    assert loss(new) < 0.5 * loss(state)
    message = algorithm.broadcast(new, 0, 2)
    assert message["label_distribution"].tolist() == pytest.approx([3 / 16, 2 / 16, 11 / 16, 0.0])
    again = algorithm.aggregate(state, uploads, server_round=1)
    assert all(torch.equal(again[k], new[k]) for k in new)  # seeded


def test_a_client_learns_from_generated_features_once_labels_are_known(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedgen", "federation.rounds=2"), tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[0]
    state = {**federation.server_state, "label_counts": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    with_generator, without = copy.deepcopy(client), copy.deepcopy(client)
    algorithm.train(with_generator, algorithm.broadcast(state, 0, 2), client_context(federation, 0))
    algorithm.train(
        without, algorithm.broadcast(federation.server_state, 0, 2), client_context(federation, 0)
    )
    assert not torch.equal(with_generator.fc3.weight, without.fc3.weight)


@pytest.mark.parametrize(
    ("counts", "reason"),
    [(torch.tensor([1.0, -1.0, 0.0, 0.0]), "non-negative"), (torch.ones(3), "shape"), (None, "label_counts")],
)
def test_uploads_with_bad_label_counts_are_refused(tiny_dataset, tiny_config, counts, reason):
    federation = build_federation(tiny_config("algorithm=fedgen"), tiny_dataset)
    head = {k: v for k, v in federation.server_state.items() if k.startswith("fc3.")}
    tensors = head if counts is None else {**head, "label_counts": counts}
    with pytest.raises(ValueError, match=reason):
        federation.algorithm.check_upload(federation.server_state, tensors)
