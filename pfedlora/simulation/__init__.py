"""The one round loop of both runtimes and the simulator around it.

- :mod:`~pfedlora.simulation.loop`: the round loop (both runtimes); :mod:`~pfedlora.simulation.rounds`: the
  steps of a round (dropout, client update, server update); :mod:`~pfedlora.simulation.screening`: checks
  on uploads; :mod:`~pfedlora.simulation.sampling`: seeded client sampling.
- :mod:`~pfedlora.simulation.federation`: building a federation (data, client states, global state).
- :mod:`~pfedlora.simulation.local`: the simulator's client pool; :mod:`~pfedlora.simulation.workers`: the
  same over worker processes; :mod:`~pfedlora.simulation.store`: where the client states live;
  :mod:`~pfedlora.simulation.experiment`: a run from configuration to run directory, and resuming it.
- :mod:`~pfedlora.simulation.records`: the typed per-round records and summary;
  :mod:`~pfedlora.simulation.results`: the run directory; :mod:`~pfedlora.simulation.checkpoint`: checkpoints.
"""

from pfedlora.simulation.experiment import resume_run, run_experiment, run_federation, summarize
from pfedlora.simulation.federation import Federation, build_federation
from pfedlora.simulation.local import LocalClients, evaluate
from pfedlora.simulation.loop import ClientPool, ClientResult, run_round, run_rounds
from pfedlora.simulation.records import TIMING_KEYS, RoundRecord, Summary
from pfedlora.simulation.results import read_run, read_unfinished_run
from pfedlora.simulation.sampling import clients_per_round, sample_clients

__all__ = [
    "TIMING_KEYS",
    "ClientPool",
    "ClientResult",
    "Federation",
    "LocalClients",
    "RoundRecord",
    "Summary",
    "build_federation",
    "clients_per_round",
    "evaluate",
    "read_run",
    "read_unfinished_run",
    "resume_run",
    "run_experiment",
    "run_federation",
    "run_round",
    "run_rounds",
    "sample_clients",
    "summarize",
]
