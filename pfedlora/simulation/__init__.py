"""The simulator: one round loop for every algorithm, client sampling and the run directory."""

from pfedlora.simulation.loop import (
    TIMING_KEYS,
    ClientPool,
    ClientResult,
    Federation,
    LocalClients,
    build_federation,
    evaluate,
    resume_run,
    run_experiment,
    run_federation,
    run_round,
    run_rounds,
    summarize,
)
from pfedlora.simulation.results import read_run
from pfedlora.simulation.sampling import clients_per_round, sample_clients

__all__ = [
    "TIMING_KEYS",
    "ClientPool",
    "ClientResult",
    "Federation",
    "LocalClients",
    "build_federation",
    "clients_per_round",
    "evaluate",
    "read_run",
    "resume_run",
    "run_experiment",
    "run_federation",
    "run_round",
    "run_rounds",
    "sample_clients",
    "summarize",
]
