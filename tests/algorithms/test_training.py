"""The local SGD loop: the multi-tensor optimizer, precision and the memory layout."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from pfedlora.algorithms.training import autocast, clip_gradients, log_precision, run_sgd, sgd
from pfedlora.config import TrainConfig, load_config
from pfedlora.hardware import runs_in_bf16
from pfedlora.metrics import FlopMeter
from pfedlora.models import build_model
from pfedlora.seeding import torch_generator


def _batches(count=4, seed=0):
    generator = torch_generator(seed, "batches")
    return [
        (torch.randn(16, 1, 28, 28, generator=generator), torch.randint(0, 10, (16,), generator=generator))
        for _ in range(count)
    ]


def _train_with_sgd_kernels(kernel):
    """Two cnn1 copies four steps on the same batches: PyTorch's per-parameter SGD loop, and ours."""
    train = TrainConfig(momentum=0.9, weight_decay=1e-3, grad_clip=0.5, sgd_kernel=kernel)
    models = [build_model("cnn1", (1, 28, 28), 10, torch_generator(0, "m")) for _ in range(2)]
    loop = torch.optim.SGD(models[0].parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False)
    ours = sgd(list(models[1].parameters()), 0.05, train)
    for x, y in _batches():
        for model, optimizer in ((models[0], loop), (models[1], ours)):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), train.grad_clip, foreach=False)
            optimizer.step()
    assert not torch.equal(
        models[0].conv1.weight, build_model("cnn1", (1, 28, 28), 10, torch_generator(0, "m")).conv1.weight
    )
    return list(zip(models[0].parameters(), models[1].parameters(), strict=True))


def test_the_foreach_sgd_makes_exactly_the_per_parameter_update():
    assert all(torch.equal(a, b) for a, b in _train_with_sgd_kernels("foreach"))


def test_the_fused_sgd_makes_the_per_parameter_update_up_to_rounding():
    pairs = _train_with_sgd_kernels("fused")
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in pairs)


CLIP_CASES = {"clips": 0.05, "does not clip": 1e6, "nan": 1.0, "inf": 1.0, "a gradient missing": 0.05}


@pytest.mark.parametrize("case", sorted(CLIP_CASES))
def test_clipping_gives_bit_for_bit_the_gradients_of_clip_grad_norm(case):
    model = build_model("cnn5", (1, 28, 28), 10, torch_generator(0, "m"))
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    ours = list(model.parameters())
    if case in ("nan", "inf"):  # clip_grad_norm_ then scales every gradient by NaN, or by 0
        ours[0].grad[0, 0, 0, 0] = float(case)
    if case == "a gradient missing":
        ours[0].grad = None
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for mine, copy_ in zip(ours, theirs, strict=True):
        copy_.grad = None if mine.grad is None else mine.grad.clone()
    torch.nn.utils.clip_grad_norm_(theirs, CLIP_CASES[case], foreach=True)
    clip_gradients(ours, CLIP_CASES[case])
    for p, q in zip(ours, theirs, strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad.isnan(), q.grad.isnan())
            assert torch.equal(p.grad.nan_to_num(), q.grad.nan_to_num())
    assert (case == "nan") == bool(ours[1].grad.isnan().all())
    assert (case == "inf") == bool((ours[1].grad == 0).all())
    clip_gradients([], 1.0)  # nothing to clip: nothing happens


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


@pytest.mark.parametrize(
    ("precision", "amx", "device", "warned"),
    [
        ("bf16", False, "cpu", True),
        ("bf16", True, "cpu", False),
        ("fp32", False, "cpu", False),
        ("bf16", False, "cuda", False),
        ("auto", False, "cpu", False),
    ],
)
def test_bf16_on_a_cpu_without_amx_is_warned_of(monkeypatch, caplog, precision, amx, device, warned):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    train = load_config(None, [f"train.precision={precision}"]).train
    with caplog.at_level(logging.WARNING, logger="pfedlora.algorithms.training"):
        log_precision(train, torch.device(device))
    assert ("without AMX tiles" in caplog.text) is warned


@pytest.mark.parametrize(("amx", "chosen"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_on_a_cpu_with_amx_and_fp32_without(monkeypatch, caplog, amx, chosen):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    train = load_config(None, ["train.precision=auto"]).train
    assert runs_in_bf16("auto", cpu) is amx
    assert runs_in_bf16("bf16", cpu) and not runs_in_bf16("fp32", cpu)
    with autocast(train, cpu):
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == (torch.bfloat16 if amx else torch.float32)
    with caplog.at_level(logging.INFO, logger="pfedlora.algorithms.training"):
        log_precision(train, cpu)
    assert f"train.precision = auto: {chosen} on cpu" in caplog.text
