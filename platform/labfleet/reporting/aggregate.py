"""Aggregate statistics to the standard of Agarwal et al., "Deep Reinforcement Learning at the Edge of the
Statistical Precipice" (NeurIPS 2021), the `rliable` library's measures, computed with SciPy:

- the interquartile mean (IQM: the mean of the middle 50 % of runs, `scipy.stats.trim_mean(x, 0.25)`) and
  the mean, each with a 95 % stratified bootstrap confidence interval: `scipy.stats.bootstrap` with one
  sample per task resamples each task's runs on their own, which is the stratified bootstrap;
- performance profiles: the fraction of runs whose (normalised) score exceeds tau, for tau over the range;
- the probability of improvement P(X > Y): for each task, the Mann-Whitney U statistic of X's runs against
  Y's over n * m (a tie counts one half), averaged over the tasks both have.

A *method* is a configuration when the report covers one task, and an algorithm when it covers several;
then each score is normalised by its task's range, (score - min) / (max - min) over every run of that
task in the report (flipped when lower is better), and the report states the ranges. (The `rliable`
package itself needs `arch`, which does not import with the pandas installed here.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

# method -> task -> the final score of each run (seed)
Scores = dict[str, dict[str, np.ndarray]]
MAX_METHODS = 20  # rows of the aggregate table
MAX_PAIRS = 10  # rows and columns of the probability-of-improvement matrix


def iqm(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """The interquartile mean: the 25 % trimmed mean (rliable's `aggregate_iqm`)."""
    return stats.trim_mean(values, 0.25, axis=axis)


def task_ranges(scores: Scores) -> dict[str, tuple[float, float]]:
    """(min, max) of every run of each task, over all methods."""
    tasks: dict[str, list[np.ndarray]] = {}
    for per_task in scores.values():
        for task, values in per_task.items():
            tasks.setdefault(task, []).append(values)
    return {task: (float(np.min(np.concatenate(v))), float(np.max(np.concatenate(v)))) for task, v in tasks.items()}


def normalise(scores: Scores, ranges: dict[str, tuple[float, float]], lower_is_better: bool) -> Scores:
    """Scores mapped to [0, 1] by their task's range, 1 the best run of the task (a task whose runs all
    scored the same maps to 1)."""
    out: Scores = {}
    for method, per_task in scores.items():
        out[method] = {}
        for task, values in per_task.items():
            low, high = ranges[task]
            scaled = np.ones_like(values, dtype=float) if high == low else (values - low) / (high - low)
            out[method][task] = 1.0 - scaled if lower_is_better and high != low else scaled
    return out


@dataclass(frozen=True)
class Estimate:
    point: float
    low: float  # nan when some task has a single run: nothing to resample
    high: float


def interval(per_task: dict[str, np.ndarray], statistic: Callable[..., np.ndarray], seed: int = 0,
             n_resamples: int = 2000) -> Estimate:
    """`statistic(values, axis=-1)` of all runs pooled, with a 95 % stratified (per-task) percentile
    bootstrap interval; the resamples are evaluated in one vectorised call."""
    samples = [np.asarray(v, dtype=float) for _, v in sorted(per_task.items())]
    point = float(statistic(np.concatenate(samples), axis=-1))
    if any(len(s) < 2 for s in samples):
        return Estimate(point, float("nan"), float("nan"))
    result = stats.bootstrap(samples, lambda *parts, axis: statistic(np.concatenate(parts, axis=axis), axis=axis),
                             vectorized=True, paired=False, n_resamples=n_resamples, confidence_level=0.95,
                             method="percentile", rng=np.random.default_rng(seed))
    return Estimate(point, float(result.confidence_interval.low), float(result.confidence_interval.high))


def probability_of_improvement(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> float:
    """P(X > Y): over the tasks both have, the mean of U / (n m), U the Mann-Whitney statistic of X's runs
    against Y's (pairs with x > y count 1, ties one half). Scores must be higher-is-better."""
    tasks = sorted(set(x) & set(y))
    if not tasks:
        return float("nan")
    return float(np.mean([stats.mannwhitneyu(x[t], y[t]).statistic / (len(x[t]) * len(y[t])) for t in tasks]))


def performance_profile(per_task: dict[str, np.ndarray], taus: np.ndarray) -> np.ndarray:
    """The fraction of runs (pooled over tasks) scoring above each tau."""
    values = np.concatenate(list(per_task.values()))
    return (values[None, :] > taus[:, None]).mean(axis=1)


def _ci(estimate: Estimate) -> str:
    return "n/a" if np.isnan(estimate.low) else f"[{estimate.low:.4g}, {estimate.high:.4g}]"


def ranked(higher_is_better: Scores) -> list[str]:
    """The methods, best first by the IQM of all their runs (oriented so that more is better)."""
    return sorted(higher_is_better, key=lambda m: -float(iqm(np.concatenate(list(higher_is_better[m].values())))))


def aggregate_markdown(scores: Scores, multi_task: bool, ranges: dict[str, tuple[float, float]] | None,
                       metric: str, higher_is_better: Scores | None = None) -> str:
    """The aggregate table (IQM and mean with intervals, runs) and the probability-of-improvement matrix
    (on `higher_is_better`, the same runs oriented so that more is better; default `scores`)."""
    better = scores if higher_is_better is None else higher_is_better
    unit = "normalised score" if multi_task else metric
    lines = [f"IQM and mean of each method's runs ({unit}), with 95 % stratified bootstrap intervals "
             f"(Agarwal et al. 2021); n/a where a task has one run.", ""]
    if multi_task and ranges:
        lines += ["Per-task ranges used to normalise (min, max over the report's runs): "
                  + "; ".join(f"{task}: [{low:.4g}, {high:.4g}]" for task, (low, high) in sorted(ranges.items())), ""]
    lines += ["| method | runs | IQM | IQM 95 % CI | mean | mean 95 % CI |", "|---|---|---|---|---|---|"]
    order = ranked(better)
    if len(order) > MAX_METHODS:  # a large sweep: the best ones (bootstraps and the pair matrix grow fast)
        lines += [f"The {MAX_METHODS} best of {len(order)} methods by IQM.", ""]
        order = order[:MAX_METHODS]
    for method in order:
        per_task = scores[method]
        runs = sum(len(v) for v in per_task.values())
        q, m = interval(per_task, iqm), interval(per_task, np.mean)
        lines.append(f"| {method} | {runs} | {q.point:.4g} | {_ci(q)} | {m.point:.4g} | {_ci(m)} |")
    if len(order) > 1:
        among = f" among the {MAX_PAIRS} best" if len(order) > MAX_PAIRS else ""
        order = order[:MAX_PAIRS]
        lines += ["", f"Probability of improvement{among} P(row > column) (Mann-Whitney U / nm, averaged over "
                  "shared tasks):", "", "| P(row > column) | " + " | ".join(order) + " |",
                  "|---|" + "---|" * len(order)]
        for a in order:
            cells = ["" if a == b else f"{probability_of_improvement(better[a], better[b]):.2f}" for b in order]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
