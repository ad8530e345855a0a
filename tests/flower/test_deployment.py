"""One bounded deployment on loopback: a SuperLink and three SuperNodes with TLS and node authentication.

The test makes its own CA and keys, registers three SuperNode keys, and starts a fourth SuperNode with an
unregistered key, which the SuperLink must refuse. `flwr run` then runs pFedLoRA on real Fashion-MNIST over
the three nodes, then on the King James Bible with clients of two language-model families (a tiny BERT and
the real MiniLM: other tokenizers, other widths) and a text branch, then language models (pFedLoRA's LoRA
adapters on a tiny causal decoder, judged by perplexity); each run directory it writes must equal a
simulated run of the same configuration. A ServerApp that fails is told by `flwr list`. Every process the
test starts is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pfedlora.config import load_config
from pfedlora.simulation import TIMING_KEYS, read_run, run_experiment
from pfedlora.testing import tiny_bert, tiny_llama

from .pki import make_node_key, make_tls

APP = Path(__file__).resolve().parents[2] / "examples" / "flower"
OVERRIDES = (
    "device=cpu federation.num_clients=3 federation.sample_fraction=1 federation.rounds=1 "
    "data.classes_per_client=2 train.batch_size=256"
)
TEXT_OVERRIDES = (
    "device=cpu", "data.dataset=kjv", "data.partition=by-source", "federation.num_clients=3",
    "federation.sample_fraction=1", "federation.rounds=1", "federation.architectures=hf-l1,minilm-l1",
    "adapter.placement=branch", "model.max_length=16", "model.feature_dim=32", "train.local_steps=2",
    "train.batch_size=16",
)  # fmt: skip
LM_OVERRIDES = (
    "device=cpu", "data.task=language-modeling", "data.dataset=kjv", "data.partition=by-source",
    "federation.num_clients=3", "federation.sample_fraction=1", "federation.rounds=1",
    "federation.architectures=hf-r2,hf-r4", "adapter.rank=2", "model.max_length=8",
    "data.max_eval_samples=16", "train.local_steps=2", "train.batch_size=8",
)  # fmt: skip
DEADLINE_S = 420  # a guard against a hung deployment (it takes about 4.5 minutes on 2 cores, mostly polling)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Processes:
    """Started in their own process groups; stopped (SIGTERM, then SIGKILL) by PID, newest first."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env, self.started = folder, env, []

    def start(self, name: str, *command: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.folder,
            start_new_session=True,
        )
        self.started.append((process, log))
        return process

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process, log in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            log.close()


