"""Language-model clients on a tiny random causal Llama (no download): the task's loss and figures, one frozen
base per process with a client's state its adapters, exact phase freezing, PEFT's format, a whole run, and
the bad inputs."""

from __future__ import annotations

import functools
import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

from pfedlora.algorithms import ClientContext, create_algorithm
from pfedlora.cli import app
from pfedlora.data.text import tokenize_corpus
from pfedlora.errors import ConfigError
from pfedlora.metrics import FlopMeter
from pfedlora.models import causal_lm, family_tokenizer
from pfedlora.models.causal_lm import LanguageModelClient, build_language_model, frozen_causal_lm
from pfedlora.seeding import torch_generator
from pfedlora.simulation import read_run, run_experiment
from pfedlora.tasks import IGNORE, LANGUAGE_MODELING, TASKS, next_token_targets
from pfedlora.testing import tiny_corpus, whole_client_data

from .conftest import LM_LENGTH as LENGTH
from .conftest import lm_config

ARCHS = ("hf-r2", "hf-r4")


def _config(checkpoint, *overrides):
    return lm_config(checkpoint, "train.lr=0.05", *overrides)


def _dataset(config):
    return tokenize_corpus(tiny_corpus(), [family_tokenizer("hf", config.model)], LENGTH)


def _batch(config, n=6):
    return _dataset(config).train_x[:n]


def test_the_loss_is_next_token_cross_entropy_without_padding_as_transformers_computes_it(causal_llama):
    config = _config(causal_llama)
    x = _batch(config)
    assert (x[:, 1] == 0).any()  # some padding to exclude
    base = frozen_causal_lm(str(causal_llama))
    ids, mask = x[:, 0].long(), x[:, 1].long()
    labels = ids.masked_fill(mask == 0, IGNORE)
    with torch.no_grad():
        out = base(input_ids=ids, attention_mask=mask, labels=labels)
    task = TASKS["language-modeling"]
    assert task is LANGUAGE_MODELING and task.metric == "perplexity"
    loss = task.loss(out.logits, x, torch.zeros(len(x), dtype=torch.long))
    torch.testing.assert_close(loss, out.loss)
    hits, tokens, nll = task.counts(out.logits, x, torch.zeros(len(x))).tolist()
    assert tokens == int(mask[:, 1:].sum())
    assert nll / tokens == pytest.approx(out.loss.item(), rel=1e-5)
    logits, targets = next_token_targets(out.logits, x)
    valid = targets != IGNORE
    assert hits == int((logits.argmax(-1)[valid] == targets[valid]).sum())


def test_the_head_on_real_tokens_alone_gives_the_loss_and_counts_of_the_whole_logits(causal_llama):
    config = _config(causal_llama)
    client = create_algorithm(config, (2, LENGTH), 3).create_client("hf-r4", torch_generator(0, "c"))
    with torch.no_grad():  # nonzero adapters, so that the hooks matter
        for p in client.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x, y = _batch(config), torch.zeros(6, dtype=torch.long)
    task = LANGUAGE_MODELING
    with torch.no_grad():
        logits = client(x)
        torch.testing.assert_close(task.batch_loss(client, x, y), task.loss(logits, x, y))
        torch.testing.assert_close(
            task.batch_counts(client, client, x, y), task.counts(logits, x, y), rtol=1e-5, atol=1e-4
        )


def test_bf16_training_keeps_the_frozen_base_in_bf16(causal_llama):
    config = _config(causal_llama, "train.precision=bf16")
    client = create_algorithm(config, (2, LENGTH), 3).create_client("hf-r2", torch_generator(0, "c"))
    assert client.base().dtype == torch.bfloat16 and client.base() is not frozen_causal_lm(str(causal_llama))
    assert all(p.dtype == torch.float32 for p in client.parameters())  # the adapters train in fp32


