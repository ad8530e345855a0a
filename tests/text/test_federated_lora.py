"""The federated-LoRA methods for language models on a tiny random causal Llama: what travels each way, what
the server makes of it (against the rules of ``lora_aggregation`` and the algebra they promise), and a
short run of every language-modeling method."""

from __future__ import annotations

import math

import pytest
import torch

from pfedlora.algorithms import ALGORITHMS, Upload, create_algorithm
from pfedlora.algorithms.federated_lora import factor_of, key_of
from pfedlora.algorithms.lora_aggregation import Factors, best_rank, hetlora
from pfedlora.data.text import tokenize_corpus
from pfedlora.models import family_tokenizer
from pfedlora.models.causal_lm import frozen_causal_lm
from pfedlora.seeding import torch_generator
from pfedlora.simulation import build_federation, run_experiment
from pfedlora.testing import tiny_corpus

from .conftest import LM_LENGTH as LENGTH
from .conftest import lm_config

LM_METHODS = [name for name, cls in ALGORITHMS.items() if "language-modeling" in cls.tasks]


def _config(checkpoint, algorithm, *overrides):
    return lm_config(checkpoint, f"algorithm={algorithm}", "train.lr=0.1", *overrides)


def _dataset(config):
    return tokenize_corpus(tiny_corpus(), [family_tokenizer("hf", config.model)], LENGTH)


