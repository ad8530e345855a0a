import tomllib
from dataclasses import dataclass

import pytest

from pfedlora.config import (
    AlgorithmOptions,
    ExperimentConfig,
    config_from_dict,
    config_to_toml,
    flat_config,
    load_config,
    load_run_config,
    option,
    run_config_from_dict,
    with_options,
)
from pfedlora.errors import ConfigError


def test_defaults_are_valid_and_match_an_empty_load():
    assert load_config() == ExperimentConfig()


def test_file_then_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('seed = 3\n[train]\nlr = 0.1\nbatch_size = 32\n[adapter]\ntargets = ["fc3"]\n')
    config = load_config(
        path, ["train.lr=0.05", "federation.architectures=cnn1,cnn5", "adapter.placement=layers"]
    )
    assert config.seed == 3
    assert config.train.lr == 0.05  # the override wins over the file
    assert config.train.batch_size == 32
    assert config.federation.architectures == ("cnn1", "cnn5")
    assert config.adapter.targets == ("fc3",)
    assert config.adapter.placement == "layers"


def test_toml_round_trip():
    config = load_config(
        None, ["adapter.rank=4", "federation.architectures=cnn2,cnn3", "data.download=false"]
    )
    assert config_from_dict(tomllib.loads(config_to_toml(config))) == config


def test_derived_defaults():
    config = load_config(None, ["adapter.rank=4", "train.lr=0.2"])
    assert config.adapter.effective_alpha == 8.0
    assert config.adapter_lr == 0.2
    config = load_config(None, ["adapter.alpha=3", "adapter.lr=0.5"])
    assert config.adapter.effective_alpha == 3.0
    assert config.adapter_lr == 0.5
    assert [config.architecture_of(i) for i in (0, 4, 5, 7)] == ["cnn1", "cnn5", "cnn1", "cnn3"]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("nope=1", "unknown key 'nope'"),
        ("train.lrr=1", "unknown key 'train.lrr'; allowed keys here: train.batch_size"),
        ("train.lr=-1", "train.lr: -1.0 is out of range; allowed: (0, inf)"),
        (
            "federation.sample_fraction=1.5",
            "federation.sample_fraction: 1.5 is out of range; allowed: (0, 1]",
        ),
        ("train.batch_size=1.5", "train.batch_size: expected an integer, got 1.5"),
        ("seed=true", "seed: expected an integer, got True"),
        ("algorithm=fedx", "algorithm: unknown value 'fedx'; allowed: pfedlora, standalone, lg-fedavg"),
        (
            "data.dataset=mnist",
            "data.dataset: unknown value 'mnist'; allowed: fashion-mnist, cifar10, cifar100",
        ),
        ("federation.architectures=cnn1,cnn9", "federation.architectures: unknown value 'cnn9'"),
        ("adapter.phase_order=random", "allowed: local-first, adapter-first"),
        ("train=3", "train: expected a section"),
        ("train.lr", "is not of the form key=value"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_targets_with_the_branch_placement_are_refused():
    with pytest.raises(ConfigError, match=r"applies only to adapter\.placement"):
        load_config(None, ["adapter.placement=branch", 'adapter.targets=["fc3"]'])
    assert load_config(None, ["adapter.placement=layers", 'adapter.targets=["fc3"]']).adapter.targets == (
        "fc3",
    )


def test_nothing_to_train_is_refused():
    with pytest.raises(ConfigError, match="both 0"):
        load_config(None, ["train.local_epochs=0", "adapter.epochs=0"])


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize(
    "override",
    ["train.lr=nan", "train.lr=inf", "adapter.alpha=nan", "privacy.clip_norm=nan", "train.grad_clip=-inf"],
)
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match=rf"^{override.split('=')[0]}: .* is not a finite number"):
        load_config(None, [override])


def test_schedules_that_can_never_aggregate_are_refused(caplog):
    with pytest.raises(ConfigError, match=r"min_clients = 11 exceeds the 10 client\(s\) sampled per round"):
        load_config(None, ["federation.min_clients=11"])
    assert load_config(None, ["federation.min_clients=10"]).federation.min_clients == 10
    with pytest.raises(ConfigError, match=r"drop_rate = 1: every sampled client would drop out"):
        load_config(None, ["federation.drop_rate=1"])
    with caplog.at_level("WARNING", logger="pfedlora.config"):
        load_config(None, ["federation.drop_rate=0.9", "federation.min_clients=2"])
    assert "leaves 1.0 of 10 sampled clients per round on average" in caplog.text