@pytest.mark.parametrize(("amx", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_keeps_the_base_in_bf16_only_where_bf16_is_fast(causal_llama, monkeypatch, amx, dtype):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    config = _config(causal_llama, "train.precision=auto", "device=cpu")
    assert create_algorithm(config, (2, LENGTH), 3).base_dtype == dtype


def test_clients_are_scored_on_at_most_max_eval_samples(causal_llama, tmp_path):
    from pfedlora.simulation.federation import partition_clients

    config = _config(causal_llama, "data.max_eval_samples=3")
    capped = partition_clients(config, _dataset(config))
    full = partition_clients(_config(causal_llama), _dataset(config))
    assert all(
        len(t) == min(3, len(f)) and set(t) <= set(f) for t, f in zip(capped.test, full.test, strict=True)
    )
    assert all((a == b).all() for a, b in zip(capped.train, full.train, strict=True))  # training unchanged


def test_a_fresh_client_predicts_what_the_frozen_base_predicts_and_holds_only_its_adapters(causal_llama):
    config = _config(causal_llama)
    algorithm = create_algorithm(config, (2, LENGTH), 3)
    x = _batch(config)
    base = frozen_causal_lm(str(causal_llama))
    with torch.no_grad():
        expected = base(input_ids=x[:, 0].long(), attention_mask=x[:, 1].long()).logits
    clients = [algorithm.create_client(arch, torch_generator(0, arch)) for arch in ARCHS]
    for client in clients:
        assert isinstance(client, LanguageModelClient)
        with torch.no_grad():
            torch.testing.assert_close(client(x), expected)  # B = 0: the adapters change nothing yet
        assert client.base() is base  # one frozen model per process, shared by every client
        keys = set(client.state_dict())
        assert all(k.startswith(("private.", "adapter.")) for k in keys), keys
        assert not any("embed_tokens" in k or "lm_head" in k for k in keys)
    r2, r4 = (c.private.get_submodule("model.layers.0.self_attn.q_proj") for c in clients)
    assert r2.A.shape == (2, 16) and r4.A.shape == (4, 16)  # the private ranks differ by architecture
    shared = [{k: v.shape for k, v in algorithm.shared_state(c).items()} for c in clients]
    assert shared[0] == shared[1] and len(shared[0]) == 2 * 2 * 2  # q, v of 2 layers, A and B: one shape
    assert all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in shared[0])
    state_bytes = sum(t.numel() * t.element_size() for t in clients[1].state_dict().values())
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    assert state_bytes < base_bytes / 4


def test_each_phase_trains_its_own_adapter_alone(causal_llama):
    config = _config(causal_llama)
    algorithm = create_algorithm(config, (2, LENGTH), 3)
    client = algorithm.create_client("hf-r2", torch_generator(0, "c"))
    data = whole_client_data(_dataset(config))
    ctx = ClientContext(0, "hf-r2", 1, data, torch_generator(0, "t"), FlopMeter(), LANGUAGE_MODELING)
    base_before = {k: v.clone() for k, v in frozen_causal_lm(str(causal_llama)).state_dict().items()}

    def snapshot(prefix):
        return {k: v.clone() for k, v in client.state_dict().items() if k.startswith(prefix)}

    private, shared = snapshot("private."), snapshot("adapter.")
    algorithm.train_local_phase(client, ctx)
    assert all(torch.equal(v, snapshot("adapter.")[k]) for k, v in shared.items())
    assert any(not torch.equal(v, snapshot("private.")[k]) for k, v in private.items())
    private = snapshot("private.")
    algorithm.train_adapter_phase(client, ctx)
    assert all(torch.equal(v, snapshot("private.")[k]) for k, v in private.items())
    assert any(not torch.equal(v, snapshot("adapter.")[k]) for k, v in shared.items())
    after = frozen_causal_lm(str(causal_llama)).state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())  # the base never trains


def test_a_batch_runs_packed_in_one_row_with_the_logits_of_the_padded_batch(causal_llama):
    config = _config(causal_llama)
    client = build_language_model(
        "hf-r2", create_algorithm(config, (2, LENGTH), 3).model_settings, torch_generator(0, "c")
    )
    with torch.no_grad():  # nonzero B: the adapters take part
        for p in client.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = _batch(config)
    assert (x[:, 1] == 0).any() and client.runs_packed(x)
    with torch.no_grad():
        packed, targets = client.next_token_logits(x)
        client.packed_tokens = 0  # too many real tokens to pack: padded
        assert not client.runs_packed(x)
        padded, padded_targets = client.next_token_logits(x)
    assert torch.equal(targets, padded_targets)
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)


def test_a_model_that_attends_across_packed_samples_runs_padded(causal_llama, monkeypatch):
    base = frozen_causal_lm(str(causal_llama))
    decoder = base.model
    monkeypatch.setattr(  # a decoder that ignores position_ids: packed samples would see each other
        decoder, "forward", functools.partial(_without_positions, type(decoder).forward.__get__(decoder))
    )
    monkeypatch.delitem(causal_lm._PACKS, base, raising=False)
    try:
        assert not causal_lm.packs_sequences(base)
    finally:
        causal_lm._PACKS.pop(base, None)


