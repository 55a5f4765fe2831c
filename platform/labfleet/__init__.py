"""labfleet: experiment orchestration for RL and deep generative models on Ray, Optuna and MLflow."""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("labfleet")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["Trainer", "__version__", "load"]


def __getattr__(name: str) -> Any:
    """`labfleet.Trainer` (the base class of your own trainers) and `labfleet.load` (a trained seed back from
    MLflow), imported on first use: they need torch, which `labfleet --version` should not wait for."""
    if name == "Trainer":
        from labfleet.algorithms.base import Trainer

        return Trainer
    if name == "load":
        from labfleet.playback import load

        return load
    raise AttributeError(f"module 'labfleet' has no attribute {name!r}")
