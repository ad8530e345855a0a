"""Stopping cleanly on SIGINT (Ctrl-C) and SIGTERM (what a job scheduler sends).

Within :func:`stop_on_signals`, either signal raises :class:`Stopped` in the main thread; the layers it
passes through (a run, a comparison, a search) add where they stood to its message, the worker processes
are stopped, the files stay as a crash would leave them (the last checkpoint intact), and the command
prints that one message and exits with 128 + the signal's number (130, 143). Processes whose parent
coordinates the stop (the workers of a pool, the jobs of a comparison) ignore SIGINT, which a terminal sends
to every process of its foreground group, and leave the stop to their parent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A stop asked for by ``signum``; ``message`` says where the work stood and how to continue it.

    A :class:`KeyboardInterrupt`, so that nothing that catches ``Exception`` swallows it.
    """

    def __init__(self, signum: int = signal.SIGINT, message: str = "") -> None:
        super().__init__(message or f"stopped by {signal_name(signum)}")
        self.signum = signum
        self.message = message or f"stopped by {signal_name(signum)}"

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it (130 for SIGINT)."""
        return 128 + self.signum

    def __reduce__(self) -> tuple[type[Stopped], tuple[int, str]]:
        return type(self), (self.signum, self.message)


class RunStopped(Stopped):
    """A run stopped by a signal, and where it stood: ``in_round`` (None: while setting up; ``rounds`` + 1:
    after the last round, before the summary), the round of its last checkpoint (0: none yet) and whether
    ``run_dir`` holds the run (its configuration was written), so that it can be resumed."""

    def __init__(
        self,
        signum: int,
        run_dir: str,
        in_round: int | None,
        rounds: int,
        checkpoint_round: int,
        resumable: bool,
    ) -> None:
        self.signum, self.run_dir, self.in_round, self.rounds = signum, run_dir, in_round, rounds
        self.checkpoint_round, self.resumable = checkpoint_round, resumable
        super().__init__(signum, self.where())

    def state(self) -> str:
        """``in round 7 of 20 (last checkpoint: round 6)``, ``while setting up``, and so on."""
        return run_state(self.in_round, self.rounds, self.checkpoint_round, self.resumable)

    def where(self) -> str:
        """``stopped by SIGINT (Ctrl-C) in round 7 of 20 (last checkpoint: round 6)``, and so on."""
        return f"stopped by {signal_name(self.signum)} {self.state()}"

    def __reduce__(self) -> tuple[type[RunStopped], tuple[int, str, int | None, int, int, bool]]:  # type: ignore[override]
        return type(self), (
            self.signum,
            self.run_dir,
            self.in_round,
            self.rounds,
            self.checkpoint_round,
            self.resumable,
        )


def run_state(in_round: int | None, rounds: int, checkpoint_round: int, resumable: bool = True) -> str:
    """Where a run stands, for people: ``in round 7 of 20 (last checkpoint: round 6)``; ``in_round`` None:
    ``while setting up``; ``rounds`` + 1: after the last round, before the summary was written."""
    if in_round is None:
        return "while setting up" + ("" if resumable else " (nothing written)")
    if in_round > rounds:
        at = f"after the last round ({rounds}), before the summary was written"
    else:
        at = f"in round {in_round} of {rounds}"
    saved = f"round {checkpoint_round}" if checkpoint_round else "none yet, resuming starts over"
    return f"{at} (last checkpoint: {saved})"


def signal_name(signum: int) -> str:
    """``SIGINT (Ctrl-C)``, ``SIGTERM``, … ."""
    name = signal.Signals(signum).name
    return f"{name} (Ctrl-C)" if signum == signal.SIGINT else name


def signal_of(interrupt: KeyboardInterrupt) -> int:
    """The signal behind ``interrupt``: a :class:`Stopped`'s own, else SIGINT (Python's Ctrl-C)."""
    return interrupt.signum if isinstance(interrupt, Stopped) else signal.SIGINT


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, the first of ``signals`` to arrive raises :class:`Stopped`; later ones are ignored
    while the stop unwinds, so that stopping the workers and closing the files completes. The handlers
    before the block are restored after it."""
    stopping = False

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise Stopped(signum)

    before = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)


def leave_stops_to_parent(signals: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Ignore ``signals`` in this process: its parent stops it when the parent is stopped."""
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)


def exit_with_parent(alive: Connection) -> None:
    """End this process, at once and quietly, when the other end of ``alive`` (the reading end of a pipe
    whose writing end the parent holds) closes: when the parent closes it, or dies, however it dies. So a
    child never outlives its parent, even one killed by SIGKILL or one whose fork server is gone."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            alive.poll(None)  # readable only at the end: the parent never writes
        os._exit(0)

    threading.Thread(target=watch, name="pfedlora-parent-watch", daemon=True).start()
