"""Users' own training code: `algorithm: package.module:Name` in a spec.

`Name` is either
- a `labfleet.Trainer` subclass with its own `hparams_model`: it runs exactly as a built-in does; or
- a training function `main(config: dict, ctx) -> None` (the contract in ARCHITECTURE section 3):
  `config` is the spec's `hparams` (free-form), and `ctx` gives `seed`, `device`, `budget` (int),
  `report(step, metrics)`, `checkpoint(state)` and `restored`.

A function runs in a thread of the trial actor, wrapped as a `Trainer` (`FunctionTrainer`), so it gets
everything the built-ins get: its reports are the trial's metric records (names `eval/*` are
evaluations: they feed the trial's aggregates, the sweep objective and the pruner), its last checkpoint
travels to the driver (durable, restored after a restart as `ctx.restored`), pruning and Ctrl-C stop
its actor, and an exception fails its seed run with the error.

Validation imports the module (from the spec's directory or the working directory, as `env:` paths
are) and looks at what `Name` is. It never calls a function; `labfleet validate` makes one round trip
through a Trainer subclass in a separate process (`labfleet.algorithms.roundtrip`).
"""

from __future__ import annotations

import inspect
import io
import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from labfleet import metrics as M
from labfleet.algorithms.base import Trainer
from labfleet.algorithms.info import AlgorithmInfo
from labfleet.spec.models import ExperimentSpec


class FreeFormHParams(BaseModel):
    """A training function's `hparams`: any mapping (the function reads what it needs)."""

    model_config = ConfigDict(extra="allow")


def is_import_path(name: str) -> bool:
    return ":" in name


def custom_info(path: str, spec_dir: str | None = None) -> AlgorithmInfo:
    """The AlgorithmInfo of `package.module:Name`; raises ImportError or TypeError saying what is wrong."""
    from labfleet.usercode import import_path

    obj = import_path(path, spec_dir)
    if isinstance(obj, type) and issubclass(obj, Trainer):
        model = getattr(obj, "hparams_model", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"{path} is a labfleet.Trainer subclass without a pydantic `hparams_model`")
        missing = sorted(getattr(obj, "__abstractmethods__", ()))
        if missing:
            raise TypeError(f"{path} does not define {', '.join(missing)}, which every labfleet.Trainer must "
                            "(the contract: docs/your-own-code.md)")
        return AlgorithmInfo(name=path, kind="custom", hparams=model, trainer=obj,
                             summary=_own_doc(obj, "your own Trainer subclass"),
                             budget_units=("env_steps", "epochs", "iterations"), rollout_workers=False,
                             eval_metrics=(), primary_metric="")
    if isinstance(obj, type) or not callable(obj):
        raise TypeError(f"{path} must name a labfleet.Trainer subclass or a function main(config, ctx); it names "
                        f"{'the class ' + obj.__name__ if isinstance(obj, type) else 'a ' + type(obj).__name__}")
    try:
        inspect.signature(obj).bind({}, None)
    except TypeError:
        raise TypeError(f"{path} must take (config, ctx): its signature is {inspect.signature(obj)}") from None
    except ValueError:  # a builtin without a signature: not a training function
        raise TypeError(f"{path} is not a Python function main(config, ctx)") from None
    return AlgorithmInfo(name=path, kind="custom", hparams=FreeFormHParams, trainer=FunctionTrainer,
                         summary=_own_doc(obj, "your own training function"),
                         budget_units=("env_steps", "epochs", "iterations"), rollout_workers=False,
                         eval_metrics=(), primary_metric="")


def _own_doc(obj: Any, default: str) -> str:
    """The first line of the object's own docstring (not one inherited from labfleet.Trainer or abc.ABC)."""
    return (inspect.cleandoc(obj.__doc__).splitlines() or [default])[0] if obj.__doc__ else default


class Stop(BaseException):
    """Raised inside the function's thread to end it when its trainer is closed (not an error)."""


