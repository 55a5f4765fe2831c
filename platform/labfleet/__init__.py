"""labfleet: experiment orchestration for RL and deep generative models on Ray, Optuna and MLflow."""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("labfleet")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["Result", "SpecError", "Trainer", "__version__", "load", "results", "run", "suite", "sweep"]

# Imported on first use: they need torch, Ray or MLflow, which `labfleet --version` should not wait for.
_LAZY = {
    "Trainer": "labfleet.algorithms.base",  # the base class of your own trainers
    "load": "labfleet.playback",  # a trained seed back from MLflow
    "run": "labfleet.api", "suite": "labfleet.api", "sweep": "labfleet.api",  # the commands, from Python
    "results": "labfleet.api", "Result": "labfleet.api",
    "SpecError": "labfleet.errors",  # what bad input raises
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'labfleet' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (what tab completion in a notebook offers)."""
    return sorted(__all__)
