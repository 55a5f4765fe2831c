"""How many results per second the single driver takes in, against the number of concurrent trials.

    python benchmarks/driver_ingest.py [--trials 8 16 32] [--rate 40] [--seconds 20] [--tracking-uri URI]

Each trial is a training function (`benchmarks/ingest/reporter.py`) that does nothing but report two
metrics `--rate` times a second for `--seconds` seconds; N trials run at once (one `labfleet run` of a
spec with N seeds, one actor each, on a local Ray that advertises N CPUs: the actors sleep between
reports). Every report goes the whole way: through Ray to the driver, deduplicated, into MLflow
(`log_batch` through the writer thread) and onto the progress board. Reported per N: the reports logged
(of N x rate x seconds), the wall time of the command (actor start-up included), how long all N trials
were reporting at once, the rate they produced reports at (N x rate), and the rate the driver took them
in over that stretch (from the driver's own timestamps on each metric): it keeps up when the two match.
`--tracking-uri http://127.0.0.1:PORT` measures a tracking server (e.g. `deploy/local/mlflow-server.sh`
on Postgres) instead of SQLite.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from rich.console import Console  # noqa: E402

HERE = Path(__file__).resolve().parent / "ingest"


def one(trials: int, rate: float, seconds: float, tracking: str, tmp: Path) -> dict[str, float]:
    from labfleet.orchestration.commands import execute
    from labfleet.orchestration.session import Planned
    from labfleet.spec.loading import load_spec

    budget = int(rate * seconds)
    spec_path = HERE / f"ingest-{trials}.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": f"ingest-{trials}", "algorithm": "reporter:main", "seeds": list(range(trials)),
        "budget": {"iterations": budget}, "hparams": {"rate": rate},
        "resources": {"cpus_per_trial": 1}, "tracking": {"experiment": "ingest"}}))
    try:
        spec = load_spec(spec_path)
        start = time.perf_counter()
        with open(os.devnull, "w") as devnull:
            code = execute([Planned(spec, spec_path)], source=str(spec_path), cli_tracking_uri=tracking,
                           address=None, console=Console(file=devnull), quiet=True).code
        wall = time.perf_counter() - start
    finally:
        spec_path.unlink()
    assert code == 0, code
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("ingest")
    runs = [r for r in client.search_runs([experiment.experiment_id], f"tags.`mlflow.runName` LIKE 'ingest-{trials}%'")
            if r.data.tags.get("labfleet.role") == "seed"]
    # The driver stamps each metric when it logs it: the busiest stretch of `window` seconds in which every
    # trial was reporting shows what it takes in once the actors have started (their start-up, a second or
    # two of CPU each, is most of the wall time on a small machine).
    stamps, firsts, lasts = [], [], []
    for run in runs:
        times = sorted(m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id, "loss"))
        stamps += times
        firsts.append(times[0])
        lasts.append(times[-1])
    stamps.sort()
    together = (max(firsts), min(lasts))  # every trial reporting
    inside = [t for t in stamps if together[0] <= t <= together[1]]
    span = together[1] - together[0]
    reports = trials * budget
    return {"trials": trials, "reports": reports, "logged": len(stamps), "wall_s": wall,
            "steady_per_s": len(inside) / span if span > 0 else float("nan"), "together_s": span,
            "produced_per_s": trials * rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", type=Path, default=Path("driver_ingest"),
                        help="where ingest-sqlite.json / ingest-server.json and the plot driver_ingest.png go")
    args = parser.parse_args()
    ray.init(num_cpus=max(args.trials), logging_level=logging.WARNING, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}})
    rows = []
    with tempfile.TemporaryDirectory() as name:
        tracking = args.tracking_uri or f"sqlite:///{Path(name) / 'mlflow.db'}"
        MlflowClient(tracking).search_experiments()
        for n in args.trials:
            row = one(n, args.rate, args.seconds, tracking, Path(name))
            rows.append(row)
            print(row, flush=True)
    print("\n| trials | reports logged | wall (s) | all reporting for (s) | produced/s | taken in/s (steady) "
          "| tracking |\n|---|---|---|---|---|---|---|")
    where = "server" if args.tracking_uri else "sqlite"
    for row in rows:
        print(f"| {row['trials']} | {row['logged']}/{row['reports']} | {row['wall_s']:.1f} | "
              f"{row['together_s']:.1f} | {row['produced_per_s']:.0f} | {row['steady_per_s']:.0f} | {where} |")
    ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ingest-{where}.json").write_text(json.dumps({"tracking": where, "rate": args.rate, "rows": rows},
                                                              indent=1))
    plot(args.out)


def plot(out: Path) -> None:
    """driver_ingest.png: results taken in per second against concurrent trials, one line per store, beside
    the rate the trials produced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    produced: dict[int, float] = {}
    for i, path in enumerate(sorted(out.glob("ingest-*.json"))):
        result = json.loads(path.read_text())
        rows = [r for r in result["rows"] if r["steady_per_s"] == r["steady_per_s"]]  # NaN: never all at once
        ax.plot([r["trials"] for r in rows], [r["steady_per_s"] for r in rows], "o-", c=f"C{i}",
                label=f"taken in ({result['tracking']})")
        produced.update({r["trials"]: r["produced_per_s"] for r in result["rows"]})
    if produced:
        trials = sorted(produced)
        ax.plot(trials, [produced[t] for t in trials], "k:", label="produced (trials x rate)")
    ax.axhline(1000, c="0.6", lw=0.8)
    ax.set(xlabel="concurrent trials", ylabel="results per second", title="driver ingest (steady, all reporting)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "driver_ingest.png", dpi=110)


if __name__ == "__main__":
    main()
