"""Transformer clients on tiny random BERTs of different depths: homogeneous PEFT adapters, PEFT's format,
exact phase freezing, and bad checkpoints."""

import json

import numpy as np
import peft
import pytest
import torch

from pfedlora.algorithms import ClientContext, create_algorithm
from pfedlora.config import ModelConfig, load_config
from pfedlora.data import build_client_data, make_partition
from pfedlora.errors import ConfigError
from pfedlora.metrics import FlopMeter
from pfedlora.models import build_model, check_homogeneous, is_adapter_key, tokenizer_for
from pfedlora.models.peft_lora import save_peft_adapter
from pfedlora.seeding import torch_generator
from pfedlora.simulation import TIMING_KEYS, read_run, run_experiment
from pfedlora.testing import SPECIAL_TOKENS, WORDS, tiny_bert, tiny_llama

DEPTHS = ["hf-l1", "hf-l2", "hf-l3"]


def _config(checkpoint, *overrides):
    return load_config(
        None,
        [
            "device=cpu",
            f"model.checkpoint={checkpoint}",
            "model.max_length=8",
            f"federation.architectures={','.join(DEPTHS)}",
            "federation.num_clients=3",
            "adapter.placement=layers",
            "adapter.rank=2",
            "train.batch_size=8",
            *overrides,
        ],
    )


def _algorithm(checkpoint, dataset, *overrides):
    return create_algorithm(_config(checkpoint, *overrides), dataset.input_shape, dataset.num_classes)


def test_adapter_targets_are_the_attention_projections_every_depth_shares_and_the_head(
    tiny_checkpoint, tiny_text
):
    algorithm = _algorithm(tiny_checkpoint, tiny_text)
    layer0 = "encoder.encoder.layer.0.attention.self"
    assert algorithm.targets == (f"{layer0}.query", f"{layer0}.key", f"{layer0}.value", "classifier")
    clients = {arch: algorithm.create_client(arch, torch_generator(0, arch)) for arch in DEPTHS}
    shared = {arch: algorithm.shared_state(client) for arch, client in clients.items()}
    check_homogeneous(shared)  # raises if any adapter tensor differs between depths
    assert len(shared["hf-l1"]) == 8 and all(is_adapter_key(k) for k in shared["hf-l1"])
    assert shared["hf-l3"]["local.classifier.lora_A.default.weight"].shape == (2, 16)


def test_a_fresh_adapter_leaves_the_outputs_unchanged(tiny_checkpoint, tiny_text):
    settings = ModelConfig(checkpoint=str(tiny_checkpoint), max_length=8)
    plain = build_model("hf-l2", tiny_text.input_shape, 3, torch_generator(0, "m"), settings)
    algorithm = _algorithm(tiny_checkpoint, tiny_text)
    adapted = algorithm.create_client("hf-l2", torch_generator(0, "m"))
    x = tiny_text.train_x[:5]
    with torch.no_grad():
        assert torch.allclose(plain(x), adapted(x), atol=1e-6)
    assert any(p.abs().sum() > 0 for n, p in adapted.named_parameters() if "lora_A" in n)


def test_the_adapter_saves_in_peft_format_and_loads_with_peft_onto_the_base_model(
    tmp_path, tiny_checkpoint, tiny_text
):
    algorithm = _algorithm(tiny_checkpoint, tiny_text)
    client = algorithm.create_client("hf-l2", torch_generator(0, "m"))
    with torch.no_grad():
        for name, parameter in client.named_parameters():
            if "lora_B" in name:
                parameter.normal_(generator=torch_generator(0, name))
    folder = save_peft_adapter(client, tmp_path / "adapter", algorithm.targets, 2, 4.0, prefix="local.")
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    settings = ModelConfig(checkpoint=str(tiny_checkpoint), max_length=8)
    base = build_model("hf-l2", tiny_text.input_shape, 3, torch_generator(0, "m"), settings)
    loaded = peft.PeftModel.from_pretrained(base, str(folder))
    x = tiny_text.train_x[:6]
    with torch.no_grad():
        expected = client(x)
        assert torch.allclose(loaded(x), expected, atol=1e-5)
        loaded.disable_adapter_layers()
        assert not torch.allclose(loaded(x), expected, atol=1e-4)  # the adapter is what made the difference


