"""``python stop_target.py OUT_DIR STATE_DIR [MARKER]``: pfedlora's ServerApp (``serve``, with
``resume = true``) over the in-process grid on the tiny dataset, in its own process. With MARKER, the first
node message after the server's checkpoint of round 2 writes MARKER and then sleeps, so a test can signal the
server in the middle of round 3."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import TINY_OVERRIDES, make_tiny_dataset
from flwr.app import Context, RecordDict

from flower.harness import InProcessGrid
from pfedlora.flower import node as node_module
from pfedlora.flower.apps import client_app, serve
from pfedlora.simulation.checkpoint import checkpoint_round

SETTING = (
    *TINY_OVERRIDES,
    "federation.rounds=6",
    "federation.checkpoint_every=2",
    "federation.num_clients=4",
)

if __name__ == "__main__":
    out_dir, state_dir = Path(sys.argv[1]), Path(sys.argv[2])
    marker = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    dataset = make_tiny_dataset()
    node_module.load_run_dataset = lambda *args, **kwargs: dataset
    nodes = [{"partition-id": i, "num-partitions": 4, "state-dir": str(state_dir)} for i in range(4)]

    def pause(message, reply):
        if marker is not None and not marker.exists() and checkpoint_round(out_dir) >= 2:
            marker.write_text("paused")
            time.sleep(120)
        return reply

    run_config = {"overrides": " ".join(SETTING), "out-dir": str(out_dir), "experiment": "t", "resume": True}
    serve(InProcessGrid(client_app, nodes, tamper=pause), Context(1, 0, {}, RecordDict(), run_config))