def _random_upload(algorithm, client, seed, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    state = algorithm.shared_state(client)
    return Upload({k: scale * torch.randn(v.shape, generator=generator) for k, v in state.items()}, 10 + seed)


def test_every_method_of_the_issue_serves_language_modeling():
    assert set(LM_METHODS) >= {
        "pfedlora",
        "standalone",
        "zero-shot",
        "fedit",
        "ffa-lora",
        "fedsa-lora",
        "hetlora",
        "flexlora",
        "flora",
    }


def test_ffa_lora_clients_share_one_frozen_a_and_the_mean_of_b_is_the_mean_of_the_updates(causal_llama):
    algorithm = create_algorithm(_config(causal_llama, "ffa-lora"), (2, LENGTH), 3)
    clients = [algorithm.create_client(a, torch_generator(0, i)) for i, a in enumerate(("hf-r2", "hf-r4"))]
    module = "model.layers.0.self_attn.q_proj"
    a0, a1 = (c.adapter.leaf(module).weights()[0] for c in clients)
    assert torch.equal(a0, a1) and a0.abs().sum() > 0  # one seeded A, whatever the client's generator
    assert all(factor_of(k)[1] == "B" for k in algorithm.shared_state(clients[0]))  # only B travels
    uploads = [_random_upload(algorithm, c, i) for i, c in enumerate(clients)]
    server = algorithm.initial_server_state(clients[0])
    new = algorithm.aggregate(server, uploads, 1)
    w = torch.tensor([u.num_examples for u in uploads], dtype=torch.float64)
    w = w / w.sum()
    key = key_of(module, "B")
    mean_product = sum(wk * u.tensors[key].double() @ a0.double() for wk, u in zip(w, uploads, strict=True))
    torch.testing.assert_close(new[key].double() @ a0.double(), mean_product)  # exact: A is common


def test_fedsa_lora_shares_a_and_keeps_each_clients_b(causal_llama, tmp_path):
    config = _config(causal_llama, "fedsa-lora")
    federation = build_federation(config, _dataset(config))
    assert all(factor_of(k)[1] == "A" for k in federation.server_state)
    run_experiment(config, tmp_path / "run", dataset=_dataset(config), workers=0)
    algorithm = create_algorithm(config, (2, LENGTH), 3)
    assert all(factor_of(k)[1] == "A" for k in algorithm.broadcast(federation.server_state, 0, 1))
    client = algorithm.create_client("hf-r2", torch_generator(0, "c"))
    keys = set(client.state_dict())
    b_keys = {k for k in keys if factor_of(k) and factor_of(k)[1] == "B"}
    assert b_keys and not any(algorithm.is_shared(k) for k in b_keys)  # B never leaves the client
    assert set(algorithm.shared_state(client)) == keys - b_keys


def test_hetlora_gives_each_client_its_ranks_share_of_the_norm_weighted_padded_mean(causal_llama):
    algorithm = create_algorithm(_config(causal_llama, "hetlora"), (2, LENGTH), 3)
    small, large = (algorithm.create_client(a, torch_generator(0, a)) for a in ("hf-r2", "hf-r4"))
    server = algorithm.initial_server_state(small)
    module = "model.layers.1.self_attn.v_proj"
    assert server[key_of(module, "A")].shape[0] == 4  # the global factors have the largest rank
    down = algorithm.broadcast(server, 0, 1)  # client 0 runs hf-r2
    assert down[key_of(module, "A")].shape[0] == 2 and down[key_of(module, "B")].shape[1] == 2
    small.load_state_dict(down, strict=False)
    uploads = [_random_upload(algorithm, small, 1), _random_upload(algorithm, large, 2)]
    new = algorithm.aggregate(server, uploads, 1)
    expected = hetlora(
        [Factors(u.tensors[key_of(module, "A")], u.tensors[key_of(module, "B")]) for u in uploads],
        [u.num_examples for u in uploads],
    ).common
    torch.testing.assert_close(new[key_of(module, "A")], expected.A)
    torch.testing.assert_close(new[key_of(module, "B")], expected.B)
    wrong = Upload(
        {k: torch.zeros(5, v.shape[1]) if "lora_A" in k else v for k, v in uploads[1].tensors.items()}, 3
    )
    with pytest.raises(ValueError, match="ranks"):
        algorithm.check_upload(server, wrong.tensors)  # rank 5 is above the federation's largest (4)


def test_flexlora_sends_each_client_the_best_approximation_of_the_summed_updates(causal_llama):
    algorithm = create_algorithm(_config(causal_llama, "flexlora"), (2, LENGTH), 3)
    small, large = (algorithm.create_client(a, torch_generator(0, a)) for a in ("hf-r2", "hf-r4"))
    server = algorithm.initial_server_state(small)
    first = algorithm.broadcast(server, 1, 1)  # ΔW = 0: a fresh adapter, B zero, A nonzero
    module = "model.layers.0.self_attn.q_proj"
    assert first[key_of(module, "B")].abs().sum() == 0 and first[key_of(module, "A")].abs().sum() > 0
    uploads = [_random_upload(algorithm, small, 3), _random_upload(algorithm, large, 4)]
    new = algorithm.aggregate(server, uploads, 1)
    w = torch.tensor([u.num_examples for u in uploads], dtype=torch.float64)
    w = w / w.sum()
    delta = sum(
        wk * u.tensors[key_of(module, "B")].double() @ u.tensors[key_of(module, "A")].double()
        for wk, u in zip(w, uploads, strict=True)
    )
    torch.testing.assert_close(new[key_of(module, "delta")].double(), delta, rtol=1e-5, atol=1e-6)
    down = algorithm.broadcast(new, 0, 2)  # client 0: rank 2
    product = down[key_of(module, "B")].double() @ down[key_of(module, "A")].double()
    best = best_rank(new[key_of(module, "delta")], 2)
    torch.testing.assert_close(product, best.B @ best.A, rtol=1e-4, atol=1e-6)
    singular = torch.linalg.svdvals(new[key_of(module, "delta")].double())
    error = torch.linalg.matrix_norm(new[key_of(module, "delta")].double() - product)
    assert error == pytest.approx(math.sqrt(float((singular[2:] ** 2).sum())), rel=1e-4)  # Eckart-Young


def test_flora_merges_exactly_the_scaled_sum_of_updates_and_clients_predict_with_it(causal_llama):
    config = _config(causal_llama, "flora")
    algorithm = create_algorithm(config, (2, LENGTH), 3)
    small, large = (algorithm.create_client(a, torch_generator(0, a)) for a in ("hf-r2", "hf-r4"))
    server = algorithm.initial_server_state(small)
    uploads = [_random_upload(algorithm, small, 5), _random_upload(algorithm, large, 6)]
    new = algorithm.aggregate(server, uploads, 1)
    module = "model.layers.1.self_attn.q_proj"
    w = torch.tensor([u.num_examples for u in uploads], dtype=torch.float64)
    w = w / w.sum()
    delta = algorithm.scaling * sum(
        wk * u.tensors[key_of(module, "B")].double() @ u.tensors[key_of(module, "A")].double()
        for wk, u in zip(w, uploads, strict=True)
    )
    torch.testing.assert_close(new[key_of(module, "delta")].double(), delta, rtol=1e-5, atol=1e-6)
    assert algorithm.scaling == config.adapter.effective_alpha / config.adapter.rank  # one alpha/r
    down = algorithm.broadcast(new, 0, 2)
    assert set(down) == {k for k in new}  # the merged update travels down, dense
    algorithm.receive(small, down)
    x = _dataset(config).train_x[:4]
    base = frozen_causal_lm(str(causal_llama))
    with torch.no_grad():
        merged = {n: p.clone() for n, p in base.named_parameters()}
        for name, param in base.named_parameters():
            owner = name.removesuffix(".weight")
            if key_of(owner, "delta") in new:
                param.add_(new[key_of(owner, "delta")])
        expected = base(input_ids=x[:, 0].long(), attention_mask=x[:, 1].long()).logits
        for name, param in base.named_parameters():
            param.copy_(merged[name])
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5)  # its own adapter: B = 0


@pytest.mark.parametrize("method", LM_METHODS)
def test_every_language_modeling_method_runs_and_scores_each_client(causal_llama, method, tmp_path):
    config = _config(causal_llama, method)
    summary = run_experiment(config, tmp_path / method, dataset=_dataset(config), workers=0)
    assert math.isfinite(summary["mean_perplexity_last"]) and summary["mean_perplexity_last"] > 1
    shares = method not in ("standalone", "zero-shot")
    assert (summary["bytes_total"] > 0) == shares
    algorithm = create_algorithm(config, (2, LENGTH), 3)
    largest = algorithm.create_client("hf-r4", torch_generator(0, "largest"))
    upload = algorithm.shared_state(largest)
    bound = algorithm.upload_bound(algorithm.initial_server_state(largest))
    assert len(upload) <= bound.tensors  # what Flower refuses unread lies above what a client can send
    assert sum(t.numel() * t.element_size() for t in upload.values()) <= bound.bytes
