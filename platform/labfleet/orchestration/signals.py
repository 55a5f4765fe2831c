"""SIGTERM as Ctrl-C, without importing Ray: a training command installs `raise_interrupt` first thing
(the CLI does so before Ray is imported, whose import reads settings the CLI makes first)."""

from __future__ import annotations

import threading
from typing import Any

TERMINATED = threading.Event()  # set by SIGTERM: the command exits without touching Ray again
# Set by Ctrl-C and SIGTERM. The KeyboardInterrupt they raise lands wherever the main thread is, and Python
# ignores one raised inside a weakref callback or `__del__` (it prints "Exception ignored in" and goes on):
# the driver's loop checks this at every round, so such a signal still stops the command.
INTERRUPTED = threading.Event()


def raise_interrupt(signum: int, frame: Any) -> None:
    """A SIGTERM handler: stop the way Ctrl-C stops (every open run ends KILLED)."""
    TERMINATED.set()
    INTERRUPTED.set()
    raise KeyboardInterrupt(f"signal {signum}")


def ctrl_c(signum: int, frame: Any) -> None:
    """A SIGINT handler: Python's own, remembered (`INTERRUPTED`)."""
    INTERRUPTED.set()
    raise KeyboardInterrupt(f"signal {signum}")


def check_interrupted() -> None:
    """Raise the KeyboardInterrupt of a signal that came but was swallowed where it landed."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt("an earlier Ctrl-C or SIGTERM")
