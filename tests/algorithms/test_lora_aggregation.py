"""The federated-LoRA server rules as algebra, on random factors (Hypothesis): what their users' bug reports
say they got wrong is what these properties pin down."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pfedlora.algorithms.lora_aggregation import (
    LORA_RULES,
    Factors,
    best_rank,
    fedit,
    fedsa_lora,
    ffa_lora,
    flexlora,
    flora,
    hetlora,
    lora_scale,
    weighted_update,
)
from pfedlora.errors import ConfigError

OUT, IN = 6, 5


def _factors(seed: int, rank: int, common_a: torch.Tensor | None = None) -> Factors:
    generator = torch.Generator().manual_seed(seed)
    A = common_a if common_a is not None else torch.randn(rank, IN, generator=generator, dtype=torch.float64)
    return Factors(A, torch.randn(OUT, rank, generator=generator, dtype=torch.float64))


clients = st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(1, 4), st.floats(0.5, 100.0)), min_size=1, max_size=5
)


@settings(max_examples=40, deadline=None)
@given(clients)
def test_one_client_passes_through_every_rule_unchanged(spec):
    seed, rank, weight = spec[0]
    upload = _factors(seed, rank)
    for name in ("fedit", "ffa-lora", "hetlora", "flexlora", "flora"):
        aggregate = LORA_RULES[name]([upload], [weight])
        if aggregate.merged is not None:
            assert torch.allclose(aggregate.merged, upload.product())
        else:
            factors = aggregate.common or aggregate.per_client[0]
            assert torch.allclose(factors.product(), upload.product()), name
    assert torch.equal(fedsa_lora([upload], [weight]).common.A, upload.A)


@settings(max_examples=40, deadline=None)
@given(clients)
def test_flora_reproduces_the_weighted_sum_of_products_exactly(spec):
    uploads = [_factors(seed, rank) for seed, rank, _ in spec]
    weights = [w for _, _, w in spec]
    total = sum(weights)
    expected = sum(w / total * u.product() for w, u in zip(weights, uploads, strict=True))
    assert torch.allclose(flora(uploads, weights).merged, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(clients)
def test_fedit_averages_the_factors_not_the_products(spec):
    uploads = [_factors(seed, 2) for seed, _, _ in spec]
    weights = [w for _, _, w in spec]
    common = fedit(uploads, weights).common
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    assert torch.allclose(common.A, sum(wk * u.A for wk, u in zip(w, uploads, strict=True)))
    assert torch.allclose(common.B, sum(wk * u.B for wk, u in zip(w, uploads, strict=True)))


def test_fedit_is_not_the_average_update_where_ffa_lora_is():
    a, b = _factors(1, 2), _factors(2, 2)
    exact = weighted_update([a, b], [1, 1])
    assert not torch.allclose(fedit([a, b], [1, 1]).common.product(), exact)  # avg(B)avg(A) ≠ avg(BA)
    shared = _factors(3, 2).A
    a, b = _factors(1, 2, shared), _factors(2, 2, shared)
    assert torch.allclose(ffa_lora([a, b], [1, 3]).common.product(), weighted_update([a, b], [1, 3]))
    with pytest.raises(ValueError, match="share one frozen A"):
        ffa_lora([_factors(1, 2), _factors(2, 2)], [1, 1])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5))
def test_flexlora_truncation_is_the_best_rank_r_approximation(seed, rank):
    generator = torch.Generator().manual_seed(seed)
    update = torch.randn(OUT, IN, generator=generator, dtype=torch.float64)
    best = best_rank(update, rank).product()
    singular = torch.linalg.svdvals(update)
    # Eckart–Young: the error of the best rank-r approximation is the norm of the discarded singular values
    assert math.isclose(
        float(torch.linalg.matrix_norm(update - best)),
        float(singular[rank:].norm()),
        rel_tol=1e-9,
        abs_tol=1e-9,
    )
    for _ in range(5):  # and no random rank-r matrix does better
        other = torch.randn(OUT, rank, generator=generator, dtype=torch.float64) @ torch.randn(
            rank, IN, generator=generator, dtype=torch.float64
        )
        assert torch.linalg.matrix_norm(update - other) >= torch.linalg.matrix_norm(update - best) - 1e-9


def test_flexlora_gives_each_client_its_own_rank_of_the_weighted_update():
    uploads = [_factors(1, 1), _factors(2, 3), _factors(3, 4)]
    aggregate = flexlora(uploads, [1, 2, 3])
    update = weighted_update(uploads, [1, 2, 3])
    for upload, factors in zip(uploads, aggregate.per_client, strict=True):
        assert factors.rank == upload.rank
        assert torch.allclose(factors.product(), best_rank(update, upload.rank).product())


def test_hetlora_pads_weights_by_norm_and_truncates_to_each_rank():
    small, large = _factors(1, 1), _factors(2, 3)
    aggregate = hetlora([small, large], [1, 1])
    n_small, n_large = (float(torch.linalg.matrix_norm(f.product())) for f in (small, large))
    w_small = n_small / (n_small + n_large)
    expected_A = (
        w_small * torch.cat([small.A, torch.zeros(2, IN, dtype=torch.float64)]) + (1 - w_small) * large.A
    )
    assert torch.allclose(aggregate.per_client[1].A, expected_A)
    assert torch.allclose(aggregate.per_client[0].A, expected_A[:1])
    assert aggregate.per_client[0].B.shape == (OUT, 1) and aggregate.per_client[1].B.shape == (OUT, 3)


def test_alpha_over_r_is_one_number_for_server_and_clients():
    assert lora_scale(16.0, 8) == 2.0 == lora_scale(8.0, 4)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        lora_scale(16.0, 0)


def test_an_unknown_rule_is_refused_by_the_registry_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown value 'fedsalora'; allowed: fedit, ffa-lora, fedsa-lora"):
        LORA_RULES["fedsalora"]  # OpenFedLLM misspells one of its own algorithms in its list of names
    assert list(LORA_RULES) == ["fedit", "ffa-lora", "fedsa-lora", "hetlora", "flexlora", "flora"]
