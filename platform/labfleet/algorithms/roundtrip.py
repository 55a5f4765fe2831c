"""`labfleet validate` on a `labfleet.Trainer` subclass of your own: one trip through the contract.

A class can have every method the base class requires (checked when the spec is read, `custom_info`) and
still fail on the first call the driver makes. Validation builds it on a throwaway seed on the CPU, in a
separate process bounded in time, and makes each call a trial actor makes once: `train_iteration()`,
`progress`, `evaluate()`, `state_dict()` read back with `torch.load(weights_only=True)`, `load_state_dict()`
into a second instance, and `probe()`. The first call that fails is named in one line with where it raised.
Only the class the spec names runs; nothing is written and no run is started.

Run as `python -m labfleet.algorithms.roundtrip SPEC_DIR` with the resolved spec as JSON on stdin; the
result is the last line of its stdout (the class may print what it likes before it).
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

from labfleet import metrics as M

TIMEOUT_S = 120.0  # a first iteration longer than this is not waited for (validation says it did not check)
MARKER = "labfleet-round-trip:"


class RoundTripFailed(Exception):
    """A call of the contract failed; the message names it."""


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _call(what: str, function: Callable[[], Any]) -> Any:
    try:
        return function()
    except Exception as exc:  # noqa: BLE001 - the user's code: any error is the answer
        raise RoundTripFailed(f"{what} raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                              f"{_where(exc)}") from None


def _metrics(what: str, value: Any, eval_only: bool = False) -> None:
    if not isinstance(value, dict):
        raise RoundTripFailed(f"{what} must return a dict of metric name -> number, got {type(value).__name__}")
    bad = [k for k, v in value.items() if not isinstance(k, str) or isinstance(v, bool)
           or not isinstance(v, (int, float)) or not math.isfinite(float(v))]
    if bad:
        raise RoundTripFailed(f"{what} returned names that are not strings, or values that are not finite "
                              f"numbers: {', '.join(map(repr, bad[:5]))}")
    others = [k for k in value if not k.startswith(M.EVAL_PREFIX)]
    if eval_only and others:
        raise RoundTripFailed(f"{what} must return only eval/* metrics; it returned {', '.join(others[:5])}")


def check_round_trip(cls: type, spec: Any, seed: int = 0) -> None:
    """The calls a trial actor makes, each once; raises RoundTripFailed naming the first that fails."""
    import numpy as np
    import torch

    name = cls.__name__
    trainer = _call(f"{name}(spec, seed, device)", lambda: cls(spec, seed, "cpu"))
    _metrics("train_iteration()", _call("train_iteration()", trainer.train_iteration))
    progress = _call("progress", lambda: trainer.progress)
    if isinstance(progress, bool) or not isinstance(progress, (int, np.integer)):
        raise RoundTripFailed(f"progress must be an int (budget spent, in {spec.budget.unit}), got "
                              f"{type(progress).__name__}")
    _metrics("evaluate()", _call("evaluate()", trainer.evaluate), eval_only=True)
    state = _call("state_dict()", trainer.state_dict)
    if not isinstance(state, dict):
        raise RoundTripFailed(f"state_dict() must return a dict, got {type(state).__name__}")
    buffer = io.BytesIO()
    _call("torch.save(state_dict())", lambda: torch.save(state, buffer))
    loaded = _call("torch.load(state_dict(), weights_only=True)",
                   lambda: torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    restored = _call(f"{name}(spec, seed, device)", lambda: cls(spec, seed, "cpu"))
    _call("load_state_dict()", lambda: restored.load_state_dict(loaded))
    if _call("progress", lambda: restored.progress) != progress:
        raise RoundTripFailed(f"progress is {restored.progress} after load_state_dict(), {progress} before it")
    probe = _call("probe()", restored.probe)
    if not isinstance(probe, (np.ndarray, torch.Tensor)):
        raise RoundTripFailed(f"probe() must return an array, got {type(probe).__name__}")
    for instance in (trainer, restored):
        _call("close()", instance.close)


def round_trip_problem(spec: Any, spec_dir: str, timeout: float = TIMEOUT_S) -> tuple[str | None, str | None]:
    """(what failed, None), (None, a note when the trip did not end within `timeout`), or (None, None)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "labfleet.algorithms.roundtrip", spec_dir],
                              input=json.dumps(spec.model_dump(mode="json")), capture_output=True, text=True,
                              env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, (f"{spec.algorithm}: one train_iteration/evaluate/state_dict round trip did not end within "
                      f"{timeout:g} s, so it was not checked")
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return f"the round trip's process ended without a result: {tail[:300]}", None
    answer = json.loads(lines[-1][len(MARKER):])
    return answer.get("problem"), None


def _main() -> None:
    from labfleet.spec.models import ExperimentSpec
    from labfleet.usercode import import_path

    spec = ExperimentSpec.model_validate(json.loads(sys.stdin.read()))
    try:
        check_round_trip(import_path(spec.algorithm, sys.argv[1]), spec, spec.seeds[0])
        problem = None
    except RoundTripFailed as exc:
        problem = str(exc)
    sys.stdout.write(f"\n{MARKER}{json.dumps({'problem': problem})}\n")
    sys.stdout.flush()
    os._exit(0)  # threads or processes the class left behind do not hold the answer back


if __name__ == "__main__":
    _main()