def _context(algorithm, dataset, client_id=0):
    config = algorithm.config
    partition = make_partition(
        "iid",
        dataset.train_y.numpy(),
        dataset.test_y.numpy(),
        3,
        np.random.default_rng(0),
        classes_per_client=1,
        alpha=1.0,
        min_train_samples=1,
    )
    data = build_client_data(dataset, partition, augment=False)[client_id]
    return ClientContext(
        client_id=client_id,
        arch=config.architecture_of(client_id),
        server_round=1,
        data=data,
        generator=torch_generator(0, "train", client_id),
        meter=FlopMeter(),
    )


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("trainable_layers", [-1, 1, 0])
def test_each_phase_changes_exactly_what_it_trains(tiny_checkpoint, tiny_text, trainable_layers):
    overrides = (f"model.trainable_layers={trainable_layers}", "train.lr=0.5")
    algorithm = _algorithm(tiny_checkpoint, tiny_text, *overrides)
    client = algorithm.create_client("hf-l3", torch_generator(0, "m"))
    ctx = _context(algorithm, tiny_text, client_id=2)
    before = _snapshot(client)
    algorithm.train_local_phase(client, ctx)
    after_local = _snapshot(client)
    changed = {k for k in before if not torch.equal(before[k], after_local[k])}
    assert changed and not any(is_adapter_key(k) for k in changed)
    if trainable_layers == -1:
        assert any("embeddings" in k for k in changed) and any("layer.0." in k for k in changed)
    else:
        allowed = [f"local.encoder.encoder.layer.{i}." for i in range(3 - trainable_layers, 3)]
        assert all(k.startswith(("local.classifier.", *allowed)) for k in changed), changed
        assert any(k.startswith("local.classifier.") for k in changed)
    algorithm.train_adapter_phase(client, ctx)
    after_adapter = _snapshot(client)
    changed = {k for k in before if not torch.equal(after_local[k], after_adapter[k])}
    assert changed and all(is_adapter_key(k) for k in changed)


def test_flops_of_attention_are_counted(tiny_checkpoint, tiny_text):
    algorithm = _algorithm(tiny_checkpoint, tiny_text)
    one, three = (algorithm.create_client(arch, torch_generator(0, arch)) for arch in ("hf-l1", "hf-l3"))
    ctx1, ctx3 = _context(algorithm, tiny_text, 0), _context(algorithm, tiny_text, 2)
    algorithm.train(one, algorithm.shared_state(one), ctx1)
    algorithm.train(three, algorithm.shared_state(three), ctx3)
    per_sample = [ctx.meter.total / ctx.meter.samples for ctx in (ctx1, ctx3)]
    assert per_sample[1] > 2 * per_sample[0] > 0


