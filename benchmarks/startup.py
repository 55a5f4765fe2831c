"""From the command to the first training step: `labfleet run` of the shipped `cartpole_ppo.yaml` with one seed,
on a local Ray and `--in-process`, rounds alternating the two, each on a new SQLite store.

    python benchmarks/startup.py [--rounds 3] [--steps 2048]

Each command runs with a `sitecustomize` of this script's making on its path (it reaches Ray's workers
too, through PYTHONPATH): the first call of a trial's training iteration writes the time since the
command started to a file. Printed per round and mode: the first output line, the first training step
and the whole command, in seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = Path(__file__).resolve().parents[1] / "experiments" / "cartpole_ppo.yaml"

HOOK = '''
import os, sys, time
_OUT, _T0 = os.environ.get("STARTUP_OUT"), float(os.environ.get("STARTUP_T0", "0"))

def _first_step():
    try:
        with open(_OUT, "x") as out:
            out.write(f"{time.time() - _T0:.3f}")
    except FileExistsError:
        pass

class _Finder:
    """Wraps TrialWorker._iterate once labfleet.orchestration.trial is imported."""
    def find_spec(self, name, path=None, target=None):
        if name != "labfleet.orchestration.trial":
            return None
        sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        original_exec = loader.exec_module
        def exec_module(module):
            original_exec(module)
            iterate = module.TrialWorker._iterate
            def _iterate(self, *args, **kwargs):
                _first_step()
                return iterate(self, *args, **kwargs)
            module.TrialWorker._iterate = _iterate
        loader.exec_module = exec_module
        return spec

if _OUT:
    sys.meta_path.insert(0, _Finder())
'''


def one(mode: str, steps: int, hook_dir: Path, work: Path) -> tuple[float, float, float]:
    store = work / f"{mode}-{time.monotonic_ns()}"
    store.mkdir()
    out = store / "first_step"
    args = ["run", str(SPEC), "--set", "seeds=[0]", "--set", f"budget.env_steps={steps}"]
    args += ["--in-process"] if mode == "in-process" else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]),
           "STARTUP_OUT": str(out), "PYTHONUNBUFFERED": "1"}
    start = time.time()
    env["STARTUP_T0"] = repr(start)
    proc = subprocess.Popen([sys.executable, "-m", "labfleet", *args], cwd=store, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    first_line = None
    for _ in proc.stdout:
        if first_line is None:
            first_line = time.time() - start
    code = proc.wait()
    whole = time.time() - start
    assert code == 0, f"{mode}: exit {code}"
    return first_line or float("nan"), float(out.read_text()), whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2048)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, float]]] = {"ray": [], "in-process": []}
    with tempfile.TemporaryDirectory(prefix="labfleet-startup-") as tmp:
        hook_dir = Path(tmp) / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        for r in range(args.rounds):
            for mode in (("ray", "in-process") if r % 2 == 0 else ("in-process", "ray")):
                first, step, whole = one(mode, args.steps, hook_dir, Path(tmp))
                results[mode].append((first, step, whole))
                print(f"round {r + 1} {mode:>10}: first line {first:.2f} s, first training step {step:.2f} s, "
                      f"whole command {whole:.2f} s", flush=True)
    for mode, rows in results.items():
        medians = [statistics.median(column) for column in zip(*rows, strict=True)]
        print(f"median {mode:>10}: first line {medians[0]:.2f} s, first training step {medians[1]:.2f} s, "
              f"whole command {medians[2]:.2f} s")


if __name__ == "__main__":
    main()
