"""labfleet: experiment orchestration for RL and deep generative models on Ray, Optuna and MLflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("labfleet")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
