"""Where trial actors run: Ray actors in placement groups, or objects in the driver's own process.

The runner (runner.py) starts trial workers (trial.py), calls their methods and waits for the first result
through a `Backend`, never through Ray directly:

- `RayBackend`: each worker is a Ray actor, reserved with its rollout workers and data-parallel ranks as one
  placement group; calls are Ray tasks, and a call whose process, node or result died is *lost* (the runner
  retries it from the seed's checkpoint).
- `InProcessBackend` (`labfleet run --in-process`): each worker is a plain object in the driver; a call runs
  when the runner waits for it, oldest first, so the seeds of a run take turns chunk by chunk on one
  process. No Ray instance starts, which saves its start (seconds) and the actor's; work that needs other
  processes (rollout workers, data-parallel ranks) cannot run this way, and the command says so before it
  starts anything. Nothing is ever lost: a worker that raises fails its seed, as in an actor.
"""

from __future__ import annotations

import itertools
import re
import traceback
from typing import Any, Protocol

from labfleet.algorithms.base import resolve_device


class Backend(Protocol):
    """How the runner reaches its trial workers. `cls` is `TrialWorker` or `TrialWorkerGroup`; `group` is
    what `reserve` returned; a call returns a future that `wait` and `get` take."""

    name: str
    errors: tuple[type[BaseException], ...]  # what `get` raises when a call failed

    def reserve(self, bundles: list[dict[str, float]]) -> Any: ...

    def placed(self, group: Any) -> bool: ...

    def fits(self, bundles: list[dict[str, float]]) -> bool: ...

    def start(self, cls: type, group: Any, cpus: float, gpus: float, *args: Any) -> Any: ...

    def call(self, actor: Any, method: str, *args: Any) -> Any: ...

    def ask(self, actor: Any, method: str, timeout: float) -> Any: ...

    def get(self, future: Any) -> Any: ...

    def wait(self, futures: list[Any], timeout: float) -> list[Any]: ...

    def free(self, actor: Any, group: Any) -> None: ...

    def cpus(self) -> float: ...

    def lost(self, exc: BaseException) -> bool: ...

    def error_text(self, exc: BaseException) -> str: ...


def total(bundles: list[dict[str, float]]) -> dict[str, float]:
    needed: dict[str, float] = {}
    for bundle in bundles:
        for resource, amount in bundle.items():
            needed[resource] = needed.get(resource, 0.0) + amount
    return needed


class RayBackend:
    """Ray actors, one placement group per seed (or per unit of seeds sharing an actor)."""

    name = "ray"

    def __init__(self) -> None:
        from ray.exceptions import RayError

        self.errors: tuple[type[BaseException], ...] = (RayError,)
        self._remote: dict[type, Any] = {}

    def reserve(self, bundles: list[dict[str, float]]) -> Any:
        from ray.util.placement_group import placement_group

        return placement_group(bundles, strategy="PACK")

    def placed(self, group: Any) -> bool:
        """Whether Ray has made the reservation: the GCS's table says so (no task is scheduled). Not
        `group.wait` with a short timeout: on a loaded machine the GCS answers later than that, and a placed
        group read as unplaced let an idle actor replace a seed's own, already starting, actor (a wasted
        start)."""
        from ray.util.placement_group import placement_group_table

        try:
            return placement_group_table(group).get("state") == "CREATED"
        except Exception:  # removed meanwhile, or Ray is shutting down
            return False

    def fits(self, bundles: list[dict[str, float]]) -> bool:
        """Whether the cluster's free resources hold these bundles now."""
        import ray

        try:
            free = ray.available_resources()
        except Exception:  # Ray is shutting down
            return True
        return all(free.get(resource, 0.0) + 1e-9 >= amount for resource, amount in total(bundles).items())

    def start(self, cls: type, group: Any, cpus: float, gpus: float, *args: Any) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote = self._remote.get(cls)
        if remote is None:
            remote = self._remote[cls] = ray.remote(cls)
        return remote.options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
        ).remote(*args)

    def call(self, actor: Any, method: str, *args: Any) -> Any:
        return getattr(actor, method).remote(*args)

    def ask(self, actor: Any, method: str, timeout: float) -> Any:
        import ray

        return ray.get(getattr(actor, method).remote(), timeout=timeout)

    def get(self, future: Any) -> Any:
        import ray

        return ray.get(future)

    def wait(self, futures: list[Any], timeout: float) -> list[Any]:
        import ray

        ready, _ = ray.wait(futures, num_returns=1, timeout=timeout)
        return list(ready)

    def free(self, actor: Any, group: Any) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            if actor is not None:
                ray.kill(actor, no_restart=True)
            if group is not None:
                remove_placement_group(group)
        except Exception:  # Ray is shutting down (Ctrl-C reaches its processes too): nothing left to free
            pass

    def cpus(self) -> float:
        import ray

        try:
            return float(ray.cluster_resources().get("CPU", 1.0))
        except Exception:  # Ray is shutting down: the launch that asked fails and says so
            return 1.0

    def lost(self, exc: BaseException) -> bool:
        """Whether a trial's call failed because something died (its actor's process, a rollout worker or
        data-parallel rank it called, a node, or the node holding its result) rather than because its code
        raised. A trainer that could not be built fails the same way at every try, so it counts as raised."""
        from ray.exceptions import (
            LocalRayletDiedError,
            NodeDiedError,
            ObjectLostError,
            RayActorError,
            RayTaskError,
            WorkerCrashedError,
        )

        cause = exc.cause if isinstance(exc, RayTaskError) else exc
        if isinstance(cause, RayActorError):
            return not cause.actor_init_failed
        return isinstance(cause, (ObjectLostError, WorkerCrashedError, NodeDiedError, LocalRayletDiedError))

    def error_text(self, exc: BaseException) -> str:
        from ray.exceptions import RayTaskError

        cause = exc.cause if isinstance(exc, RayTaskError) else None
        text = str(exc)
        if cause is not None:
            text = f"{type(cause).__name__}: {cause}\n{text}"
        return strip_ansi(text)


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # Ray colours the actor's name in its error text