def _without_positions(forward, **kwargs):
    kwargs.pop("position_ids", None)
    return forward(**kwargs)


class _EveryStepCounted(FlopMeter):
    """Counts every step under the FLOP counter: the reference the meter's charges must equal."""

    def run(self, kind, num_samples, step, items=None, probe=None, fit=None):
        result, flops = self._counted(step, probe)
        self.total += flops
        self.samples += num_samples
        return result


def test_a_language_model_is_charged_what_counting_every_step_gives_with_few_steps_counted(causal_llama):
    config = _config(causal_llama, "train.batch_size=2", "train.local_steps=12")
    algorithm = create_algorithm(config, (2, LENGTH), 3)
    data = whole_client_data(_dataset(config))
    totals, counted, short = [], [], []
    for meter in (FlopMeter(), _EveryStepCounted()):
        client = algorithm.create_client("hf-r2", torch_generator(0, "c"))
        ctx = ClientContext(0, "hf-r2", 1, data, torch_generator(0, "t"), meter, LANGUAGE_MODELING)
        algorithm.train_local_phase(client, ctx)
        algorithm.train_adapter_phase(client, ctx)
        totals.append(meter.total)
        counted.append(meter.counted_steps)
        short.append(meter.counted_short)
    assert totals[0] == totals[1]
    # Per phase: three copies of the first batch cut short give the parabola, the first full step checks it
    assert counted == [2 * 1, 2 * 12] and short == [2 * 3, 0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_which_steps_are_counted_changes_no_result(causal_llama, precision):
    # The FLOP counter's dispatch rounds a backward differently: a process that counts a step (its first of
    # a kind) must train as one that counts none, so that results do not depend on the worker a client meets.
    overrides = ("train.batch_size=2", "train.local_steps=6", f"train.precision={precision}")
    config = _config(causal_llama, *overrides)
    algorithm = create_algorithm(config, (2, LENGTH), 3)
    data = whole_client_data(_dataset(config))

    def trained(meter):
        client = algorithm.create_client("hf-r2", torch_generator(0, "c"))
        ctx = ClientContext(0, "hf-r2", 1, data, torch_generator(0, "t"), meter, LANGUAGE_MODELING)
        algorithm.train_local_phase(client, ctx)
        algorithm.train_adapter_phase(client, ctx)
        return client.state_dict()

    warm = FlopMeter()
    trained(warm)  # every step of this client's kinds and token counts is now charged without counting
    counted_before = warm.counted_steps
    uncounted = trained(warm)
    assert warm.counted_steps == counted_before
    counted = trained(FlopMeter())
    assert all(torch.equal(counted[k], uncounted[k]) for k in counted)


def test_both_adapters_load_with_peft_onto_the_base_and_predict_as_the_client(causal_llama, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = _config(causal_llama)
    client = build_language_model(
        "hf-r4",
        create_algorithm(config, (2, LENGTH), 3).model_settings,
        torch_generator(1, "c"),
        shared_rank=2,
    )
    with torch.no_grad():  # nonzero B everywhere, so that both adapters change the logits
        for p in client.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    folders = client.save_peft(tmp_path / "peft")
    assert set(folders) == {"private", "adapter"}
    x = _batch(config)
    base = transformers.AutoModelForCausalLM.from_pretrained(causal_llama)
    model = peft.PeftModel.from_pretrained(base, folders["private"], adapter_name="private")
    model.load_adapter(folders["adapter"], adapter_name="adapter")
    model.base_model.set_adapter(["private", "adapter"])
    with torch.no_grad():
        expected = model(input_ids=x[:, 0].long(), attention_mask=x[:, 1].long()).logits
        torch.testing.assert_close(client(x), expected, rtol=1e-4, atol=1e-5)
        fresh = frozen_causal_lm(str(causal_llama))(input_ids=x[:, 0].long()).logits
        assert not torch.allclose(client(x), fresh)


def test_a_text_batch_is_shortened_to_each_samples_first_tokens(causal_llama):
    x = _batch(_config(causal_llama))
    short = LANGUAGE_MODELING.shortened(x, 3)
    assert short.shape == x.shape and short.dtype == x.dtype
    lengths = x[:, 1].sum(dim=1)
    assert torch.equal(short[:, 1].sum(dim=1), lengths.clamp(max=3))
    assert torch.equal(short[:, 0, :3] * short[:, 1, :3], x[:, 0, :3] * short[:, 1, :3])
    with pytest.raises(ValueError, match="'classification' has no text batches"):
        TASKS["classification"].shortened(x, 3)


def test_a_run_records_each_clients_perplexity_and_writes_the_global_adapter(causal_llama, tmp_path):
    config = _config(causal_llama)
    summary = run_experiment(config, tmp_path / "run", dataset=_dataset(config), workers=0)
    records, written = read_run(tmp_path / "run")
    assert written == summary
    evaluated = [r for r in records if "mean_perplexity" in r]
    assert len(evaluated) == 2
    last = evaluated[-1]
    perplexities = [p for p in last["client_perplexities"] if p is not None]
    assert len(last["client_perplexities"]) == 4 and perplexities
    assert last["mean_perplexity"] == pytest.approx(sum(perplexities) / len(perplexities))
    assert all(1 < p < 200 for p in perplexities)  # a vocabulary of a few dozen words
    assert summary["task"] == "language-modeling"
    assert summary["mean_perplexity_last"] == pytest.approx(last["mean_perplexity"])
    assert set(summary["mean_perplexity_last_by_architecture"]) == set(ARCHS)
    assert summary["bytes_total"] > 0  # the shared adapter travels
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and "q_proj" in str(adapter["target_modules"])
    alone = run_experiment(
        _config(causal_llama, "algorithm=standalone"), tmp_path / "alone", dataset=_dataset(config), workers=0
    )
    assert alone["bytes_total"] == 0 and math.isfinite(alone["mean_perplexity_last"])
    base = run_experiment(
        _config(causal_llama, "algorithm=zero-shot"), tmp_path / "base", dataset=_dataset(config), workers=0
    )
    assert base["bytes_total"] == 0 and base["train_flops_total"] == 0
    first = read_run(tmp_path / "base")[0]
    assert first[0]["client_perplexities"] == first[-1]["client_perplexities"]  # nothing trains
    assert alone["mean_perplexity_last"] < base["mean_perplexity_last"]  # its own text: training pays


def test_the_zero_shot_base_is_scored_once_and_its_figures_repeat(causal_llama, tmp_path, monkeypatch):
    from pfedlora.simulation.local import LocalClients

    scored = []
    evaluate_counts = LocalClients.evaluate_counts

    def counting(self, *args, **kwargs):
        scored.append(self.federation.algorithm.name)
        return evaluate_counts(self, *args, **kwargs)

    monkeypatch.setattr(LocalClients, "evaluate_counts", counting)
    for method in ("zero-shot", "standalone"):
        config = _config(causal_llama, f"algorithm={method}", "federation.rounds=3")
        run_experiment(config, tmp_path / method, dataset=_dataset(config), workers=0)
    assert scored.count("standalone") == 3 and scored.count("zero-shot") == 1  # nothing to rescore
    records = [r for r in read_run(tmp_path / "zero-shot")[0] if "mean_perplexity" in r]
    first = records[0]["client_perplexities"]
    assert len(records) == 3 and all(r["client_perplexities"] == first for r in records)


def test_classification_summaries_keep_their_keys(tiny_config, tiny_dataset):
    summary = run_experiment(tiny_config(), dataset=tiny_dataset, workers=0)
    assert "task" not in summary and not any("perplexity" in key for key in summary)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("algorithm=fedgh",), "algorithm 'fedgh' does not serve data.task 'language-modeling'"),
        (("data.dataset=fashion-mnist",), "needs a text dataset"),
        (("federation.architectures=hf-l2",), "federation.architectures: unknown value 'hf-l2'"),
        (("data.task=translation",), "data.task: unknown value 'translation'"),
    ],
)
def test_a_task_that_the_config_cannot_serve_is_refused_in_one_line(causal_llama, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(causal_llama, *overrides)


def test_an_encoder_or_a_rank_above_a_layers_width_is_refused_in_one_line(causal_llama, tiny_checkpoint):
    with pytest.raises(ConfigError, match=r"needs a causal language model.*encoder"):
        frozen_causal_lm(str(tiny_checkpoint))
    config = _config(causal_llama, "federation.architectures=hf-r32")
    with pytest.raises(ConfigError, match="LoRA rank 32 is above the width of a layer"):
        create_algorithm(config, (2, LENGTH), 3).create_client("hf-r32", torch_generator(0, "c"))


def test_the_command_line_refuses_an_encoder_for_language_modeling(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--out",
            str(out),
            "--set",
            "data.task=language-modeling",
            "--set",
            "data.dataset=kjv",
            "--set",
            "federation.architectures=hf-r2",
            "--set",
            f"model.checkpoint={tiny_checkpoint}",
            "--set",
            "federation.num_clients=2",
        ],
    )
    assert result.exit_code == 2, result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert "needs a causal language model" in " ".join(result.stderr.split())
    assert not out.exists()


