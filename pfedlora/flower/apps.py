"""The Flower ServerApp and ClientApp: message routing and record conversion around pfedlora's own code.

Run configuration keys (``[tool.flwr.app.config]`` of the app, or ``flwr run --run-config``):
``config-file`` (a pfedlora TOML file on the server, "" for the defaults), ``overrides`` (space-separated
``key=value`` pfedlora overrides), ``out-dir`` (the run directory the server writes), ``experiment`` (names
the clients' checkpoint folder; "" for the out-dir's name), ``round-timeout`` (seconds to wait for one batch
of replies, and the time limit of a ClientApp process), ``messages-in-flight`` (the most messages sent at
once; 0: all of a step), ``quiet-rounds`` (rounds a node that did not answer is left alone before it is
asked again) and ``resume`` (true: continue the unfinished run in ``out-dir`` from its last checkpoint, e.g.
after the ServerApp died).
Node configuration keys: ``partition-id`` (the stable client id, required), ``num-partitions``, ``arch``,
``data-dir``, ``state-dir`` (see :class:`pfedlora.flower.node.NodeSettings`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from pfedlora.config import load_config
from pfedlora.errors import PfedloraError
from pfedlora.flower.node import Node, NodeSettings
from pfedlora.flower.records import (
    METRICS,
    SETTINGS,
    TENSORS,
    config_from_text,
    from_record,
    read_int,
    to_record,
)
from pfedlora.flower.server import DEFAULT_QUIET_ROUNDS, run_server
from pfedlora.stopping import RunStopped, stop_on_signals

logger = logging.getLogger(__name__)

server_app = ServerApp()
client_app = ClientApp()
TIMED_OUT = 124
"""The exit status of a ClientApp process that outlived its time limit (as ``timeout(1)``'s)."""


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    """Read the run configuration and run the experiment over the connected nodes. SIGINT and SIGTERM stop
    it within seconds with one line saying where the run stood (exit status 130, 143); a failure is logged
    in one line and ends the process with a non-zero status (Flower marks the run ``finished:failed``)."""
    run_config = context.run_config
    config_file = str(run_config.get("config-file", "")) or None
    overrides = shlex.split(str(run_config.get("overrides", "")))
    config = load_config(config_file, overrides)
    out_dir = Path(str(run_config.get("out-dir", "runs/flower")))
    experiment = str(run_config.get("experiment", "")) or out_dir.name
    timeout = float(run_config.get("round-timeout", 600))
    resume = str(run_config.get("resume", "false")).lower() in ("true", "1")
    in_flight = int(run_config.get("messages-in-flight", 0))
    quiet_rounds = int(run_config.get("quiet-rounds", DEFAULT_QUIET_ROUNDS))
    try:
        with stop_on_signals():
            summary = run_server(grid, config, out_dir, experiment, timeout, resume, in_flight, quiet_rounds)
    except RunStopped as stop:
        _exit_stopped(stop)
    except PfedloraError as error:  # Flower then marks the run failed and ends the process with status 1
        logger.error("pfedlora on Flower: error: %s", error)
        raise
    logger.warning(
        "pfedlora on Flower: mean accuracy %.4f after %d rounds; results in %s",
        summary["mean_accuracy_last"],
        summary["rounds"],
        out_dir,
    )


def _exit_stopped(stop: RunStopped) -> NoReturn:
    """End the ServerApp's process after a stop: one line saying where the run stood and how to continue it,
    then Flower's own handling of the signal where it has one (it reports the run's end to the SuperLink),
    and the exit status 128 + the signal (130, 143)."""
    how = "start it again with `resume = true` in the run config (same out-dir)" if stop.resumable else ""
    logger.error("pfedlora on Flower: %s%s", stop.message, f"; {how}" if how else "")
    flower_handler = signal.getsignal(stop.signum)
    if callable(flower_handler) and flower_handler is not signal.default_int_handler:
        with contextlib.suppress(SystemExit):
            flower_handler(stop.signum, None)
    raise SystemExit(stop.exit_code)


def _node(message: Message, context: Context) -> Node:
    settings = message.content.config_records[SETTINGS]
    return Node(
        config_from_text(str(settings["config"])),
        NodeSettings.from_node_config(context.node_config),
        str(settings["experiment"]),
    )


@contextmanager
def _time_limit(message: Message) -> Iterator[None]:
    """In a ClientApp process of its own (a deployment runs one ``flwr-clientapp`` process per message), end
    the process once the server has stopped waiting for the reply (``time-limit`` seconds), so that a hung
    ClientApp does not keep its SuperNode from every later message. Elsewhere (the simulation runtime, the
    tests' in-process grid) a ClientApp shares its process and is left alone."""
    limit = message.content.config_records[SETTINGS].get("time-limit")
    if not isinstance(limit, int | float) or limit <= 0 or Path(sys.argv[0]).name != "flwr-clientapp":
        yield
        return

    def expire() -> None:
        logger.error("pfedlora ClientApp: no reply within %g s, the server stopped waiting: exiting", limit)
        os._exit(TIMED_OUT)

    timer = threading.Timer(float(limit), expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@client_app.query()
def identify(message: Message, context: Context) -> Message:
    """The node's stable client id, its number of training samples and the data's shape."""
    with _time_limit(message):
        return _identify(message, context)


def _identify(message: Message, context: Context) -> Message:
    node = _node(message, context)
    about = ConfigRecord(
        {
            "client-id": node.client_id,
            "num-train": node.data.num_train,
            "num-eval": node.num_eval,
            "arch": node.arch,
            "input-shape": list(node.input_shape),
            "num-classes": node.num_classes,
        }
    )
    return Message(RecordDict({METRICS: about}), reply_to=message)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """One round of the algorithm's client training (or, told to drop out, no reply at all)."""
    with _time_limit(message):
        return _train(message, context)


def _train(message: Message, context: Context) -> Message:
    settings = message.content.config_records[SETTINGS]
    if bool(settings["drop"]):
        raise RuntimeError("dropped out of this round (federation.drop_rate)")  # Flower replies with an error
    node = _node(message, context)
    result = node.train(from_record(message.content.array_records[TENSORS]), read_int(settings, "round"))
    metrics = MetricRecord(
        {
            "num-examples": result.upload.num_examples,
            "train-flops": result.train_flops,
            "train-samples": result.train_samples,
        }
    )
    return Message(
        RecordDict({TENSORS: to_record(result.upload.tensors), METRICS: metrics}), reply_to=message
    )


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Correct predictions and total samples on this client's evaluation split."""
    with _time_limit(message):
        return _evaluate(message, context)


def _evaluate(message: Message, context: Context) -> Message:
    settings = message.content.config_records[SETTINGS]
    arrays = message.content.array_records
    download = from_record(arrays[TENSORS]) if TENSORS in arrays else None  # after-download protocol
    correct, total, loss = _node(message, context).evaluate(read_int(settings, "round"), download)
    return Message(
        RecordDict({METRICS: MetricRecord({"correct": correct, "total": total, "loss": loss})}),
        reply_to=message,
    )
