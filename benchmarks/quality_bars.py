"""Every shipped spec at its default budget and seeds, through `labfleet suite`, against its quality bar.

    python benchmarks/quality_bars.py [--tracking-uri sqlite:///quality.db] [--only cartpole-ppo,...]
                                      [--seeds 3,4,5]

The specs run as one suite on a local Ray instance (two trials at a time on 2 cores). Each seed's final
evaluation is then read back from MLflow with MlflowClient and set against the bar of its issue.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]

# spec name -> (metric, how the bar is judged, threshold)
BARS = {
    "cartpole-ppo": ("eval/return_mean", "each", 475.0),
    "cartpole-dqn": ("eval/return_mean", "mean", 475.0),
    "cartpole-reinforce": ("eval/return_mean", "mean", 450.0),
    "cartpole-a2c": ("eval/return_mean", "mean", 450.0),
    "pendulum-ddpg": ("eval/return_mean", "mean", -200.0),
    "frozenlake-qlearning": ("eval/return_mean", "mean", 0.70),
    "frozenlake-sarsa": ("eval/return_mean", "mean", 0.70),
    "frozenlake-value-iteration": ("eval/return_mean", "mean", 0.72),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=None, help="default: a fresh SQLite store in a temp dir")
    parser.add_argument("--only", default=",".join(BARS))
    parser.add_argument("--seeds", default=None, help="other seeds than the specs' own, e.g. 3,4,5")
    args = parser.parse_args()
    names = args.only.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="labfleet-quality-"))
    uri = args.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    entries = []
    for path in sorted((REPO / "experiments").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("name") in names:
            entries.append({"spec": str(path)})
    suite = workdir / "quality.yaml"
    suite.write_text(yaml.safe_dump({"name": "quality-bars", "experiments": entries}))
    seeds = ["--set", f"seeds=[{args.seeds}]"] if args.seeds else []
    subprocess.run([sys.executable, "-m", "labfleet", "suite", str(suite), "--tracking-uri", uri, "--quiet", *seeds],
                   check=False)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quality-bars")
    assert experiment is not None, "the suite recorded nothing"
    seeds = client.search_runs([experiment.experiment_id], "tags.`labfleet.role` = 'seed'", max_results=1000)
    trials = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id],
                                                            "tags.`labfleet.role` = 'trial'")}
    by_spec: dict[str, list] = {}
    for run in seeds:
        spec_name = trials[run.data.tags["mlflow.parentRunId"]].data.tags["mlflow.runName"]
        by_spec.setdefault(spec_name, []).append(run)
    print(f"\nruns: {uri}\n")
    print("| spec | budget | seeds: final eval | mean | bar | met |")
    print("|---|---|---|---|---|---|")
    for name in names:
        metric, rule, threshold = BARS[name]
        runs = sorted(by_spec.get(name, []), key=lambda r: int(r.data.tags["labfleet.seed"]))
        values = [r.data.metrics.get(metric, float("nan")) for r in runs]
        if not values:
            print(f"| {name} | | (no runs) | | | no |")
            continue
        mean = sum(values) / len(values)
        met = all(v >= threshold for v in values) if rule == "each" else mean >= threshold
        budget = {k.removeprefix("budget."): v for k, v in runs[0].data.params.items() if k.startswith("budget.")}
        budget_text = ", ".join(f"{k} {v}" for k, v in budget.items() if v != "None")
        shown = ", ".join(f"{r.data.tags['labfleet.seed']}: {v:.4g}" for r, v in zip(runs, values, strict=True))
        print(f"| {name} | {budget_text} | {shown} | {mean:.4g} | {rule} >= {threshold:g} | "
              f"{'yes' if met else 'NO'} |")


if __name__ == "__main__":
    main()