def _run(env: dict[str, str], *command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fashion_mnist():
    from pfedlora.data import load_dataset

    return load_dataset("fashion-mnist", download=False)  # fails loudly where the dataset is missing


def test_tls_authenticated_deployment_refuses_unknown_node_and_matches_simulator(tmp_path, fashion_mnist):
    started = time.monotonic()
    bin_dir = Path(sys.executable).parent
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOG_LEVEL": "INFO",
        "COLUMNS": "150",
        "OMP_NUM_THREADS": "1",
    }
    tls = make_tls(tmp_path)
    text_overrides = " ".join((*TEXT_OVERRIDES, f"model.checkpoint={tiny_bert(tmp_path / 'tiny-bert')}"))
    decoder = tiny_llama(tmp_path / "tiny-llama", layers=2, hidden=16, causal_lm=True)
    lm_overrides = " ".join((*LM_OVERRIDES, f"model.checkpoint={decoder}"))
    keys = [make_node_key(tmp_path, f"node{i}") for i in range(3)]
    rogue_key, _ = make_node_key(tmp_path, "rogue")
    link_port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{tls["ca"]}"\n'
    )
    processes = Processes(tmp_path, env)
    try:
        link = processes.start(
            "superlink",
            "flower-superlink",
            "--ssl-ca-certfile", str(tls["ca"]),
            "--ssl-certfile", str(tls["cert"]),
            "--ssl-keyfile", str(tls["key"]),
            "--enable-supernode-auth",
            "--host", "127.0.0.1",
            "--port", str(link_port),
            "--database", str(tmp_path / "state.db"),
            "--disable-runtime-dependency-installation",
        )  # fmt: skip
        while "Uvicorn running" not in processes.log("superlink"):
            assert link.poll() is None, processes.log("superlink")
            assert time.monotonic() - started < 30, "the SuperLink did not start"
            time.sleep(0.2)
        for _, public in keys:
            registered = _run(env, "flwr", "supernode", "register", str(public), "local", timeout=30)
            assert "registered successfully" in registered.stdout, registered.stdout + registered.stderr

        def supernode(name: str, key: Path, client_id: int) -> subprocess.Popen:
            node_config = f'partition-id={client_id} num-partitions=3 state-dir="{tmp_path / "state"}"'
            return processes.start(
                name,
                "flower-supernode",
                "--root-certificates", str(tls["ca"]),
                "--superlink", f"127.0.0.1:{link_port}",
                "--host", "127.0.0.1",
                "--port", str(_free_port()),
                "--auth-supernode-private-key", str(key),
                "--node-config", node_config,
                "--max-retries", "3",
            )  # fmt: skip

        for i, (private, _) in enumerate(keys):
            supernode(f"node{i}", private, i)
        rogue = supernode("rogue", rogue_key, 0)
        assert rogue.wait(timeout=60) != 0, "a SuperNode with an unregistered key was accepted"
        assert "Failed to activate SuperNode" in processes.log("rogue")

        def flwr_run(run_config: str) -> subprocess.CompletedProcess:
            remaining = DEADLINE_S - (time.monotonic() - started)
            command = ("flwr", "run", str(APP), "local", "--stream", "--run-config", run_config)
            return _run(env, *command, timeout=remaining)

        out = tmp_path / "flower-run"
        result = flwr_run(f'overrides="{OVERRIDES}" out-dir="{out}" experiment="loopback"')
        assert (out / "summary.json").is_file(), result.stdout[-3000:] + result.stderr[-3000:]

        # The same nodes in a federation of two language-model families on the King James Bible: each node
        # tokenizes the verses with what its own client reads (its family's tokenizer, the branch's).
        text_out = tmp_path / "flower-text"
        result = flwr_run(f'overrides="{text_overrides}" out-dir="{text_out}" experiment="text"')
        assert (text_out / "summary.json").is_file(), result.stdout[-3000:] + result.stderr[-3000:]

        # Language models on the same nodes: pFedLoRA's two LoRA adapters on a frozen causal decoder, each
        # client judged by its perplexity on its own books' held-out verses.
        lm_out = tmp_path / "flower-lm"
        result = flwr_run(f'overrides="{lm_overrides}" out-dir="{lm_out}" experiment="lm"')
        assert (lm_out / "summary.json").is_file(), result.stdout[-3000:] + result.stderr[-3000:]

        # A ServerApp that fails (here: 4 clients asked of 3 nodes): `flwr run` still exits 0, so the run's
        # own status tells (`flwr list`: finished:failed; no summary.json), and its log says why in a line.
        failed = tmp_path / "failed-run"
        failing = flwr_run(f'overrides="{OVERRIDES} federation.num_clients=4" out-dir="{failed}"')
        assert failing.returncode == 0  # Flower's, whatever the ServerApp did
        assert "pfedlora on Flower: error: 4 of 4 clients were identified by no node" in failing.stdout, (
            failing.stdout
        )
        assert not (failed / "summary.json").exists()
        listed = _run(env, "flwr", "list", "local", "--format", "json", timeout=30)
        statuses = sorted(run["status"] for run in json.loads(listed.stdout)["runs"])
        assert statuses == ["finished:completed"] * 3 + ["finished:failed"], listed.stdout
    finally:
        processes.stop_all()
    assert all(process.poll() is not None for process, _ in processes.started)
    saved = {p.name.rsplit("-r", 1)[0] for p in (tmp_path / "state" / "loopback").iterdir()}
    assert saved == {f"client-{i}" for i in range(3)}  # each node kept its own state, per round

    simulated = tmp_path / "simulated"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the nodes (OMP_NUM_THREADS=1): the same float summation order
    try:
        run_experiment(load_config(None, OVERRIDES.split()), simulated, dataset=fashion_mnist)
    finally:
        torch.set_num_threads(threads)
    (flower_records, flower_summary), (sim_records, sim_summary) = read_run(out), read_run(simulated)
    strip = lambda record: {k: v for k, v in record.items() if k not in TIMING_KEYS}  # noqa: E731
    assert [strip(r) for r in flower_records] == [strip(r) for r in sim_records]
    assert strip(flower_summary) == strip(sim_summary)
    assert flower_summary["mean_accuracy_last"] > 0.5

    text_config = load_config(None, text_overrides.split())
    torch.set_num_threads(1)
    try:
        run_experiment(text_config, tmp_path / "simulated-text", workers=0)
    finally:
        torch.set_num_threads(threads)
    (flower_records, flower_summary), (sim_records, _) = (
        read_run(text_out),
        read_run(tmp_path / "simulated-text"),
    )
    assert [strip(r) for r in flower_records] == [strip(r) for r in sim_records]
    assert set(flower_summary["mean_accuracy_last_by_architecture"]) == {"hf-l1", "minilm-l1"}

    torch.set_num_threads(1)
    try:
        run_experiment(load_config(None, lm_overrides.split()), tmp_path / "simulated-lm", workers=0)
    finally:
        torch.set_num_threads(threads)
    (flower_records, flower_summary), (sim_records, sim_summary) = (
        read_run(lm_out),
        read_run(tmp_path / "simulated-lm"),
    )
    # PyTorch's FLOP counter runs on the first step of each kind per node and round on Flower, once per
    # process in the simulator, and changes a counted step's gradients in the last bits: perplexities agree
    # to 1e-6, everything else (who trained, what was sent, bytes, FLOPs) exactly.
    inexact = {"client_perplexities", "mean_perplexity", "median_perplexity", "mean_accuracy"}
    inexact |= {"weighted_accuracy", "std_accuracy", "client_accuracies"}
    assert [{k: v for k, v in strip(r).items() if k not in inexact} for r in flower_records] == [
        {k: v for k, v in strip(r).items() if k not in inexact} for r in sim_records
    ]
    for ours, theirs in zip(flower_records, sim_records, strict=True):
        if "client_perplexities" in theirs:
            assert ours["client_perplexities"] == pytest.approx(theirs["client_perplexities"], rel=1e-6)
    assert flower_summary["task"] == "language-modeling"
    assert flower_summary["mean_perplexity_last"] == pytest.approx(
        sim_summary["mean_perplexity_last"], rel=1e-6
    )
    assert time.monotonic() - started < DEADLINE_S + 60