def test_worker_processes_give_the_perplexities_of_one_process(causal_llama, tmp_path):
    config = _config(causal_llama, "federation.sample_fraction=0.5")
    alone = run_experiment(config, tmp_path / "one", dataset=_dataset(config), workers=0)
    pooled = run_experiment(config, tmp_path / "two", dataset=_dataset(config), workers=2)
    one, _ = read_run(tmp_path / "one")
    two, _ = read_run(tmp_path / "two")
    assert [r["client_perplexities"] for r in one] == [r["client_perplexities"] for r in two]
    assert alone["mean_perplexity_last"] == pooled["mean_perplexity_last"]


def test_generate_continues_a_prompt_with_the_clients_model_and_with_the_base(causal_llama, tmp_path):
    from pfedlora.generation import Decoding, generate

    config = _config(causal_llama, "federation.rounds=2", "train.lr=0.5")
    run_experiment(config, tmp_path / "run", dataset=_dataset(config), workers=0)
    prompt = tiny_corpus().train_texts[0]
    greedy = generate(tmp_path / "run", 1, prompt, Decoding(max_new_tokens=6), dataset=_dataset(config))
    assert greedy.arch == "hf-r4" and greedy.personalized and greedy.base
    again = generate(tmp_path / "run", 1, prompt, Decoding(max_new_tokens=6), dataset=_dataset(config))
    assert again == greedy  # greedy decoding of the rebuilt client: the same text
    sampled = [
        generate(tmp_path / "run", 1, prompt, Decoding(6, 1.5, seed), dataset=_dataset(config)).personalized
        for seed in (0, 0, 1)
    ]
    assert sampled[0] == sampled[1]  # seeded sampling repeats
    base = run_experiment(
        _config(causal_llama, "algorithm=zero-shot"), tmp_path / "base", dataset=_dataset(config), workers=0
    )
    assert base["bytes_total"] == 0
    untrained = generate(tmp_path / "base", 0, prompt, Decoding(max_new_tokens=6), dataset=_dataset(config))
    assert untrained.personalized == untrained.base == greedy.base  # no adapter: the base's own words