def test_a_run_written_before_a_key_existed_reads_as_what_it_did(tmp_path):
    # Runs written before train.sgd_kernel trained with the foreach kernel; new runs default to fused.
    old = tomllib.loads(config_to_toml(ExperimentConfig()))
    del old["train"]["sgd_kernel"]
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(config_from_dict(old)).replace('sgd_kernel = "fused"\n', ""))
    assert "sgd_kernel" not in path.read_text()
    assert load_run_config(path).train.sgd_kernel == "foreach"
    assert run_config_from_dict(old).train.sgd_kernel == "foreach"
    assert load_config(path).train.sgd_kernel == "fused"  # a user's file: today's default
    path.write_text(config_to_toml(ExperimentConfig()))
    assert load_run_config(path).train.sgd_kernel == "fused"  # a run that names its kernel keeps it


def test_a_malformed_run_config_is_a_config_error_not_a_crash():
    with pytest.raises(ConfigError):
        run_config_from_dict({"train": 5})


def test_each_algorithm_owns_its_options():
    config = load_config(None, ["fml.alpha=0.3", "fedproto.lambda=2", "fedkd.shared_arch=cnn3"])
    assert config.options["fml"].alpha == 0.3 and config.options["fml"].beta == 0.5
    assert config.options["fedproto"].lambda_ == 2.0
    assert config.options["fedkd"].shared_arch == "cnn3" and config.options["fml"].shared_arch == "cnn5"
    assert config.algorithm_options == ExperimentConfig().algorithm_options  # pfedlora has none
    assert with_options(config, "fml", beta=0.1).options["fml"].beta == 0.1
    text = config_to_toml(config)
    assert "[fml]\n" in text and "[fedproto]\nlambda = 2.0\n" in text and "[fedapen]" not in text
    assert config_from_dict(tomllib.loads(text)) == config
    assert "fedproto.lambda" in flat_config(config)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("fml.gamma=1", "unknown key 'fml.gamma'; allowed keys here: fml.shared_arch, fml.kl_reduction"),
        ("fml.alpha=1.5", "fml.alpha: 1.5 is out of range; allowed: [0, 1]"),
        ("fedgh.server_lr=0", "fedgh.server_lr: 0.0 is out of range; allowed: (0, inf)"),
        ("fedapen.kl_reduction=sum", "fedapen.kl_reduction: unknown value 'sum'; allowed: batchmean, mean"),
        ("fedkd.shared_arch=cnn9", "fedkd.shared_arch: unknown value 'cnn9'; allowed: cnn1"),
        ("fedkd.energy_start=0.99", "fedkd.energy_start (0.99) must not exceed fedkd.energy_end (0.98)"),
        ("fml=3", "fml: expected a section (table) of fml's options"),
        ("nope=1", "sections of an algorithm's options: fml, fedkd, fedgh"),
    ],
)
def test_bad_options_name_the_key_and_what_is_allowed(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_the_baselines_section_of_earlier_versions_still_reads(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        'algorithm = "fedkd"\n[baselines]\nshared_arch = "cnn4"\nkl_reduction = "mean"\nfml_alpha = 0.25\n'
        "fedkd_energy_start = 0.9\nfedproto_lambda = 1.0\nfedapen_lambda_lr = 0.1\n"
    )
    config = load_run_config(path)
    assert {config.options[name].shared_arch for name in ("fml", "fedkd", "fedapen")} == {"cnn4"}
    assert config.options["fedapen"].kl_reduction == "mean" and config.options["fml"].alpha == 0.25
    assert config.options["fedkd"].energy_start == 0.9 and config.options["fedproto"].lambda_ == 1.0
    assert config.options["fedapen"].lambda_lr == 0.1
    assert load_config(None, ["baselines.fml_beta=0.2"]).options["fml"].beta == 0.2  # old commands too
    assert load_config(path).options == config.options
    with pytest.raises(ConfigError, match=r"baselines.fml_alpha = 0.2 and fml.alpha = 0.3 disagree"):
        load_config(None, ["baselines.fml_alpha=0.2", "fml.alpha=0.3"])
    with pytest.raises(ConfigError, match=r"unknown key 'baselines.fml_gamma'; the \[baselines\] section"):
        load_config(None, ["baselines.fml_gamma=0.2"])


def test_an_algorithm_registered_with_options_gets_a_section(monkeypatch):
    from pfedlora.algorithms import ALGORITHMS
    from pfedlora.algorithms.standalone import Standalone

    @dataclass(frozen=True)
    class ToyOptions(AlgorithmOptions):
        temperature: float = option(1.0, low=0, low_inclusive=False)

    class Toy(Standalone):
        name = "toy"
        options_type = ToyOptions

    monkeypatch.setitem(ALGORITHMS._entries, "toy", Toy)
    config = load_config(None, ["algorithm=toy", "toy.temperature=2"])
    assert config.algorithm_options == ToyOptions(2.0)
    with pytest.raises(ConfigError, match=r"toy.temperature: -1.0 is out of range"):
        load_config(None, ["toy.temperature=-1"])
