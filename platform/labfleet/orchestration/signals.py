"""SIGTERM as Ctrl-C, without importing Ray: a training command installs `raise_interrupt` first thing
(the CLI does so before Ray is imported, whose import reads settings the CLI makes first)."""

from __future__ import annotations

import threading
from typing import Any

TERMINATED = threading.Event()  # set by SIGTERM: the command exits without touching Ray again


def raise_interrupt(signum: int, frame: Any) -> None:
    """A SIGTERM handler: stop the way Ctrl-C stops (every open run ends KILLED)."""
    TERMINATED.set()
    raise KeyboardInterrupt(f"signal {signum}")