def test_generate_refuses_a_classification_run_in_one_line(tiny_config, tiny_dataset, tmp_path):
    run_experiment(tiny_config(), tmp_path / "run", dataset=tiny_dataset, workers=0)
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "run"), "--client", "0", "--prompt", "In"])
    assert result.exit_code == 2, result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert "generate needs a language-modeling run" in " ".join(result.stderr.split())


def test_a_comparison_of_language_models_is_judged_by_perplexity(causal_llama, tmp_path):
    from pfedlora.compare import plan_variants, write_comparison

    results = []
    for method in ("pfedlora", "standalone", "zero-shot"):
        for seed in (0, 1):
            config = _config(causal_llama, f"algorithm={method}", f"seed={seed}")
            label = f"{method}/seed-{seed}"
            run_experiment(config, tmp_path / label, dataset=_dataset(config), workers=0)
            records, summary = read_run(tmp_path / label)
            results.append((label, records, summary))
    written = write_comparison(results, tmp_path / "table")
    text = (tmp_path / "table" / "comparison.md").read_text()
    assert "Target perplexity: 20" in text and "| method | best ppl | last ppl |" in text
    assert "Last mean perplexity:" in text  # the lead is called on perplexity, lower being better
    assert "Last perplexity of each client on its own test text (mean over seeds):" in text
    versus = re.search(
        r"pfedlora (\d+) better / (\d+) worse of 8; zero-shot (\d+) better / (\d+) worse", text
    )
    assert versus is not None, text  # 2 seeds x 4 clients, each against its own training alone
    assert int(versus[3]) < int(versus[4])  # the untrained base is worse for most clients
    assert {p.name for p in written} >= {
        "perplexity_per_round.png",
        "perplexity_vs_megabytes.png",
        "comparison-per-client.csv",
    }
    per_client = (tmp_path / "table" / "comparison-per-client.csv").read_text().splitlines()
    assert per_client[0] == "client,pfedlora,standalone,zero-shot" and len(per_client) == 5  # 4 clients
    main = text[text.index("| method | best ppl") :].split("\n\n")[0]  # the comparison table alone
    rows = {line.split(" | ")[0].strip("| "): line for line in main.splitlines() if line.startswith("| ")}
    lasts = {
        m: float(rows[m].split(" | ")[2].split(" ± ")[0]) for m in ("pfedlora", "standalone", "zero-shot")
    }
    assert lasts["zero-shot"] > min(lasts["pfedlora"], lasts["standalone"])  # training pays
    equal_flops = {m: rows[m].split(" | ")[5].strip() for m in lasts}
    assert equal_flops["standalone"] != "–"  # read at what the least trained run spent, not the base's 0
    variants = plan_variants(["pfedlora", "fedit"], ["branch", "layers"], None, _overrides(causal_llama))
    assert [v.label for v in variants] == ["pfedlora", "fedit"]  # no placements for language models


