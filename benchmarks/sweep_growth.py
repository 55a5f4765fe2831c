"""How the driver's cost grows with the size of a sweep: one long sweep of trivial trials.

    python benchmarks/sweep_growth.py [--trials 2000] [--parallel 2] [--sampler tpe] [--window 100]

The trials are those of `benchmarks/sweep_overhead.py` (value iteration on FrozenLake for 5 sweeps and a
10-episode evaluation, a few milliseconds; `hparams.gamma` sampled), run by `labfleet sweep` in this
process with SQLite for the study and for MLflow, the whole record kept. Per window of `--window`
finished trials it reports:
- wall time per trial (from Optuna's completion times of the trials);
- the sampler's own time per trial: every call of the sampler's `infer_relative_search_space`,
  `sample_relative` and `sample_independent` is timed (TPE's cost grows with the number of trials;
  `--sampler random` shows the driver without that growth);
- labfleet's time per trial, the difference;
- the driver process's resident memory (sampled every second) at the end of the window.
Then it times `labfleet report` on the finished sweep (a subprocess, as a user runs it), and writes the
plot `sweep_growth.png` (per-trial costs and memory against trials finished) next to `--out`.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a loopback-only local Ray (see labfleet.cli)
import optuna  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from rich.console import Console  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_overhead import SPEC, work  # noqa: E402

SAMPLER_METHODS = ("infer_relative_search_space", "sample_relative", "sample_independent")


class SamplerClock:
    """Adds up the time spent inside the sampler's methods, per trial number (timing only: the calls go
    through unchanged)."""

    def __init__(self, cls: type) -> None:
        self.seconds: dict[int, float] = {}
        for name in SAMPLER_METHODS:
            setattr(cls, name, self._timed(getattr(cls, name)))

    def _timed(self, method):  # type: ignore[no-untyped-def]
        def timed(sampler, study, trial, *args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return method(sampler, study, trial, *args, **kwargs)
            finally:
                self.seconds[trial.number] = self.seconds.get(trial.number, 0.0) + time.perf_counter() - start
        return timed


class MemoryClock(threading.Thread):
    """This process's resident memory, every `every` seconds."""

    def __init__(self, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()

    def run(self) -> None:
        process = psutil.Process()
        while not self.stop.is_set():
            self.samples.append((time.time(), process.memory_info().rss / 2**20))
            self.stop.wait(self.every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--sampler", choices=["tpe", "random"], default="tpe")
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("sweep_growth"))
    parser.add_argument("--keep", action="store_true", help="keep the stores (in --out) for a look afterwards")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from labfleet.orchestration.commands import execute_sweep
    from labfleet.spec.loading import resolve_spec_data

    sampler_class = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}[args.sampler]
    clock = SamplerClock(sampler_class)
    work(0.9)  # imports and first-call costs out of the measurement
    own = time.perf_counter()
    for gamma in (0.6, 0.9, 0.99):
        work(gamma)
    own = (time.perf_counter() - own) / 3
    ray.init(logging_level=logging.WARNING, include_dashboard=False)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as name:
        tmp = args.out / "stores" if args.keep else Path(name)
        tmp.mkdir(parents=True, exist_ok=True)
        data = {**SPEC, "name": "growth", "tracking": {"experiment": "growth"},
                "sweep": {**SPEC["sweep"], "n_trials": args.trials, "max_parallel": args.parallel,
                          "sampler": {"type": args.sampler, "seed": 0}}}
        spec = resolve_spec_data(data, "<bench>", check_env=False)
        storage, tracking = f"sqlite:///{tmp / 'optuna.db'}", f"sqlite:///{tmp / 'mlflow.db'}"
        MlflowClient(tracking).search_experiments()  # an existing store, as from a user's second sweep on
        memory = MemoryClock()
        memory.start()
        start = time.time()
        with open(os.devnull, "w") as devnull:
            code = execute_sweep(data, spec, tmp / "growth.yaml", storage=storage, n_trials=None,
                                 cli_tracking_uri=tracking, address=None, console=Console(file=devnull),
                                 quiet=True).code
        wall = time.time() - start
        memory.stop.set()
        memory.join()
        assert code == 0, code
        ray.shutdown()
        study = optuna.load_study(study_name="growth", storage=storage)
        # The driver asks for trial k+1 once trial k-1 (of 2 at a time) has ended: the times of the asks
        # (Optuna's start times, stamped in the driver's thread) pace the sweep. Completion times do not:
        # the writer thread tells Optuna after each trial's record, so they bunch up when it lags behind.
        done = [t for t in study.trials if t.datetime_complete]
        asked = sorted((t.datetime_start.timestamp(), t.number) for t in study.trials)
        rows = []
        previous = start
        for end in range(args.window, len(asked) + 1, args.window):
            chunk = asked[end - args.window:end]
            seconds = chunk[-1][0] - previous
            previous = chunk[-1][0]
            sampler = sum(clock.seconds.get(number, 0.0) for _, number in chunk) / args.window
            per_trial = seconds / args.window
            at = bisect.bisect_right([t for t, _ in memory.samples], chunk[-1][0]) - 1
            rows.append({"trials": end, "wall_ms": 1000 * per_trial, "sampler_ms": 1000 * sampler,
                         "labfleet_ms": 1000 * (per_trial - sampler - own / args.parallel),
                         "rss_mib": memory.samples[max(at, 0)][1]})
        report_start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "labfleet", "report", "growth", "--tracking-uri", tracking,
                                 "--storage", storage, "--out", str(args.out / "report")],
                                capture_output=True, text=True)
        report_s = time.perf_counter() - report_start
        if result.returncode != 0:
            print(result.stdout[-2000:], result.stderr[-2000:])
    print(f"{len(done)} trials in {wall:.1f} s ({1000 * wall / len(done):.0f} ms per trial, the trials' own work "
          f"{1000 * own:.1f} ms each); labfleet report: {report_s:.1f} s (exit {result.returncode})")
    print("\n| trials finished | wall per trial (ms) | sampler per trial (ms) | labfleet per trial (ms) | "
          "driver RSS (MiB) |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['trials']} | {row['wall_ms']:.0f} | {row['sampler_ms']:.1f} | {row['labfleet_ms']:.0f} | "
              f"{row['rss_mib']:.0f} |")
    (args.out / f"growth-{args.sampler}.json").write_text(json.dumps(
        {"sampler": args.sampler, "trials": len(done), "wall_s": wall, "work_ms": 1000 * own,
         "report_s": report_s, "rows": rows}, indent=1))
    plot(args.out)


