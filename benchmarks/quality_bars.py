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

# spec name -> (metric, how the bar is judged, threshold, ...), the shipped specs' bars:
#   "each": every seed reaches the threshold; "mean": the mean does; "mean each": (mean, each) thresholds;
#   "each ratio <=": metric / reference metric per seed; a trailing (metric, threshold) pair is a second
#   metric whose mean must reach its own threshold.
BARS: dict[str, tuple] = {
    "cartpole-ppo": ("eval/return_mean", "each", 475.0),
    "cartpole-dqn": ("eval/return_mean", "each", 475.0),
    "cartpole-reinforce": ("eval/return_mean", "mean", 450.0),
    "cartpole-a2c": ("eval/return_mean", "each", 475.0),
    "cartpole-trpo": ("eval/return_mean", "mean", 475.0),
    "cartpole-es": ("eval/return_mean", "mean", 475.0),
    "pendulum-ddpg": ("eval/return_mean", "mean", -200.0),
    "frozenlake-qlearning": ("eval/return_mean", "mean each", (0.70, 0.65)),
    "frozenlake-sarsa": ("eval/return_mean", "mean each", (0.70, 0.65)),
    "frozenlake-mc-control": ("eval/return_mean", "mean each", (0.70, 0.65)),
    "frozenlake-value-iteration": ("eval/return_mean", "mean", 0.72),
    "frozenlake-policy-iteration": ("eval/return_mean", "mean", 0.72),
    "digits-vae": ("eval/neg_elbo", "each ratio <=", 0.8, "eval/baseline_nll"),
    "ring-gan": ("eval/modes_covered", "each", 8.0, "eval/high_quality_frac", 0.8),
    "grid-gan": ("eval/modes_covered", "mean", 24.0, "eval/high_quality_frac", 0.9),
}
# extra entries: the same spec with overrides, under another name
VARIANTS = {"grid-gan": ("ring_gan.yaml", {"name": "grid-gan", "dataset": "grid25"})} \
    if not (REPO / "experiments" / "grid_gan.yaml").exists() else {}


def judge(name: str, runs: list) -> tuple[list[float], float, bool, str]:
    """(per-seed values, their mean, whether the bar is met, the bar in words)."""
    metric, rule, threshold, *more = BARS[name]
    values = [r.data.metrics.get(metric, float("nan")) for r in runs]
    if rule == "each ratio <=":
        ratios = [v / r.data.metrics.get(more[0], float("nan")) for v, r in zip(values, runs, strict=True)]
        return ratios, sum(ratios) / len(ratios), all(x <= threshold for x in ratios), \
            f"each {metric} / {more[0]} <= {threshold:g}"
    mean = sum(values) / len(values)
    if rule == "mean each":
        met = mean >= threshold[0] and all(v >= threshold[1] for v in values)
        bar = f"mean {metric} >= {threshold[0]:g}, each >= {threshold[1]:g}"
    else:
        met = all(v >= threshold for v in values) if rule == "each" else mean >= threshold
        bar = f"{rule} {metric} >= {threshold:g}"
    if more:  # a second metric whose mean must reach its own threshold
        second = [r.data.metrics.get(more[0], float("nan")) for r in runs]
        second_mean = sum(second) / len(second)
        met = met and second_mean >= more[1]
        bar += f" and mean {more[0]} >= {more[1]:g} (mean {second_mean:.3g}: " + \
            ", ".join(f"{x:.3g}" for x in second) + ")"
    if rule == "report":
        met, bar = True, f"reported: {metric}, {more[0] if more else ''}"
    return values, mean, met, bar


def iqm_interval(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    """The interquartile mean (the mean of the middle 50 % of seeds, Agarwal et al. 2021) and its 95 %
    bootstrap interval over seeds (SciPy's percentile bootstrap; one task, so the strata are the seeds)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    iqm = float(stats.trim_mean(x, 0.25))
    if len(x) < 2 or np.all(x == x[0]):
        return iqm, iqm, iqm
    ci = stats.bootstrap((x,), lambda a, axis: stats.trim_mean(a, 0.25, axis=axis), n_resamples=5000,
                         confidence_level=0.95, method="percentile", random_state=seed).confidence_interval
    return iqm, float(ci.low), float(ci.high)


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
    for name, (file, overrides) in VARIANTS.items():
        if name in names:
            entries.append({"spec": str(REPO / "experiments" / file), "set": overrides})
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
    print("| spec | budget | seeds: final eval | mean | IQM [95 % CI] | bar | met |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        runs = sorted(by_spec.get(name, []), key=lambda r: int(r.data.tags["labfleet.seed"]))
        if not runs:
            print(f"| {name} | | (no runs) | | | | no |")
            continue
        values, mean, met, bar = judge(name, runs)
        budget = {k.removeprefix("budget."): v for k, v in runs[0].data.params.items() if k.startswith("budget.")}
        budget_text = ", ".join(f"{k} {v}" for k, v in budget.items() if v != "None")
        shown = ", ".join(f"{r.data.tags['labfleet.seed']}: {v:.4g}" for r, v in zip(runs, values, strict=True))
        iqm, low, high = iqm_interval(values)
        print(f"| {name} | {budget_text} | {shown} | {mean:.4g} | {iqm:.4g} [{low:.4g}, {high:.4g}] | {bar} "
              f"| {'yes' if met else 'NO'} |")


if __name__ == "__main__":
    main()
