"""Clients of two model families in one federation, on tiny random checkpoints (no download): a BERT (the
``hf`` family, hidden 16, word-level vocabulary) beside a Llama of another vocabulary, width and depth (a
family registered here). Tokenization per family, projections to one feature width, a text branch that is
the same network on every client, exact phase freezing, last-token pooling, and the bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pfedlora.algorithms import ALGORITHMS, ClientContext, create_algorithm
from pfedlora.cli import app
from pfedlora.config import load_config
from pfedlora.data.text import tokenize_corpus
from pfedlora.errors import ConfigError
from pfedlora.metrics import FlopMeter
from pfedlora.models import (
    FAMILIES,
    TextLoRABranch,
    build_model,
    check_homogeneous,
    family_tokenizer,
    model_settings,
    register_family,
    text_views,
)
from pfedlora.models.gguf import CONVERSION_NOTE, _damage, converted_checkpoint
from pfedlora.seeding import torch_generator
from pfedlora.simulation import federation, read_run, run_experiment
from pfedlora.testing import OWN_WORDS, tiny_corpus, tiny_llama, whole_client_data

LENGTH = 8
MIXED = ("hf-l1", "tinyllama-l2", "hf-l2", "tinyllama-l3")


@pytest.fixture(scope="session")
def tiny_llama_family(tmp_path_factory):
    folder = tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=3, hidden=24, own_tokenizer=True)
    if "tinyllama" not in FAMILIES:
        register_family("tinyllama", folder, layers=3, pooling="last", about="a tiny random Llama")
    return folder


def _config(checkpoint, *overrides, archs=MIXED):
    return load_config(
        None,
        [
            "device=cpu",
            f"model.checkpoint={checkpoint}",
            f"model.max_length={LENGTH}",
            f"federation.architectures={','.join(archs)}",
            "federation.num_clients=4",
            "federation.rounds=1",
            "federation.sample_fraction=1.0",
            "model.feature_dim=12",
            "adapter.rank=2",
            "train.batch_size=8",
            "train.local_steps=2",
            "data.partition=iid",
            *overrides,
        ],
    )


def _dataset(config):
    tokenizers = [family_tokenizer(family, config.model) for family in text_views(config)]
    return tokenize_corpus(tiny_corpus(), tokenizers, LENGTH)


def test_each_family_tokenizes_the_same_samples_with_its_own_tokenizer(tiny_checkpoint, tiny_llama_family):
    config = _config(tiny_checkpoint)
    assert text_views(config) == ("hf", "tinyllama")
    dataset = _dataset(config)
    corpus = tiny_corpus()
    assert dataset.train_x.shape == (len(corpus.train_texts), 4, LENGTH)
    assert torch.equal(dataset.train_y, corpus.train_y)
    bert, llama = (family_tokenizer(f, config.model) for f in ("hf", "tinyllama"))
    first = corpus.train_texts[0]
    for view, tokenizer in enumerate((bert, llama)):
        encoded = tokenizer(first, padding="max_length", truncation=True, max_length=LENGTH)
        assert dataset.train_x[0, 2 * view].tolist() == encoded["input_ids"]
        assert dataset.train_x[0, 2 * view + 1].tolist() == encoded["attention_mask"]
    assert not torch.equal(dataset.train_x[:, 0], dataset.train_x[:, 2])  # two vocabularies: other ids
    word = first.split()[0]
    assert dataset.train_x[0, 2, 0] == OWN_WORDS.index(word) + 4  # the Llama's own id of the first word


def test_mixed_widths_are_projected_to_one_feature_space_and_heads_share_one_shape(
    tiny_checkpoint, tiny_llama_family
):
    config = _config(tiny_checkpoint)
    settings = model_settings(config)
    assert settings.views == ("hf", "tinyllama") and settings.project_features
    dataset = _dataset(config)
    models = {
        arch: build_model(arch, dataset.input_shape, 3, torch_generator(0, arch), settings) for arch in MIXED
    }
    x = dataset.train_x[:5]
    for arch, model in models.items():
        assert model.features(x).shape == (5, 12), arch
        assert tuple(model.classifier.weight.shape) == (3, 12) and model.projection is not None
    one_family = model_settings(_config(tiny_checkpoint, archs=("hf-l1", "hf-l2")))
    assert one_family.views == ("hf",) and not one_family.project_features  # one width: no projection
    for name in ("lg-fedavg", "fedgh", "fedproto"):
        algorithm = create_algorithm(_config(tiny_checkpoint, f"algorithm={name}"), dataset.input_shape, 3)
        clients = {arch: algorithm.create_client(arch, torch_generator(0, arch)) for arch in MIXED}
        check_homogeneous({arch: algorithm.shared_state(client) for arch, client in clients.items()})


def test_last_token_pooling_reads_the_last_real_token(tiny_checkpoint, tiny_llama_family):
    config = _config(tiny_checkpoint)
    dataset = _dataset(config)
    model = build_model(
        "tinyllama-l2", dataset.input_shape, 3, torch_generator(0, "m"), model_settings(config)
    )
    assert model.pooling == "last" and model.view == 1
    x = dataset.train_x[:4]
    ids, mask = x[:, 2].long(), x[:, 3].long()
    hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    last = mask.sum(1) - 1  # right padding
    expected = model.projection(hidden[torch.arange(4), last])
    assert torch.allclose(model.features(x), expected)


@pytest.mark.parametrize("placement", ["branch", "head"])
def test_the_shared_adapter_is_one_network_across_families_and_a_fresh_one_changes_nothing(
    tiny_checkpoint, tiny_llama_family, placement
):
    config = _config(tiny_checkpoint, f"adapter.placement={placement}")
    dataset = _dataset(config)
    algorithm = create_algorithm(config, dataset.input_shape, 3)
    clients = {arch: algorithm.create_client(arch, torch_generator(0, arch)) for arch in MIXED}
    shared = {arch: algorithm.shared_state(client) for arch, client in clients.items()}
    check_homogeneous(shared)
    x = dataset.train_x[:6]
    for arch, client in clients.items():
        local = client.local(x)
        assert torch.equal(client(x), local), arch  # g (or B) starts at zero
    if placement == "branch":
        branch = clients["tinyllama-l3"].lora_branch
        assert isinstance(branch, TextLoRABranch) and branch.view == 0  # the first family's tokens, for all
        assert branch.embedding.data_ptr() == clients["hf-l1"].lora_branch.embedding.data_ptr()  # one copy
        assert not any("embedding" in key for key in shared["hf-l1"])  # never sent
        with torch.no_grad():  # the adapter matters once it is not zero
            branch.fc_B.weight.normal_(generator=torch.Generator().manual_seed(0))
        assert not torch.equal(clients["tinyllama-l3"](x), clients["tinyllama-l3"].local(x))


def test_phases_freeze_exactly_and_the_branch_phase_never_touches_the_private_model(
    tiny_checkpoint, tiny_llama_family
):
    config = _config(tiny_checkpoint, "adapter.placement=branch", "data.partition=iid")
    dataset = _dataset(config)
    algorithm = create_algorithm(config, dataset.input_shape, 3)
    data = whole_client_data(dataset)
    client = algorithm.create_client("tinyllama-l2", torch_generator(0, "c"))
    with torch.no_grad():
        client.lora_branch.fc_B.weight.fill_(0.1)  # so that the local phase sees a branch that matters
    ctx = ClientContext(0, "tinyllama-l2", 1, data, torch_generator(0, "t"), FlopMeter())

    def snapshot():
        return {k: v.clone() for k, v in client.state_dict().items()}

    before = snapshot()
    algorithm.train_local_phase(client, ctx)
    after_local = snapshot()
    for key, value in before.items():
        moved = not torch.equal(value, after_local[key])
        assert moved == (key.startswith("local.") and client.get_parameter(key).requires_grad), key
    algorithm.train_adapter_phase(client, ctx)
    after_adapter = snapshot()
    for key, value in after_local.items():
        assert torch.equal(value, after_adapter[key]) != key.startswith("lora_branch."), key


@pytest.mark.parametrize(
    "algorithm",
    [
        "pfedlora",
        "standalone",
        "lg-fedavg",
        "fedgh",
        "fedproto",
        "fml",
        "fedkd",
        "fedapen",
        "fd",
        "fedtgp",
        "fedgen",
        "fedssa",
        "pfedafm",
        "fedmrl",
        "fedl2g-feat",
        "fedl2g-logit",
    ],
)
def test_every_method_runs_a_round_on_a_mixed_federation(
    tmp_path, tiny_checkpoint, tiny_llama_family, algorithm
):
    assert algorithm in ALGORITHMS
    config = _config(
        tiny_checkpoint,
        f"algorithm={algorithm}",
        "baselines.shared_arch=tinyllama-l1",
        "pfedafm.shared_arch=tinyllama-l1",
        "fedmrl.shared_arch=tinyllama-l1",
    )
    run_experiment(config, tmp_path / "run", dataset=_dataset(config), workers=0)
    (record,), summary = read_run(tmp_path / "run")
    assert record["aggregated"] == [0, 1, 2, 3] and not record["refused"]
    assert set(summary["mean_accuracy_last_by_architecture"]) == set(MIXED)


def test_layers_across_families_that_share_no_layer_is_refused_naming_them(
    tiny_checkpoint, tiny_llama_family
):
    config = _config(tiny_checkpoint, "adapter.placement=layers")
    with pytest.raises(ConfigError, match=r"families hf, tinyllama share no layer of one name and shape"):
        create_algorithm(config, _dataset(config).input_shape, 3)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["adapter.placement=layers"], "the families hf, tinyllama share no layer of one name and shape"),
        (["model.feature_dim=0"], "model.feature_dim: 0 is out of range"),
        (["model.feature_dim=-4"], "model.feature_dim: -4 is out of range"),
        (["adapter.branch_family=nosuch"], "adapter.branch_family: 'nosuch' is unknown"),
        (["model.pooling=max"], "model.pooling"),
    ],
)
def test_bad_mixed_input_is_one_line_exit_2_and_nothing_written(
    tmp_path, monkeypatch, tiny_checkpoint, tiny_llama_family, overrides, fragment
):
    config = _config(tiny_checkpoint)
    dataset = _dataset(config)
    monkeypatch.setattr(federation, "load_run_dataset", lambda *args, **kwargs: dataset)
    base = [
        f"model.checkpoint={tiny_checkpoint}",
        f"model.max_length={LENGTH}",
        f"federation.architectures={','.join(MIXED)}",
        "federation.num_clients=4",
        "data.dataset=kjv",
    ]
    out = tmp_path / "run"
    args = ["run", "-q", "--out", str(out), *(a for o in [*base, *overrides] for a in ("--set", o))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert fragment in " ".join(result.stderr.split())
    assert not out.exists()


def test_a_converted_folder_is_checked_against_its_digests(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    from pfedlora.simulation.results import file_digest

    note = {"files": {"model.safetensors": file_digest(folder / "model.safetensors")}}
    (folder / CONVERSION_NOTE).write_text(json.dumps(note))
    assert _damage(folder) is None
    (folder / "model.safetensors").write_bytes(b"weightz")
    assert _damage(folder) == "model.safetensors differs from the SHA-256 it was written with"
    (folder / "model.safetensors").unlink()
    assert _damage(folder) == "model.safetensors is missing"


def test_a_missing_or_unreadable_gguf_or_a_missing_gguf_package_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"GGUF checkpoint .*nothing\.gguf': no such file"):
        converted_checkpoint(tmp_path / "nothing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF but not really")
    monkeypatch.setattr("pfedlora.models.gguf.GGUF_CACHE", tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"junk\.gguf: not a GGUF model transformers can read"):
        converted_checkpoint(junk)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a)
    )
    junk.write_bytes(b"another version of it")
    with pytest.raises(ConfigError, match=r"needs the `gguf` package: pip install 'pfedlora\[llm\]'"):
        converted_checkpoint(junk)
