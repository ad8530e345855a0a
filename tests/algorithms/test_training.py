"""The local SGD loop: the multi-tensor optimizer, precision and the memory layout."""

import copy

import pytest
import torch
import torch.nn.functional as F

from pfedlora.algorithms.training import run_sgd, sgd
from pfedlora.config import TrainConfig
from pfedlora.metrics import FlopMeter
from pfedlora.models import build_model
from pfedlora.seeding import torch_generator


def _batches(count=4, seed=0):
    generator = torch_generator(seed, "batches")
    return [
        (torch.randn(16, 1, 28, 28, generator=generator), torch.randint(0, 10, (16,), generator=generator))
        for _ in range(count)
    ]


def test_the_multi_tensor_sgd_makes_exactly_the_per_parameter_update():
    train = TrainConfig(momentum=0.9, weight_decay=1e-3, grad_clip=0.5)
    models = [build_model("cnn1", (1, 28, 28), 10, torch_generator(0, "m")) for _ in range(2)]
    loop = torch.optim.SGD(models[0].parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False)
    ours = sgd(list(models[1].parameters()), 0.05, train)
    for x, y in _batches():
        for model, optimizer, foreach in ((models[0], loop, False), (models[1], ours, True)):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), train.grad_clip, foreach=foreach)
            optimizer.step()
    pairs = list(zip(models[0].parameters(), models[1].parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(
        pairs[0][0], build_model("cnn1", (1, 28, 28), 10, torch_generator(0, "m")).conv1.weight
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_decides_whether_the_forward_pass_runs_under_bf16_autocast(precision):
    model = build_model("cnn5", (1, 28, 28), 10, torch_generator(0, "m"))
    seen = []

    def loss(x, y):
        logits = model(x)
        seen.append(logits.dtype)
        return F.cross_entropy(logits, y)

    before = copy.deepcopy(model.state_dict())
    train = TrainConfig(precision=precision)
    run_sgd(list(model.parameters()), 1, _batches, loss, train, 0.05, FlopMeter(), kind="k")
    assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 for k in after)  # weights and updates stay fp32
    assert any(not torch.equal(before[k], after[k]) for k in after)
