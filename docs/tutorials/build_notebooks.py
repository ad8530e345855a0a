"""Writes the tutorial notebooks of the documentation site (without outputs; the site shows them as written).

Their links point at the built site's pages (``../../guide/run/``): mkdocs-jupyter does not rewrite links
to ``.md`` files the way MkDocs does for Markdown pages.

    python docs/tutorials/build_notebooks.py            # write both notebooks next to this file
    python docs/tutorials/build_notebooks.py --execute  # also run each in a temporary folder, to check it

Each notebook runs in well under a minute on one core: a federation of 10 Fashion-MNIST clients for a few
rounds of a few steps each.
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent


def _md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(textwrap.dedent(text).strip())


def _code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(textwrap.dedent(text).strip())


def federation_from_python() -> nbformat.NotebookNode:
    cells = [
        _md(
            """
            # A federation from Python

            This notebook builds a configuration, runs a small pFedLoRA federation on Fashion-MNIST, plots its
            per-round accuracy with matplotlib and reads the run directory it wrote. It needs the library and
            the Fashion-MNIST files (`make run` installs both; see [Getting started](../../getting-started/))
            and runs in seconds on one core.
            """
        ),
        _md(
            """
            ## The configuration

            `load_config(path, overrides)` starts from the defaults (the paper's N=100, C=10% setting), reads
            a TOML file if `path` is given, then applies each `key=value` override, and validates the result:
            a bad key or value raises `ConfigError` naming it. Here: 10 clients of the five CNN architectures,
            3 of them sampled per round, 4 rounds of 10 minibatch steps per training phase, every client
            scored on 100 of its test images after every round.
            """
        ),
        _code(
            """
            import tempfile
            from pathlib import Path

            from pfedlora.config import config_to_toml, load_config

            config = load_config(
                None,
                [
                    "federation.num_clients=10",
                    "federation.sample_fraction=0.3",
                    "federation.rounds=4",
                    "federation.eval_every=1",
                    "train.local_steps=10",
                    "data.max_eval_samples=100",
                ],
            )
            print(config.algorithm, config.federation.architectures, config.adapter.placement)
            """
        ),
        _md(
            """
            The configuration is a tree of frozen dataclasses; `config_to_toml` gives the file a run
            directory keeps:
            """
        ),
        _code(
            """
            print("\\n".join(config_to_toml(config).splitlines()[:18]), "...", sep="\\n")
            """
        ),
        _md(
            """
            ## The run

            `run_experiment` runs every round and writes the run directory; `on_round` sees each round's
            record as it is logged. `workers=1` trains every client in this process on one thread (worker
            processes would import the main module, which a notebook does not have). The run directory goes
            into a temporary folder here: give `out_dir` a path of your own to keep it.
            """
        ),
        _code(
            """
            from pfedlora.simulation import read_run, run_experiment

            out_dir = Path(tempfile.mkdtemp()) / "federation"


            def show(record):
                accuracy = record.get("mean_accuracy")
                print(f"round {record['round']}: clients {record['sampled']}, mean accuracy {accuracy:.2%}")


            summary = run_experiment(config, out_dir=out_dir, on_round=show, workers=1)
            accuracy, megabytes = summary["mean_accuracy_last"], summary["bytes_total"] / 1e6
            print(f"last mean accuracy {accuracy:.2%}, {megabytes:.2f} MB sent")
            """
        ),
        _md(
            """
            ## The per-round accuracy

            `read_run` returns the per-round records of `metrics.jsonl` and the summary of `summary.json`.
            Evaluated rounds carry the mean accuracy over clients and each client's own:
            """
        ),
        _code(
            """
            import matplotlib.pyplot as plt

            records, summary = read_run(out_dir)
            evaluated = [r for r in records if "mean_accuracy" in r]
            rounds = [r["round"] for r in evaluated]

            fig, ax = plt.subplots(figsize=(6, 4))
            means = [100 * r["mean_accuracy"] for r in evaluated]
            ax.plot(rounds, means, marker="o", label="mean over clients")
            for r in evaluated:
                accuracies = [100 * a for a in r["client_accuracies"] if a is not None]
                ax.scatter([r["round"]] * len(accuracies), accuracies, color="grey", s=8)
            ax.set_xlabel("round")
            ax.set_ylabel("test accuracy (%)")
            ax.set_xticks(rounds)
            ax.set_title("pFedLoRA, 10 clients (grey: each client)")
            ax.legend()
            plt.show()
            """
        ),
        _md(
            """
            The costs are in the same records: bytes and training FLOPs per client and round, and their
            running totals.
            """
        ),
        _code(
            """
            for r in evaluated:
                megabytes, tflops = r["cumulative_bytes"] / 1e6, r["cumulative_train_flops"] / 1e12
                accuracy = r["mean_accuracy"]
                print(f"round {r['round']}: {megabytes:.2f} MB, {tflops:.3f} TFLOPs, {accuracy:.2%}")
            """
        ),
        _md(
            """
            ## The run directory

            `config.toml` is the resolved configuration (`pfedlora run --config` on it reruns the
            experiment), `metrics.jsonl` one line per round and `summary.json` the headline figures; the
            command line's `pfedlora report` reads the same files. [The results
            directory](../../guide/run/#the-results-directory) lists every key.
            """
        ),
        _code(
            """
            for path in sorted(out_dir.iterdir()):
                print(f"{path.name:24} {path.stat().st_size:>8} bytes")
            print()
            keys = ["algorithm", "num_clients", "rounds", "mean_accuracy_best", "best_round"]
            keys += ["shared_parameters", "bytes_total", "train_flops_total", "wall_seconds"]
            for key in keys:
                print(f"{key:20} {summary[key]}")
            """
        ),
        _md(
            """
            `load_run_config` reads the configuration back, so a run can be repeated or varied:
            """
        ),
        _code(
            """
            from pfedlora.config import load_run_config

            again = load_run_config(out_dir / "config.toml")
            print(again == config)
            """
        ),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def own_algorithm() -> nbformat.NotebookNode:
    cells = [
        _md(
            """
            # Your own algorithm in one file

            An algorithm is one class on pfedlora's `Algorithm` protocol: what it shares, how a client trains
            on what the server sent, how the server combines the uploads (see
            [Your own algorithm](../../howto/algorithm/)). This notebook writes one, registers it, and
            compares it with pFedLoRA on a small Fashion-MNIST federation. It runs in well under a minute on
            one core.

            The algorithm: LG-FedAvg (a global head on private bodies) with FedProx's proximal term on the
            head, so that local training cannot pull a client's head far from the global one. Its one
            option, `mu`, weighs the term.
            """
        ),
        _code(
            """
            from dataclasses import dataclass

            import torch
            import torch.nn.functional as F

            from pfedlora.algorithms import Algorithm, ClientContext, State, Upload, register_algorithm
            from pfedlora.algorithms.training import train_on_client_data
            from pfedlora.config import AlgorithmOptions, option
            from pfedlora.models import FeatureClassifier, build_model


            @dataclass(frozen=True)
            class HeadProxOptions(AlgorithmOptions):
                \"\"\"The ``[head-prox]`` section.\"\"\"

                mu: float = option(0.1, low=0)
                \"\"\"Weight of the proximal term (mu / 2)·‖head − global head‖².\"\"\"


            @register_algorithm
            class HeadProx(Algorithm[FeatureClassifier]):
                \"\"\"A global head on private bodies, each client's head held near the global one.\"\"\"

                name = "head-prox"
                options_type = HeadProxOptions
                uploads_global_state = True
                received = "head"

                def create_client(self, arch: str, generator: torch.Generator) -> FeatureClassifier:
                    shape, classes = self.input_shape, self.num_classes
                    return build_model(arch, shape, classes, generator, self.model_settings)

                def is_shared(self, key: str) -> bool:
                    return key.startswith(self.head_prefix)  # the head: "fc3." on the CNNs

                def train(self, client: FeatureClassifier, message: State, ctx: ClientContext) -> Upload:
                    self.receive(client, message)  # the global head overwrites the client's
                    anchor = {key: value.detach().clone() for key, value in message.items()}
                    parameters = dict(client.named_parameters())
                    mu = self.options.mu

                    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                        prox = sum(((parameters[key] - value) ** 2).sum() for key, value in anchor.items())
                        return F.cross_entropy(client(x), y) + mu / 2 * prox

                    train_on_client_data(
                        client, list(client.parameters()), ctx, self.config.train, phase="local", loss_fn=loss
                    )
                    return Upload(self.shared_state(client), ctx.data.num_train)
            """
        ),
        _md(
            """
            Registered, the name is a valid `algorithm` and its options a configuration section of their own,
            validated like every other value:
            """
        ),
        _code(
            """
            from pfedlora.algorithms import ALGORITHMS
            from pfedlora.config import load_config
            from pfedlora.errors import ConfigError

            config = load_config(None, ["algorithm=head-prox", "head-prox.mu=0.5"])
            print("head-prox" in ALGORITHMS, config.algorithm_options)
            try:
                load_config(None, ["algorithm=head-prox", "head-prox.mu=-1"])
            except ConfigError as error:
                print(error)
            """
        ),
        _md(
            """
            ## Compared with pFedLoRA

            `plan_variants` makes one variant per algorithm (and per adapter placement for pFedLoRA) on the
            same configuration, data, partition and seed; `run_comparison` runs them into one directory, each
            into its own run directory, and `write_comparison` writes the table and the plots that
            `pfedlora compare` writes. Here: 10 clients, 3 a round, 4 rounds of 10 steps per phase, every
            client scored on 100 test images after every round; `workers=1` keeps every client in this
            process.
            """
        ),
        _code(
            """
            import tempfile
            from pathlib import Path

            from pfedlora.compare import plan_variants, run_comparison, write_comparison

            overrides = [
                "federation.num_clients=10",
                "federation.sample_fraction=0.3",
                "federation.rounds=4",
                "federation.eval_every=1",
                "train.local_steps=10",
                "data.max_eval_samples=100",
                "head-prox:head-prox.mu=0.5",  # label:key=value: for that variant only
            ]
            variants = plan_variants(["head-prox", "pfedlora"], ["branch"], None, overrides)
            print([variant.label for variant in variants])

            out_dir = Path(tempfile.mkdtemp()) / "compare"
            results = run_comparison(variants, out_dir, workers=1)
            written = write_comparison(results, out_dir)
            print([path.name for path in written])
            """
        ),
        _md(
            """
            Each result is a label, the per-round records and the summary: the same figures a run directory
            holds.
            """
        ),
        _code(
            """
            for label, _records, summary in results:
                accuracy, megabytes = summary["mean_accuracy_last"], summary["bytes_total"] / 1e6
                tflops = summary["train_flops_total"] / 1e12
                print(f"{label:16} last mean acc {accuracy:.2%}  MB {megabytes:6.2f}  TFLOPs {tflops:.3f}")
            """
        ),
        _md(
            """
            `comparison.md` is the table `pfedlora compare` writes (best, last and last-10% accuracy, accuracy
            at equal client FLOPs, the costs to the target accuracy, totals), and the plots draw every variant
            on one figure:
            """
        ),
        _code(
            """
            from IPython.display import Image, Markdown, display

            display(Markdown((out_dir / "comparison.md").read_text()))
            display(Image(out_dir / "accuracy_per_round.png"))
            """
        ),
        _md(
            """
            Four rounds of ten steps say little about either method; the same calls with the default schedule
            (or `pfedlora compare -a head-prox,pfedlora` from a script that registers the class) make the real
            comparison. [Comparing and tuning](../../guide/compare/) describes the table, seeds and the
            hyperparameter search.
            """
        ),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def _metadata() -> dict[str, object]:
    return {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }


NOTEBOOKS = {
    "federation-from-python.ipynb": federation_from_python,
    "own-algorithm.ipynb": own_algorithm,
}


def execute(notebook: nbformat.NotebookNode, name: str) -> None:
    """Run ``notebook`` in a temporary folder (outputs discarded), raising on the first failing cell."""
    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        copy = nbformat.from_dict(notebook)
        NotebookClient(copy, timeout=300, resources={"metadata": {"path": folder}}).execute()
        print(f"{name}: executed in {time.perf_counter() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="also run each notebook, to check it")
    args = parser.parse_args()
    for name, build in NOTEBOOKS.items():
        notebook = build()
        nbformat.validate(notebook)
        if args.execute:
            execute(notebook, name)
        nbformat.write(notebook, HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
