import copy
import math

import pytest
import torch
from torch import nn

from pfedlora.algorithms.fedapen import MixedPair
from pfedlora.metrics import FlopMeter, payload_bytes
from pfedlora.models import build_model
from pfedlora.simulation import build_federation, run_federation

from .helpers import client_context as _context


class PatchReader(nn.Module):
    """A hand-made classifier for the tiny dataset: class c lights its own 6×6 square (tests/conftest.py).

    ``sign=+1`` reads the squares (always right, confidently); ``sign=-1`` is confidently wrong.
    """

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign = sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corners = [(4 + 12 * (c // 2), 4 + 12 * (c % 2)) for c in range(4)]
        brightness = [x[:, 0, r : r + 6, c : c + 6].mean(dim=(1, 2)) for r, c in corners]
        return self.sign * 10.0 * torch.stack(brightness, dim=1)  # (B, 4)


def _toy_client(private_sign: float, mixing_weight: float) -> MixedPair:
    client = MixedPair(PatchReader(private_sign), PatchReader(-private_sign))
    with torch.no_grad():
        client.mixing_weight.fill_(mixing_weight)
    return client


def test_one_round_runs_and_gives_finite_accuracies(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedapen", "federation.rounds=1"), tiny_dataset)
    (record,) = run_federation(federation)
    assert math.isfinite(record["mean_accuracy"])
    assert all(0.0 <= a <= 1.0 for a in record["client_accuracies"])
    shared_bytes = payload_bytes(federation.server_state)
    for client in record["clients"]:
        assert client["bytes_down"] == client["bytes_up"] == shared_bytes
    for state in federation.client_states.values():
        assert 0.0 <= state.mixing_weight.item() <= 1.0


def test_upload_is_the_shared_cnn5_and_nothing_private(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedapen"), tiny_dataset)
    client = federation.client_states[0]
    meter = FlopMeter()
    upload = federation.algorithm.train(
        client, dict(federation.server_state), _context(federation, meter=meter)
    )
    cnn5 = build_model("cnn5", (1, 28, 28), 4, torch.Generator().manual_seed(0)).state_dict()
    expected = {f"shared.{k}": v.shape for k, v in cnn5.items()}
    assert {k: v.shape for k, v in upload.tensors.items()} == expected
    assert {k: v.shape for k, v in federation.server_state.items()} == expected
    assert not any(k.startswith("local.") or k == "mixing_weight" for k in upload.tensors)
    num_train = federation.clients[0].num_train
    assert upload.num_examples == num_train - max(1, round(0.05 * num_train))  # the adaptability set is out
    assert set(meter.per_sample) == {("cnn1", "mixing-weight"), ("cnn1", "mutual")}


def test_adaptability_set_is_fixed_per_client_and_disjoint_from_training(tiny_dataset, tiny_config):
    federation = build_federation(
        tiny_config("algorithm=fedapen", "fedapen.holdout_fraction=0.2"), tiny_dataset
    )
    algorithm, data = federation.algorithm, federation.clients[0]
    rest, holdout = algorithm.split(data, client_id=0)
    again_rest, again_holdout = algorithm.split(data, client_id=0)
    assert torch.equal(rest.train_indices, again_rest.train_indices)
    assert torch.equal(holdout.train_indices, again_holdout.train_indices)
    assert holdout.num_train == round(0.2 * data.num_train)
    together = torch.cat([rest.train_indices, holdout.train_indices]).sort().values
    assert torch.equal(together, data.train_indices.sort().values)  # disjoint, and nothing lost
    assert rest.dataset is data.dataset and holdout.dataset is data.dataset  # views, not copies
    _, other = algorithm.split(federation.clients[0], client_id=7)
    assert not torch.equal(other.train_indices, holdout.train_indices)


@pytest.mark.parametrize(("private_sign", "direction"), [(1.0, +1), (-1.0, -1)])
def test_mixing_weight_moves_toward_the_better_model(tiny_dataset, tiny_config, private_sign, direction):
    federation = build_federation(tiny_config("algorithm=fedapen", "fedapen.lambda_lr=0.001"), tiny_dataset)
    client = _toy_client(private_sign, 0.5)
    federation.algorithm.fit_mixing_weight(client, federation.clients[0], _context(federation))
    moved = client.mixing_weight.item() - 0.5
    assert moved * direction > 0.01
    assert 0.0 < client.mixing_weight.item() < 1.0  # a small lr: a gradual move, not a jump to a bound


# Start at the wrong end: the first step of a huge lr jumps far past the other bound.
@pytest.mark.parametrize(("private_sign", "start", "bound"), [(1.0, 0.01, 1.0), (-1.0, 0.99, 0.0)])
def test_mixing_weight_is_clamped_to_the_unit_interval(tiny_dataset, tiny_config, private_sign, start, bound):
    federation = build_federation(tiny_config("algorithm=fedapen", "fedapen.lambda_lr=100"), tiny_dataset)
    client = _toy_client(private_sign, start)
    federation.algorithm.fit_mixing_weight(client, federation.clients[0], _context(federation))
    assert client.mixing_weight.item() == bound


def test_every_step_starts_from_a_clamped_mixing_weight(tiny_dataset, tiny_config):
    # The first step of a huge lr overshoots 1; the forward passes after it must see λ clamped back.
    federation = build_federation(tiny_config("algorithm=fedapen", "fedapen.lambda_lr=100"), tiny_dataset)
    client = _toy_client(1.0, 0.01)
    seen = []
    client.local.register_forward_hook(lambda *_: seen.append(client.mixing_weight.item()))
    federation.algorithm.fit_mixing_weight(client, federation.clients[0], _context(federation))
    assert len(seen) > 1 and seen[0] == pytest.approx(0.01)
    assert all(0.0 <= value <= 1.0 for value in seen)


def test_models_train_on_the_rest_and_lambda_on_the_adaptability_set(tiny_dataset, tiny_config):
    config = tiny_config(
        "algorithm=fedapen",
        "train.local_epochs=2",
        "fedapen.lambda_epochs=3",
        "fedapen.holdout_fraction=0.25",
    )
    federation = build_federation(config, tiny_dataset)
    meter = FlopMeter()
    federation.algorithm.train(
        federation.client_states[1], dict(federation.server_state), _context(federation, 1, meter=meter)
    )
    rest, holdout = federation.algorithm.split(federation.clients[1], client_id=1)
    assert holdout.num_train > 1
    assert meter.samples == 2 * rest.num_train + 3 * holdout.num_train


def test_mixing_weight_is_fitted_first_and_then_stays_fixed(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedapen", "fedapen.lambda_lr=1"), tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[2]
    message = dict(federation.server_state)
    reference = copy.deepcopy(client)
    reference.shared.load_state_dict({k.removeprefix("shared."): v for k, v in message.items()})
    _, holdout = algorithm.split(federation.clients[2], client_id=2)
    algorithm.fit_mixing_weight(reference, holdout, _context(federation, client_id=2))
    assert reference.mixing_weight.item() != 0.5
    algorithm.train(client, message, _context(federation, client_id=2))
    assert client.mixing_weight.item() == reference.mixing_weight.item()


def test_private_and_shared_losses_reach_only_their_own_model(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedapen"), tiny_dataset)
    client = federation.client_states[0]
    x, y = next(federation.clients[0].train_batches(16, torch.Generator().manual_seed(0)))
    groups = {"local": list(client.local.parameters()), "shared": list(client.shared.parameters())}
    for index, own in enumerate(("local", "shared")):
        client.zero_grad(set_to_none=True)
        federation.algorithm.losses(client, x, y)[index].backward()
        for group, params in groups.items():
            if group == own:
                assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in params)
            else:
                assert all(p.grad is None for p in params)
        assert client.mixing_weight.grad is None


def test_prediction_mixes_the_two_models_logits(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedapen"), tiny_dataset)
    client = federation.client_states[1]
    with torch.no_grad():
        client.mixing_weight.fill_(0.3)
    x, _ = next(federation.clients[1].eval_batches("test", 8))
    expected = 0.3 * client.local(x) + 0.7 * client.shared(x)
    torch.testing.assert_close(federation.algorithm.predict(client, x), expected)