class CallFailed(Exception):
    """A call of an in-process worker raised (its trainer, or building it): the seed fails, as in an actor."""

    def __init__(self, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.text = "".join(traceback.format_exception(error)).rstrip()


class LocalWorker:
    """A trial worker in the driver's process, built at its first call (as an actor is built before its first
    call runs): a spec that fails to build fails that call, after the run's start is recorded."""

    def __init__(self, cls: type, gpus: float, args: tuple[Any, ...]):
        self.cls, self.gpus, self.args = cls, gpus, args
        self.instance: Any = None

    def resolve(self) -> Any:
        if self.instance is None:
            self.instance = self.cls(*self.args, device_of=self.device_of)
        return self.instance

    def device_of(self, requested: str) -> str:
        """`auto` is CUDA only where the trial holds a GPU (`resources.gpus_per_trial`) and torch sees one;
        the driver's own `CUDA_VISIBLE_DEVICES` is left as it is (later trials of this process may hold one)."""
        return resolve_device(requested, None if self.gpus > 0 else [], hide=False)

    def close(self) -> None:
        held = self.instance
        self.instance = None
        for part in (getattr(held, "trainer", None), getattr(held, "group", None)):
            if part is not None:
                part.close()


_ORDER = itertools.count()


class LocalCall:
    """A pending call; it runs when the runner waits for it."""

    def __init__(self, worker: LocalWorker, method: str, args: tuple[Any, ...]):
        self.worker, self.method, self.args = worker, method, args
        self.order = next(_ORDER)  # calls run oldest first
        self.ran = False
        self.result: Any = None
        self.error: CallFailed | None = None

    def run(self) -> None:
        if self.ran:
            return
        try:
            self.result = getattr(self.worker.resolve(), self.method)(*self.args)
        except Exception as exc:  # its seed fails (Ctrl-C and SystemExit propagate: the command stops)
            self.error = CallFailed(exc)
        self.ran = True


class InProcessBackend:
    """Trial workers as objects in this process; every call runs in the driver's thread when waited for."""

    name = "in-process"
    errors: tuple[type[BaseException], ...] = (CallFailed,)

    def reserve(self, bundles: list[dict[str, float]]) -> Any:
        return object()

    def placed(self, group: Any) -> bool:
        return True

    def fits(self, bundles: list[dict[str, float]]) -> bool:
        return True

    def start(self, cls: type, group: Any, cpus: float, gpus: float, *args: Any) -> Any:
        return LocalWorker(cls, gpus, args)

    def call(self, actor: Any, method: str, *args: Any) -> Any:
        return LocalCall(actor, method, args)

    def ask(self, actor: Any, method: str, timeout: float) -> Any:
        return getattr(actor.resolve(), method)()

    def get(self, future: Any) -> Any:
        future.run()
        if future.error is not None:
            raise future.error
        return future.result

    def wait(self, futures: list[Any], timeout: float) -> list[Any]:
        """Run the oldest call: the runner queues each seed's next call after its result, so seeds take turns."""
        oldest = min(futures, key=lambda f: f.order)
        oldest.run()
        return [oldest]

    def free(self, actor: Any, group: Any) -> None:
        if actor is not None:
            actor.close()

    def cpus(self) -> float:
        return 1.0  # one process trains every seed, in turns

    def lost(self, exc: BaseException) -> bool:
        return False

    def error_text(self, exc: BaseException) -> str:
        return exc.text if isinstance(exc, CallFailed) else f"{type(exc).__name__}: {exc}"


def in_process_problem(bundles: list[dict[str, float]]) -> str | None:
    """Why one seed's work cannot run in the driver's process (it needs other processes), or None."""
    if len(bundles) > 1:
        return ("--in-process trains in the driver's own process; this spec needs more processes "
                "(resources.rollout_workers or resources.data_parallel above their defaults): drop --in-process")
    return None

