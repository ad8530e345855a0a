"""A command in a real pseudo-terminal, as a person runs it: Ctrl-C there is the terminal's SIGINT to the
whole foreground process group (the command and every worker it started), which a background process
started from a script would not get."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import sys
import threading
import time
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Terminal:
    """``python <script> <args>`` as the session leader of a new pseudo-terminal, its output collected."""

    def __init__(self, script: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once
            os.execve(sys.executable, [sys.executable, str(script), *args], env or dict(os.environ))
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.status: int | None = None

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: every process holding the terminal is gone
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    @property
    def output(self) -> str:
        """Everything printed so far, without colours and cursor movements."""
        return ANSI.sub("", b"".join(self._chunks).decode(errors="replace"))

    def press_ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to every process of the command's group, as a job scheduler does."""
        os.killpg(self.pid, signum)

    def wait(self, timeout: float) -> int:
        """The exit status (128 + signal where a signal killed it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                self._reader.join(timeout=5)
                return self.status if self.status >= 0 else 128 - self.status
            time.sleep(0.02)
        raise TimeoutError(f"the command did not end within {timeout} s:\n{self.output[-3000:]}")

    def group_is_gone(self, timeout: float = 5.0) -> bool:
        """Whether every process of the command's group has ended (no worker left behind)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        """End the command and its group, whatever state they are in (test cleanup)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.status is None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        os.close(self.fd)