def _overrides(checkpoint):
    return [
        "device=cpu",
        "data.task=language-modeling",
        "data.dataset=kjv",
        f"model.checkpoint={checkpoint}",
        f"federation.architectures={','.join(ARCHS)}",
    ]


def test_a_search_over_language_models_keeps_the_lowest_validation_perplexity(tmp_path):
    from pfedlora.tuning import Axis, Trial, _coordinate_ascent, write_search

    perplexity = {"0.1": 30.0, "0.5": 20.0, "1.0": 25.0}
    trials = []

    def score(settings):
        trial = Trial("pfedlora", settings, 0.3, tmp_path / "t", perplexity[dict(settings)["train.lr"]])
        trials.append(trial)
        return trial.score

    best = _coordinate_ascent([Axis("train.lr", ("0.1", "0.5", "1.0"))], score)
    assert best == {"train.lr": "0.5"}  # the lowest perplexity, not the highest
    write_search(trials, {"pfedlora": best}, tmp_path)
    lines = (tmp_path / "trials.csv").read_text().splitlines()
    assert lines[0] == "variant,settings,validation ppl,run" and "20.000" in lines[2]


@pytest.mark.parametrize("algorithm", ["pfedlora", "flexlora"])
def test_a_flower_run_of_language_models_equals_the_simulated_run(
    causal_llama, tmp_path, monkeypatch, algorithm
):
    from pfedlora.flower import node as node_module
    from pfedlora.flower.apps import client_app
    from pfedlora.flower.server import run_server
    from pfedlora.simulation import TIMING_KEYS
    from tests.flower.harness import InProcessGrid

    config = _config(causal_llama, f"algorithm={algorithm}", "federation.sample_fraction=0.5")
    dataset = _dataset(config)
    monkeypatch.setattr(node_module, "load_run_dataset", lambda *args, **kwargs: dataset)
    node_module.release_memory()
    run_experiment(config, tmp_path / "simulated", dataset=dataset, workers=0)
    nodes = [
        {
            "partition-id": i,
            "num-partitions": 4,
            "arch": config.architecture_of(i),
            "state-dir": str(tmp_path / "s"),
        }
        for i in range(4)
    ]
    run_server(InProcessGrid(client_app, nodes), config, tmp_path / "flower", experiment="lm")
    node_module.release_memory()
    simulated, flower = read_run(tmp_path / "simulated"), read_run(tmp_path / "flower")
    # PyTorch's FLOP counter (the first step of each kind and token count, per node and round on Flower,
    # per process in the simulator) changes a counted step's gradients in the last bits: perplexities
    # agree to 1e-6, everything else exactly.
    inexact = {"client_perplexities", "mean_perplexity", "median_perplexity", "mean_accuracy"}
    inexact |= {"weighted_accuracy", "std_accuracy", "client_accuracies"}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS | inexact} for r in rs]  # noqa: E731
    assert strip(flower[0]) == strip(simulated[0])  # who trained, what was sent, bytes, FLOPs: the same
    for ours, theirs in zip(flower[0], simulated[0], strict=True):
        if "client_perplexities" in theirs:
            assert ours["client_perplexities"] == pytest.approx(theirs["client_perplexities"], rel=1e-6)
            assert ours["client_accuracies"] == pytest.approx(theirs["client_accuracies"], abs=0.05)
    assert flower[1]["mean_perplexity_last"] == pytest.approx(simulated[1]["mean_perplexity_last"], rel=1e-6)
