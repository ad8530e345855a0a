"""``python crash_target.py <pfedlora CLI args>``: the CLI on the tiny in-memory dataset, in its own process.

With PAUSE_AT=<round>:<marker path>, the second client of that round writes the marker file and then
sleeps, so a test can SIGKILL the process in the middle of a round at a known place (clients trained in
this process only: ``--workers 0``).
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import make_tiny_dataset

from pfedlora import cli
from pfedlora.simulation import federation, local

federation.load_dataset = lambda *args, **kwargs: make_tiny_dataset()
pause = os.environ.get("PAUSE_AT")
if pause:
    pause_round, marker = pause.split(":", 1)
    original, calls = local.client_update, []

    def client_update(algorithm, client, message, ctx):
        if ctx.server_round == int(pause_round):
            calls.append(ctx.client_id)
            if len(calls) == 2:
                Path(marker).write_text("paused")
                time.sleep(600)
        return original(algorithm, client, message, ctx)

    local.client_update = client_update

if __name__ == "__main__":  # worker processes import this module too
    sys.argv = ["pfedlora", *sys.argv[1:]]
    cli.main()
