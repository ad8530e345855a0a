"""What a run leaves for use: the final global adapter in PEFT's format in the run directory, and one client's
personalized model exported into a folder that pfedlora rebuilds and transformers + PEFT load."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from typer.testing import CliRunner

from pfedlora.cli import app
from pfedlora.config import load_config
from pfedlora.export import load_client
from pfedlora.models import build_model, model_settings
from pfedlora.seeding import torch_generator
from pfedlora.simulation import run_experiment
from pfedlora.simulation.experiment import final_state
from pfedlora.testing import tiny_bert, tiny_text_dataset

runner = CliRunner()


def _text_config(checkpoint, *overrides):
    return load_config(
        None,
        [
            "device=cpu",
            f"model.checkpoint={checkpoint}",
            "model.max_length=8",
            "federation.architectures=hf-l1,hf-l2",
            "federation.num_clients=3",
            "federation.rounds=3",
            "federation.checkpoint_every=2",
            "federation.sample_fraction=1.0",
            "adapter.placement=layers",
            "adapter.rank=2",
            "train.batch_size=8",
            "train.local_steps=2",
            "data.partition=iid",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    checkpoint = tiny_bert(folder / "tiny-bert")
    config, dataset = _text_config(checkpoint), tiny_text_dataset()
    run_experiment(config, folder / "run", dataset=dataset, workers=1)  # one thread, as the rebuild
    return folder / "run", config, dataset


def _peft_factors(model):
    return {
        name.split("base_model.model.", 1)[-1].replace(".default", ""): tensor
        for name, tensor in model.state_dict().items()
        if "lora_" in name
    }


def test_a_run_with_a_peft_adapter_writes_the_global_adapter_that_peft_loads_onto_any_depth(text_run):
    run_dir, config, dataset = text_run
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    server_state = final_state(run_dir, dataset).federation.server_state
    for arch in ("hf-l1", "hf-l2"):
        base = build_model(
            arch, dataset.input_shape, dataset.num_classes, torch_generator(0, arch), model_settings(config)
        )
        loaded = peft.PeftModel.from_pretrained(base, str(run_dir / "adapter"))
        factors = _peft_factors(loaded)
        expected = {k.removeprefix("local.").replace(".default", ""): v for k, v in server_state.items()}
        assert factors.keys() == expected.keys()
        assert all(torch.equal(factors[k], expected[k]) for k in factors)


def test_a_branch_run_writes_no_peft_adapter(tmp_path, tiny_dataset, tiny_config):
    run_experiment(tiny_config("adapter.placement=branch"), tmp_path / "run", dataset=tiny_dataset)
    assert not (tmp_path / "run" / "adapter").exists()
    run_experiment(tiny_config("adapter.placement=layers"), tmp_path / "layers", dataset=tiny_dataset)
    assert (tmp_path / "layers" / "adapter" / "adapter_model.safetensors").is_file()  # CNN LoRA is PEFT's


def test_an_exported_text_client_predicts_as_in_the_run_and_loads_in_transformers_and_peft(
    text_run, tmp_path, monkeypatch
):
    run_dir, _, dataset = text_run
    monkeypatch.setattr("pfedlora.export.load_run_dataset", lambda *args, **kwargs: dataset)
    result = runner.invoke(app, ["export", str(run_dir), "--client", "1", "--out", str(tmp_path / "c1")])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "c1"
    exported = load_client(folder)
    assert exported.about["architecture"] == "hf-l2" and exported.about["round"] == 3
    assert (
        exported.about["rebuilt_from_checkpoint_of_round"] == 2 and exported.about["rebuilt_matches_the_run"]
    )
    final = final_state(run_dir, dataset).federation
    client = final.client_states.view(1)
    x = dataset.test_x[:10]
    assert torch.equal(exported.predict(x), final.algorithm.predict(client, x).argmax(1))

    encoder = transformers.AutoModel.from_pretrained(str(folder / "encoder"))
    adapted = peft.PeftModel.from_pretrained(encoder, str(folder / "encoder-adapter")).eval()
    ids, mask = x[:, 0].long(), x[:, 1].long()
    with torch.no_grad():
        expected = client.local.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        got = adapted(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder / "encoder"))
    assert (
        tokenizer("in the beginning")["input_ids"] == exported.encode(["in the beginning"])[0, 0, :5].tolist()
    )


def test_an_export_of_a_client_that_does_not_exist_is_one_line(text_run, tmp_path):
    run_dir, _, _ = text_run
    result = runner.invoke(app, ["export", str(run_dir), "--client", "7", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "--client 7 is out of range; allowed: 0 to 2" in " ".join(result.stderr.split())
    assert not (tmp_path / "x").exists()
