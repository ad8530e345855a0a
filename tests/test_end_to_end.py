"""A short pFedLoRA run on the real Fashion-MNIST (installed by CI from Debian's dataset-fashion-mnist)."""

from dataclasses import replace

from pfedlora.config import load_config
from pfedlora.data import load_dataset
from pfedlora.simulation import run_experiment


def test_pfedlora_on_real_fashion_mnist_is_far_above_chance(tmp_path):
    full = load_dataset("fashion-mnist", download=False)
    # The first 6000 training and 2000 test images keep the run to seconds on two CPU cores.
    dataset = replace(
        full, train_x=full.train_x[:6000], train_y=full.train_y[:6000], test_x=full.test_x[:2000],
        test_y=full.test_y[:2000],
    )  # fmt: skip
    config = load_config(
        None,
        [
            "device=cpu",
            "federation.num_clients=10",
            "federation.sample_fraction=1.0",
            "federation.rounds=2",
            "federation.eval_every=1",
            "data.classes_per_client=2",
        ],
    )
    summary = run_experiment(config, tmp_path / "run", dataset=dataset)
    # Chance is 50% for a client's two classes (10% over all ten).
    assert summary["mean_accuracy_last"] > 0.85
    assert summary["bytes_total"] > 0 and summary["train_flops_total"] > 0