def plot(out: Path) -> None:
    """sweep_growth.png from every growth-*.json in `out` (one line per sampler)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (costs, memory) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, path in enumerate(sorted(out.glob("growth-*.json"))):
        result = json.loads(path.read_text())
        trials = [r["trials"] for r in result["rows"]]
        colour = f"C{i}"
        costs.plot(trials, [r["wall_ms"] for r in result["rows"]], "-", c=colour,
                   label=f"{result['sampler']}: wall per trial")
        costs.plot(trials, [r["sampler_ms"] for r in result["rows"]], ":", c=colour,
                   label=f"{result['sampler']}: sampler's own")
        costs.plot(trials, [r["labfleet_ms"] for r in result["rows"]], "--", c=colour,
                   label=f"{result['sampler']}: labfleet's")
        memory.plot(trials, [r["rss_mib"] for r in result["rows"]], "-", c=colour, label=result["sampler"])
    costs.set(xlabel="trials finished", ylabel="ms per trial", title="cost per trial")
    costs.set_ylim(bottom=0)
    costs.legend(fontsize=7)
    memory.set(xlabel="trials finished", ylabel="MiB", title="driver resident memory")
    memory.set_ylim(bottom=0)
    memory.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweep_growth.png", dpi=110)


if __name__ == "__main__":
    main()
