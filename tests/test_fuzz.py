"""Property-based tests: random configurations and random uploads never raise anything but pfedlora's own
errors, and no invalid upload changes the global state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfedlora.algorithms import Upload
from pfedlora.config import ExperimentConfig, config_to_dict, flat_config, load_config
from pfedlora.errors import ConfigError
from pfedlora.simulation import build_federation
from pfedlora.simulation.rounds import server_update
from pfedlora.simulation.screening import Reply, upload_problem

KEYS = sorted(flat_config(ExperimentConfig()))
"""Every configuration key, e.g. ``train.lr``."""

VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "[]", "[1, 2]", '"x"', "{a = 1}", "cnn1,cnn9", ""]),
)


def _toml_literal(value: object) -> str:
    """``value`` as the right-hand side of a ``--set`` override (TOML, or a bare word)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return str(value)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=16)), VALUES), min_size=1, max_size=4
    )
)
def test_random_overrides_give_a_valid_config_or_a_config_error(assignments):
    overrides = [f"{key}={_toml_literal(value)}" for key, value in assignments]
    try:
        config = load_config(None, overrides)
    except ConfigError:
        return
    for key, value in flat_config(config).items():  # whatever is accepted is finite and well-typed
        if isinstance(value, float):
            assert math.isfinite(value), key
    assert config_to_dict(config)  # and serialises


@pytest.fixture(scope="module")
def federation(tiny_dataset):
    config = load_config(
        None, ["device=cpu", "federation.num_clients=3", "data.classes_per_client=2", "adapter.rank=2"]
    )
    return build_federation(config, tiny_dataset)


def _tensor_strategy(template: torch.Tensor) -> st.SearchStrategy[torch.Tensor]:
    """Tensors like ``template``, or of another shape or dtype, sometimes holding NaN or Inf."""
    shapes = st.sampled_from([tuple(template.shape), (template.numel(),), (1,), (*template.shape, 1)])
    dtypes = st.sampled_from([template.dtype, torch.float64, torch.float16, torch.int64])
    fills = st.floats(allow_nan=True, allow_infinity=True, width=32)
    return st.builds(lambda shape, dtype, fill: torch.full(shape, fill).to(dtype), shapes, dtypes, fills)


@st.composite
def uploads(draw, state):
    """A random upload against the global ``state``: keys kept, dropped or added, tensors changed, any
    sample count."""
    tensors = {}
    for key, value in state.items():
        choice = draw(st.sampled_from(["keep", "drop", "replace"]))
        if choice == "keep":
            tensors[key] = value + draw(st.floats(-1, 1, width=32))
        elif choice == "replace":
            tensors[key] = draw(_tensor_strategy(value))
    if draw(st.booleans()):
        tensors[draw(st.text(min_size=1, max_size=20))] = torch.zeros(draw(st.integers(0, 3)))
    count = draw(st.one_of(st.integers(-5, 10**12), st.floats(allow_nan=True), st.just(True)))
    return Upload(tensors, count)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_invalid_upload_changes_the_global_state(federation, data):
    algorithm, state = federation.algorithm, federation.server_state
    declared = {0: 50, 1: 50}
    honest = Reply(0, Upload({k: v + 0.25 for k, v in state.items()}, 7))
    random_upload = data.draw(uploads(state))
    problem = upload_problem(algorithm, state, random_upload, declared[1])  # never raises
    outcome = server_update(algorithm, state, [honest, Reply(1, random_upload)], declared, 1)
    if problem is not None:
        assert outcome.aggregated == [0] and outcome.refused[0].reason == problem
        for key, value in outcome.server_state.items():
            assert torch.equal(value, honest.upload.tensors[key])
    else:
        assert outcome.aggregated == [0, 1]
        assert all(bool(torch.isfinite(v).all()) for v in outcome.server_state.values())