@dataclass
class Context:
    """What a training function gets as `ctx` (the contract's names)."""

    seed: int
    device: str
    budget: int
    restored: dict[str, Any] | None = None
    _events: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=64), repr=False)
    _closing: threading.Event = field(default_factory=threading.Event, repr=False)

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """Log `metrics` at `step` (in budget units: progress is step / budget)."""
        values = {str(k): float(v) for k, v in metrics.items()}
        self._put(("report", int(step), values))

    def log_artifact(self, name: str, data: bytes | str) -> None:
        """A file of the seed run (`name`: its path under the run's artifacts, e.g. "plots/loss.png")."""
        path = str(name).strip().lstrip("/")
        if not path or ".." in path.split("/"):
            raise ValueError(f"artifact name {name!r}: a relative path without '..' is expected")
        self._put(("artifact", path, data.encode() if isinstance(data, str) else bytes(data)))

    def log_image(self, name: str, image: Any) -> None:
        """An image of the seed run as `images/<name>.png`: a (H, W), (H, W, 3) or (H, W, 4) array (uint8, or
        floats in [0, 1]), or PNG bytes."""
        if isinstance(image, bytes | bytearray):
            data = bytes(image)
        else:
            from matplotlib import image as mpimg

            array = np.asarray(image)
            if array.dtype != np.uint8:
                array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
            if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
                raise ValueError(f"image {name!r}: expected (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
            buffer = io.BytesIO()
            mpimg.imsave(buffer, array, format="png", cmap="gray", vmin=0, vmax=255)
            data = buffer.getvalue()
        self.log_artifact(f"images/{name}.png", data)

    def checkpoint(self, state: dict[str, Any]) -> None:
        """The latest checkpoint: anything `torch.load(weights_only=True)` reads back (tensors, numbers,
        strings, lists, dicts). It is copied now, so the function may go on changing its objects."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._put(("checkpoint", buffer.getvalue()))

    def _put(self, event: tuple) -> None:
        while True:  # bounded: a function far ahead of the driver waits (and can be stopped meanwhile)
            if self._closing.is_set():
                raise Stop()
            try:
                self._events.put(event, timeout=0.2)
                return
            except queue.Full:
                continue


IDLE_S = 0.25  # how long `train_iteration` waits for the function before it returns without a report


class FunctionTrainer(Trainer):
    """A training function as a Trainer: each `train_iteration` hands over the function's next report."""

    hparams_model = FreeFormHParams

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu"):
        super().__init__(spec, seed, device)
        from labfleet.usercode import import_path

        self.function = import_path(spec.algorithm)
        self.ctx = Context(self.seed, str(self.device), spec.budget.total)
        self.step = 0
        self.finished = False
        self.latest_evals: dict[str, float] = {}
        self._checkpoint: bytes | None = None
        self.artifacts: dict[str, bytes] = {}  # logged by the function since the driver last took them
        self.new_checkpoint = False  # the function checkpointed since the driver last took one
        self._thread: threading.Thread | None = None

    # --- the function's thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.function(dict(self.spec.hparams), self.ctx)
            event: tuple = ("done",)
        except Stop:
            return
        except BaseException as exc:  # the function's own error: its seed run fails with it
            event = ("error", exc)
        try:
            self.ctx._put(event)
        except Stop:
            return

    def _next(self) -> tuple:
        """The function's next event, or ("idle",) when it sent none within `IDLE_S`: the actor's chunk then
        ends on time, and what the function reported so far reaches the driver even if it hangs next."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="labfleet-function", daemon=True)
            self._thread.start()
        try:
            return self.ctx._events.get(timeout=IDLE_S)
        except queue.Empty:
            return ("idle",)

    # --- the Trainer interface ------------------------------------------------------------------
    def train_iteration(self) -> dict[str, float]:
        """Up to the function's next report (checkpoints on the way are kept); {} when it returned, or when
        it reported nothing for `IDLE_S` (it is busy, or hangs)."""
        while True:
            event = self._next()
            if event[0] == "checkpoint":
                self._checkpoint = event[1]
                self.new_checkpoint = True
            elif event[0] == "artifact":
                self.artifacts[event[1]] = event[2]
            elif event[0] == "report":
                _, step, values = event
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    raise FloatingPointError(f"non-finite {', '.join(bad)} reported at step {step}")
                self.step = max(self.step, step)
                self.latest_evals.update({k: v for k, v in values.items() if k.startswith(M.EVAL_PREFIX)})
                return values
            elif event[0] == "error":
                raise event[1]
            elif event[0] == "idle":
                return {}
            else:
                self.finished = True
                return {}

    @property
    def progress(self) -> int:
        return self.step

    @property
    def done(self) -> bool:
        return self.finished

    def evaluate(self) -> dict[str, float]:
        """The latest `eval/*` values the function reported (it evaluates itself)."""
        return dict(self.latest_evals)

    def probe(self) -> np.ndarray:
        return np.array([self.step, len(self.latest_evals)])

    def state_dict(self) -> dict[str, Any]:
        """The function's own last checkpoint, with the step it reached (for the progress display)."""
        state = torch.load(io.BytesIO(self._checkpoint), weights_only=True) if self._checkpoint else None
        self.new_checkpoint = False
        return {"function": state, "step": self.step, "evals": dict(self.latest_evals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After a restart: the function starts again, with its last checkpoint as `ctx.restored`."""
        self.ctx.restored = state["function"]
        self.step = int(state["step"])
        self.latest_evals = dict(state["evals"])

    def take_artifacts(self) -> dict[str, bytes]:
        artifacts, self.artifacts = self.artifacts, {}
        return artifacts

    def close(self) -> None:
        self.ctx._closing.set()
