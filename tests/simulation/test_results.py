from pathlib import Path

import pytest

from pfedlora.config import ExperimentConfig
from pfedlora.errors import ConfigError
from pfedlora.simulation.results import CONFIG_FILE, RunWriter


def test_a_run_directory_is_claimed_by_exactly_one_writer(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = RunWriter(out, ExperimentConfig())
    # The second writer looked before the first one wrote anything: the emptiness check cannot see it.
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(()))
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        RunWriter(out, ExperimentConfig(seed=1))
    first.close()
    assert "seed = 0" in (out / CONFIG_FILE).read_text()


def test_an_existing_empty_directory_can_be_used(tmp_path):
    RunWriter(tmp_path, ExperimentConfig()).close()
    assert (tmp_path / CONFIG_FILE).is_file()
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        RunWriter(tmp_path, ExperimentConfig())