def test_a_checkpoint_that_does_not_exist_or_holds_no_transformer_is_refused(tmp_path, tiny_text):
    def build(checkpoint):
        settings = ModelConfig(checkpoint=checkpoint)
        return build_model("hf-l1", tiny_text.input_shape, 3, torch_generator(0, "m"), settings)

    with pytest.raises(ConfigError, match="no such directory"):
        build(str(tmp_path / "no"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match="is not a Hugging Face model"):
        build(str(tmp_path / "junk"))
    with pytest.raises(ConfigError, match=r"hf-l1.*needs model.checkpoint"):
        build("")


def test_too_deep_an_architecture_and_images_are_refused(tiny_checkpoint):
    settings = ModelConfig(checkpoint=str(tiny_checkpoint))
    with pytest.raises(ConfigError, match="has 3 layers"):
        build_model("hf-l5", (2, 8), 3, torch_generator(0, "m"), settings)
    with pytest.raises(ConfigError, match="reads text"):
        build_model("hf-l1", (1, 28, 28), 3, torch_generator(0, "m"), settings)
    with pytest.raises(ConfigError, match="architectures cnn1 read images"):
        tokenizer_for(["hf-l1", "cnn1"], settings)


def test_a_tokenizer_that_does_not_match_its_model_is_refused(tmp_path):
    folder = tiny_bert(tmp_path / "bad", extra_tokens=10)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == len(SPECIAL_TOKENS) + len(WORDS)
    with pytest.raises(ConfigError, match="tokenizer and model do not match"):
        tokenizer_for(["hf-l1"], ModelConfig(checkpoint=str(folder)))


def test_the_branch_placement_on_text_reads_the_family_s_tokens_and_starts_at_zero(
    tiny_checkpoint, tiny_text
):
    algorithm = _algorithm(tiny_checkpoint, tiny_text, "adapter.placement=branch")
    clients = {arch: algorithm.create_client(arch, torch_generator(0, arch)) for arch in DEPTHS}
    check_homogeneous({arch: algorithm.shared_state(client) for arch, client in clients.items()})
    x = tiny_text.train_x[:4]
    assert all(torch.equal(client(x), client.local(x)) for client in clients.values())
    assert sorted(algorithm.shared_state(clients["hf-l1"])) == sorted(
        f"lora_branch.{layer}.{kind}"
        for layer in ("fc_A", "fc_B", "proj_A", "proj_B")
        for kind in ("weight", "bias")
        if not (layer.endswith("_A") and kind == "bias")
    )


def test_explicit_targets_missing_from_a_depth_are_refused(tiny_checkpoint, tiny_text):
    target = "encoder.encoder.layer.2.attention.self.query"
    with pytest.raises(ConfigError, match=rf"'{target}' is not an adaptable layer of hf-l1, hf-l2"):
        _algorithm(tiny_checkpoint, tiny_text, f'adapter.targets=["{target}"]')


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
        "fedit",
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
def test_every_method_runs_a_round_on_transformer_clients(tmp_path, tiny_checkpoint, tiny_text, algorithm):
    archs = ["federation.architectures=hf-l2"] if algorithm == "fedit" else []
    config = _config(
        tiny_checkpoint,
        f"algorithm={algorithm}",
        *archs,
        "baselines.shared_arch=hf-l1",  # the key of earlier versions: FML's, FedKD's and FedAPEN's
        "pfedafm.shared_arch=hf-l1",
        "fedmrl.shared_arch=hf-l1",
        "federation.rounds=1",
        "federation.sample_fraction=1.0",
        "data.partition=by-source",
        "train.local_steps=2",
    )
    run_experiment(config, tmp_path / "run", dataset=tiny_text, workers=0)
    (record,), summary = read_run(tmp_path / "run")
    assert record["aggregated"] == [0, 1, 2] and not record["refused"]
    assert (record["bytes_up"] > 0) == (algorithm != "standalone") and record["train_flops"] > 0
    assert 0.0 <= summary["mean_accuracy_last"] <= 1.0


def test_fedit_refuses_clients_of_several_depths(tiny_checkpoint, tiny_text):
    with pytest.raises(ConfigError, match="fedit averages one adapter on one frozen base model"):
        _algorithm(tiny_checkpoint, tiny_text, "algorithm=fedit")


def test_dropout_is_off_and_metrics_are_the_same_for_one_and_two_workers(
    tmp_path, tiny_checkpoint, tiny_text
):
    settings = ModelConfig(checkpoint=str(tiny_checkpoint), max_length=8)
    model = build_model("hf-l2", tiny_text.input_shape, 3, torch_generator(0, "m"), settings)
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.0 for p in dropouts)
    overrides = ("federation.rounds=2", "federation.sample_fraction=0.7", "train.local_steps=2")
    config = _config(tiny_checkpoint, *overrides, "data.partition=iid")
    runs = []
    for workers in (1, 2):
        run_experiment(config, tmp_path / str(workers), dataset=tiny_text, workers=workers)
        records, _ = read_run(tmp_path / str(workers))
        runs.append([{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records])
    assert runs[0] == runs[1]


def test_a_decoder_family_runs_with_lora_on_the_attention_projections_its_depths_share(tmp_path, tiny_text):
    folder = tiny_llama(tmp_path / "llama")
    config = load_config(
        None,
        [
            "device=cpu",
            f"model.checkpoint={folder}",
            "model.max_length=8",
            "federation.architectures=hf-l1,hf-l3",
            "federation.num_clients=2",
            "federation.rounds=1",
            "federation.sample_fraction=1.0",
            "adapter.placement=layers",
            "adapter.rank=2",
            "train.local_steps=2",
            "train.batch_size=8",
            "data.partition=iid",
        ],
    )
    algorithm = create_algorithm(config, tiny_text.input_shape, tiny_text.num_classes)
    layer0 = "encoder.layers.0.self_attn"
    assert algorithm.targets == (f"{layer0}.q_proj", f"{layer0}.k_proj", f"{layer0}.v_proj", "classifier")
    run_experiment(config, tmp_path / "run", dataset=tiny_text, workers=0)
    (record,), _ = read_run(tmp_path / "run")
    assert record["aggregated"] == [0, 1] and record["bytes_up"] > 0
