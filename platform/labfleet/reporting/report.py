"""`labfleet report`: the figures and tables a paper needs, from what MLflow (and Optuna) recorded.

A target is a run id (a suite, sweep or trial run), the name of a suite or sweep run (the latest one), or
an experiment name (all its trial runs). The `trial` runs under the target of one `labfleet.config_hash` are
one configuration (a rerun of a spec adds its seeds, each seed counted once); its `seed` runs are the
samples, and the finished ones are what the table counts and the curves draw. Each configuration keeps one
colour in every figure. The report holds:

- learning curves of each configuration: the mean over seeds of the metric (default: the algorithm's
  primary metric) at each evaluation step, with a 95 % bootstrap band; seeds that evaluated at different
  steps are interpolated onto a common grid (the figure says so);
- a comparison table of final metrics (mean +- std over the finished seeds, their number), best first;
- aggregate statistics (IQM, performance profiles, probability of improvement), across tasks only over the
  tasks every method ran;
- for a sweep: Optuna's optimisation history, parameter importances and parallel coordinates (or the
  Pareto front of a multi-objective study);
- written to `--out` as PNGs, `results.md` and one self-contained `report.html` (images embedded), and
  logged as artifacts (`report/...`) of the target run when it is a suite or sweep run.
"""

from __future__ import annotations

import base64
import csv
import difflib
import html
import io
import math
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from labfleet import metrics as M
from labfleet.errors import Problem, SpecError
from labfleet.reporting import aggregate
from labfleet.tracking import queries as Q
from labfleet.tracking import tags as tag
from labfleet.tracking.runs import PBT_LINEAGE
from labfleet.tracking.uri import redact_text, redact_uri

LOWER_IS_BETTER = ("neg_elbo", "recon_nll", "iwae_nll", "baseline_nll", "/kl", "fd_digits", "mode_kl", "loss")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
SEARCH_PAGE = 5000  # runs per search page
BULK_TRIALS = 20  # above this many trials, their seed runs are read in one search, not one per trial
MAX_CURVES = 10  # curves per panel: a large sweep's best configurations, not a legend of thousands


def lower_is_better(metric: str) -> bool:
    return any(part in metric for part in LOWER_IS_BETTER)


@dataclass
class Configuration:
    """One configuration: its trial runs of one `labfleet.config_hash` pooled (a rerun of a spec adds seeds,
    not a method), with one run per seed (a FINISHED one where there is one, else the latest)."""

    label: str
    trial: Run  # the latest trial run (tags, params)
    seeds: list[Run] = field(default_factory=list)
    color: int = 0  # its colour in every figure (matplotlib's C0-C9, by the configuration's first run)
    trials: list[Run] = field(default_factory=list)  # every trial run pooled here, oldest first

    @property
    def algorithm(self) -> str:
        return self.trial.data.tags.get(tag.ALGORITHM, "")

    @property
    def finished(self) -> list[Run]:
        return [s for s in self.seeds if s.info.status == "FINISHED"]

    @property
    def status(self) -> str:
        """FINISHED when every seed did, else the latest trial run's state."""
        if self.seeds and len(self.finished) == len(self.seeds):
            return "FINISHED"
        return self.trial.info.status

    def finals(self) -> dict[str, tuple[float, float]]:
        """{eval/* name: (mean, std)} over the finished seeds' final values (what a trial run logs)."""
        out: dict[str, tuple[float, float]] = {}
        for name in sorted({k for s in self.finished for k in s.data.metrics if k.startswith(M.EVAL_PREFIX)}):
            values = np.array([s.data.metrics[name] for s in self.finished if name in s.data.metrics])
            out[name] = (float(np.mean(values)), float(np.std(values)))
        return out


@dataclass
class Target:
    """What a report covers: the parent run (None for a whole experiment) and its configurations."""

    title: str
    experiment_id: str
    parent: Run | None
    configurations: list[Configuration]


def _search_all(client: MlflowClient, experiment_id: str, query: str) -> list[Run]:
    """Every run that matches, page by page (a large sweep has more runs than one page holds)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], query, max_results=SEARCH_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _children(client: MlflowClient, experiment_id: str, parent_id: str) -> list[Run]:
    return _search_all(client, experiment_id, Q.children(parent_id))


def _configurations(client: MlflowClient, experiment_id: str, trials: list[Run],
                    bulk_above: int = BULK_TRIALS) -> list[Configuration]:
    wanted = {t.info.run_id for t in trials}
    if len(trials) > bulk_above:  # a large sweep: every seed run of the experiment in a few pages, not a search each
        by_trial: dict[str, list[Run]] = {}
        for run in _search_all(client, experiment_id, Q.role("seed")):
            parent = run.data.tags.get(tag.PARENT, "")
            if parent in wanted:
                by_trial.setdefault(parent, []).append(run)
    else:
        by_trial = {t.info.run_id: [r for r in _children(client, experiment_id, t.info.run_id)
                                    if r.data.tags.get(tag.ROLE) == "seed"] for t in trials}
    pooled: dict[str, Configuration] = {}
    for trial in sorted(trials, key=lambda r: r.info.start_time):
        key = trial.data.tags.get(tag.CONFIG_HASH) or trial.info.run_id
        if key not in pooled:
            label = trial.data.tags.get(tag.RUN_NAME, trial.info.run_id[:8])
            pooled[key] = Configuration(label, trial, color=len(pooled))
        config = pooled[key]
        config.trial = trial
        config.trials.append(trial)
        config.seeds.extend(by_trial.get(trial.info.run_id, []))
    for config in pooled.values():
        config.seeds = _one_run_per_seed(config.seeds)
    return list(pooled.values())


def _one_run_per_seed(runs: list[Run]) -> list[Run]:
    """Reruns of a configuration ran some seeds twice: each seed counts once, by its FINISHED run (the latest
    such), else its latest run."""
    chosen: dict[str, Run] = {}
    for run in sorted(runs, key=lambda r: (r.info.status == "FINISHED", r.info.start_time)):
        chosen[run.data.tags.get(tag.SEED, run.info.run_id)] = run
    return sorted(chosen.values(), key=lambda r: int(r.data.tags.get(tag.SEED, 0)))


def resolve_target(client: MlflowClient, target: str, source: str = "labfleet report") -> Target:
    """A run id, the name of a suite/sweep run (its latest), or an experiment name."""
    run: Run | None = None
    if RUN_ID.match(target):
        try:
            run = client.get_run(target)
        except Exception:  # noqa: BLE001 - not a run id of this store: try it as a name
            run = None
    if run is None:
        experiments = client.search_experiments(max_results=1000)
        try:
            by_name = Q.named(target)
        except ValueError as exc:
            raise SpecError([Problem(source, "TARGET", str(exc))]) from None
        named = client.search_runs([e.experiment_id for e in experiments], by_name,
                                   order_by=["attributes.start_time DESC"], max_results=50) if experiments else []
        named = [r for r in named if r.data.tags.get(tag.ROLE) in ("suite", "sweep", "trial")]
        if named:
            run = named[0]
        else:
            experiment = client.get_experiment_by_name(target)
            if experiment is None:
                known = sorted(e.name for e in experiments)
                raise SpecError([Problem(source, "TARGET", f"no run id, suite or sweep run name, or experiment "
                                         f"named {target!r} in this store (experiments: {', '.join(known)})")])
            every = _search_all(client, experiment.experiment_id, Q.role("trial"))
            return Target(f"experiment {target}", experiment.experiment_id, None,
                          _configurations(client, experiment.experiment_id, every))
    experiment_id = run.info.experiment_id
    role = run.data.tags.get(tag.ROLE)
    trials: list[Run]
    if role == "trial":
        trials = [run]
    else:
        trials = [r for r in _children(client, experiment_id, run.info.run_id)
                  if r.data.tags.get(tag.ROLE) == "trial"]
    name = run.data.tags.get(tag.RUN_NAME, run.info.run_id)
    return Target(f"{role} {name}", experiment_id, run, _configurations(client, experiment_id, trials))


def primary_metric(configs: list[Configuration]) -> str:
    from labfleet.algorithms import registry

    logged = logged_metric_names(configs)
    for config in configs:
        try:
            info = registry.get(config.algorithm)
        except (KeyError, ImportError, TypeError):  # your own code that is not importable here
            continue
        if info.primary_metric in logged or not logged:
            return info.primary_metric
        # a model whose headline depends on its dataset (the GAN's on images): the first it logged
        for metric in (*info.dataset_metrics.values(), *info.eval_metrics):
            if metric in logged:
                return metric
    evals = [m for m in logged if m.startswith(M.EVAL_PREFIX)]  # your own code: what it reported
    return evals[0] if evals else M.EVAL_RETURN_MEAN


# --- numbers --------------------------------------------------------------------------------------------

def curve_seeds(config: Configuration) -> list[Run]:
    """The seeds a curve is drawn from: the finished ones (those the table counts), else, for a configuration
    none of whose seeds finished, the unfinished ones (its legend says so)."""
    return config.finished or config.seeds


def histories(client: MlflowClient, config: Configuration, metric: str,
              seeds: list[Run] | None = None) -> dict[str, dict[int, float]]:
    """{seed run id: {step: value}} of every seed (of `seeds`, default all) that logged `metric`."""
    out = {}
    for seed in config.seeds if seeds is None else seeds:
        points = {m.step: m.value for m in client.get_metric_history(seed.info.run_id, metric)}
        if points:
            out[seed.info.run_id] = points
    return out


def common_grid(found: list[dict[int, float]]) -> tuple[list[int], np.ndarray, bool]:
    """(steps, values (seeds, steps), interpolated): the steps every seed evaluated; where seeds evaluated
    at different steps, every step any of them evaluated within the range all of them cover, each seed's
    curve linearly interpolated there."""
    shared = sorted(set.intersection(*(set(h) for h in found)))
    union = sorted(set.union(*(set(h) for h in found)))
    if shared == union:
        return shared, np.array([[h[s] for s in shared] for h in found]), False
    low, high = max(min(h) for h in found), min(max(h) for h in found)
    steps = [s for s in union if low <= s <= high]
    values = np.array([np.interp(steps, sorted(h), [h[s] for s in sorted(h)]) for h in found])
    return steps, values.reshape(len(found), len(steps)), True


def curve(client: MlflowClient, config: Configuration, metric: str,
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, bool]:
    """(steps, mean, band low, band high, seeds, interpolated) over the steps every seed evaluated (or on a
    common grid, `common_grid`). The band is the 95 % percentile bootstrap of the mean over seeds (SciPy),
    clipped to the range the seeds observed: a t-interval over three seeds of capped returns runs far outside
    anything possible."""
    from scipy import stats

    found = list(histories(client, config, metric, curve_seeds(config)).values())
    if not found:
        return np.array([]), np.array([]), np.array([]), np.array([]), 0, False
    steps, values, interpolated = common_grid(found)  # values: (seeds, steps)
    n = len(found)
    mean = values.mean(0)
    if n < 2 or not len(steps) or np.all(values == values[0]):
        return np.array(steps), mean, mean, mean, n, interpolated
    ci = stats.bootstrap((values,), np.mean, axis=0, vectorized=True, n_resamples=2000, confidence_level=0.95,
                         method="percentile", random_state=0).confidence_interval
    # a step where every seed agrees has no spread: SciPy gives NaN there, the band is the mean itself
    low = np.clip(np.where(np.isnan(ci.low), mean, ci.low), values.min(0), values.max(0))
    high = np.clip(np.where(np.isnan(ci.high), mean, ci.high), values.min(0), values.max(0))
    return np.array(steps), mean, np.minimum(low, mean), np.maximum(high, mean), n, interpolated


def curves_csv(client: MlflowClient, configs: list[Configuration], metric: str) -> str:
    """Every seed's history of `metric`: configuration, seed, run_id, step, value (one row a point)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["configuration", "seed", "run_id", "metric", "step", "value"])
    for config in configs:
        seeds = {s.info.run_id: s.data.tags.get(tag.SEED, "") for s in config.seeds}
        for run_id, points in histories(client, config, metric).items():
            for step, value in sorted(points.items()):
                writer.writerow([config.label, seeds[run_id], run_id, metric, step, repr(value)])
    return buffer.getvalue()


def results_csv(names: list[str], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = (f"{n}{suffix}" for n in names for suffix in ("", M.STD_SUFFIX))
    writer.writerow(["configuration", "seeds", "status", *columns])
    for row in rows:
        cells = [row["configuration"], row["seeds"], row["status"]]
        for name in names:
            cells += [repr(row[name][0]), repr(row[name][1])] if name in row else ["", ""]
        writer.writerow(cells)
    return buffer.getvalue()


def final_rows(configs: list[Configuration], metric: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns (the eval metrics of any configuration; blank where one lacks it, e.g. a pruned trial) and
    one row per configuration, best first."""
    finals = {id(c): c.finals() for c in configs}
    names = sorted({k for f in finals.values() for k in f if not k.endswith(M.STD_SUFFIX)})
    if metric in names:
        names.remove(metric)
        names.insert(0, metric)
    rows = []
    for c in configs:
        row: dict[str, Any] = {"configuration": c.label, "seeds": len(c.finished), "status": c.status,
                               "task": task_of(c)}
        row.update({name: finals[id(c)][name] for name in names if name in finals[id(c)]})
        rows.append(row)
    sign = 1.0 if lower_is_better(metric) else -1.0
    # A single seed has no spread to compare: it ranks after every configuration with several (the table
    # shows n), however good its one value looks.
    # Ranked within each environment or dataset: a return on one task says nothing about another's.
    rows.sort(key=lambda r: (r["task"], metric not in r, r["seeds"] < 2, sign * r[metric][0] if metric in r
                             else 0.0))
    return names, rows


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def markdown_table(names: list[str], rows: list[dict[str, Any]]) -> str:
    """Mean ± standard deviation over the finished seeds (n in the `seeds` column)."""
    tasks = len({row.get("task") for row in rows}) > 1  # a suite over several tasks: say which row is which
    header = ["configuration", *(["task"] if tasks else []), "seeds", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["configuration"], *([row["task"]] if tasks else []), str(row["seeds"])]
        cells += [f"{_fmt(row[n][0])} ± {_fmt(row[n][1])}" if n in row else "" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def terminal_table(names: list[str], rows: list[dict[str, Any]]) -> Any:
    """The report's table for a terminal: configuration, task (when several), n, state and the first metric
    (the primary one) as mean ± std, each cell one token that is never cut (results.md has every metric)."""
    from rich.table import Table

    tasks = len({row.get("task") for row in rows}) > 1
    metric = names[0] if names else ""
    heads = ["configuration", *(["task"] if tasks else []), "n", "state", *([metric] if metric else [])]
    table = Table(*heads, title_justify="left", caption="every metric: results.md and results.csv" if len(names) > 1
                  else None)
    cells = [[row["configuration"], *([row["task"]] if tasks else []), str(row["seeds"]), row["status"].lower(),
              *([f"{_short(row[metric][0])}±{_short(row[metric][1])}" if metric in row else ""] if metric else [])]
             for row in rows]
    for i, column in enumerate(table.columns):
        column.overflow = "fold"
        if heads[i] != "configuration":  # numbers and states stay whole; a long name folds
            column.min_width = max([len(c[i]) for c in cells] + [1])
    for row_cells in cells:
        table.add_row(*row_cells)
    return table


def _short(value: float) -> str:
    return f"{value:.3g}"


# --- figures --------------------------------------------------------------------------------------------

def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def task_of(config: Configuration) -> str:
    tags = config.trial.data.tags
    task = tags.get(tag.ENV) or tags.get(tag.DATASET)
    return task if task and task != "None" else "its own data"  # ("None": what older runs of functions hold)


def panels(configs: list[Configuration], metric: str | None) -> list[tuple[str, str, list[Configuration]]]:
    """(task, metric, configurations) per panel: one panel per environment or dataset and metric, so that
    CartPole's returns, Pendulum's and FrozenLake's success rates never share a y-axis."""
    groups: dict[tuple[str, str], list[Configuration]] = {}
    for config in configs:
        groups.setdefault((task_of(config), metric or primary_metric([config])), []).append(config)
    return [(task, m, group) for (task, m), group in groups.items()]


def best_configurations(configs: list[Configuration], metric: str, limit: int) -> list[Configuration]:
    """All of them, or the `limit` best by the trial run's final `metric` (those without it last), in
    their original order."""
    if len(configs) <= limit:
        return configs
    sign = 1.0 if lower_is_better(metric) else -1.0
    finals = [c.finals() for c in configs]
    ranked = sorted(range(len(configs)), key=lambda i: (metric not in finals[i],
                                                         sign * finals[i].get(metric, (0.0, 0.0))[0]))
    return [configs[i] for i in sorted(ranked[:limit])]


def curves_png(client: MlflowClient, configs: list[Configuration], metric: str | None) -> bytes | None:
    plt = _pyplot()
    groups = panels(configs, metric)
    cols = min(2, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    drawn, interpolated = 0, False
    for ax, (task, name, group) in zip(axes.flat, groups, strict=False):
        shown = best_configurations(group, name, MAX_CURVES)
        for config in shown:
            steps, mean, low, high, n, moved = curve(client, config, name)
            if not len(steps):
                continue
            color = f"C{config.color % 10}"
            unfinished = "" if config.finished else " unfinished"
            ax.plot(steps, mean, color=color, marker="o" if len(steps) == 1 else None,
                    label=f"{config.label} (n={n}{unfinished}{', interpolated' if moved else ''})")
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
            drawn += 1
            interpolated = interpolated or moved
        generative = bool(group[0].trial.data.tags.get(tag.DATASET))
        ax.set_xlabel("optimiser steps" if generative else "env steps")
        ax.set_ylabel(name)
        some = f" (the {len(shown)} best of {len(group)} configurations)" if len(shown) < len(group) else ""
        ax.set_title(f"{task}: {name}{some}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    if not drawn:
        plt.close(fig)
        return None
    grid = "; seeds that evaluated at different steps interpolated onto the steps any of them evaluated" \
        if interpolated else ""
    fig.suptitle(f"mean over seeds, 95 % bootstrap band (clipped to the observed range){grid}", fontsize=10)
    return _png(fig)


def pbt_png(client: MlflowClient, sweep_run: Run, configs: list[Configuration], tmp: Path) -> bytes | None:
    """A PBT sweep: each member's schedule of every mutable hyperparameter (its `pbt/*` metrics, a step
    line per trial), and its lineage (each exploit an arrow from the donor's row to the receiver's at its
    step). None when the sweep ran no population-based training."""
    import json

    names = {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
    if PBT_LINEAGE not in names:
        return None
    lineage = json.loads(Path(client.download_artifacts(sweep_run.info.run_id, PBT_LINEAGE, str(tmp))).read_text())
    numbers = {int(c.trial.data.tags.get(tag.TRIAL_NUMBER, i)): c for i, c in enumerate(configs)}
    keys = sorted({k for c in configs for k in c.trial.data.metrics if k.startswith("pbt/")})
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys) + 1, 1, figsize=(8, 2.4 * (len(keys) + 1)), squeeze=False, sharex=True)
    for ax, key in zip(axes.flat, keys, strict=False):
        for number, config in sorted(numbers.items()):
            history = sorted((m.step, m.value) for m in client.get_metric_history(config.trial.info.run_id, key))
            if history:
                last = max((s.data.metrics.get(M.ENV_STEPS, 0) for s in config.seeds), default=history[-1][0])
                steps, values = zip(*history, strict=True)
                ax.step([*steps, max(last, steps[-1])], [*values, values[-1]], where="post",
                        color=f"C{config.color % 10}", label=f"trial {number}")
        ax.set_ylabel(key.removeprefix("pbt/"), fontsize=8)
        ax.grid(alpha=0.3)
        if key.endswith("learning_rate"):
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=7, ncol=4, loc="best")
    ax = axes.flat[-1]
    for number in numbers:
        ax.axhline(number, color="0.85", linewidth=0.8, zorder=0)
    # Exploits at one step (a perturbation point) side by side, not drawn over each other
    at_step: dict[int, list[dict[str, Any]]] = {}
    for entry in lineage:
        at_step.setdefault(int(entry["step"]), []).append(entry)
    dx = 0.008 * max((int(e["step"]) for e in lineage), default=1)
    for step, entries in at_step.items():
        for k, entry in enumerate(entries):
            x = step + (k - (len(entries) - 1) / 2) * dx
            donor = numbers.get(int(entry["from_trial"]))
            color = f"C{(donor.color if donor else int(entry['from_trial'])) % 10}"
            ax.annotate("", xy=(x, entry["to_trial"]), xytext=(x, entry["from_trial"]),
                        arrowprops={"arrowstyle": "->", "color": color})
    ax.set_yticks(sorted(numbers))
    ax.set_ylabel("trial (exploits: donor -> receiver)", fontsize=8)
    ax.set_xlabel("env steps")
    fig.suptitle(f"population-based training: {len(lineage)} exploits", fontsize=10)
    return _png(fig)


def sweep_trials_table(configs: list[Configuration]) -> str:
    """A sweep's trials: number, Optuna state and each sampled parameter, in trial order."""
    params = sorted({k for c in configs for t in c.trials or [c.trial] for k in t.data.params if k != "seeds"})
    lines = ["| trial | state | " + " | ".join(params) + " |", "|" + "---|" * (2 + len(params))]
    trials = [trial for config in configs for trial in config.trials or [config.trial]]  # a retried trial too
    for trial in sorted(trials, key=lambda t: int(t.data.tags.get(tag.TRIAL_NUMBER, -1))):
        tags, values = trial.data.tags, trial.data.params
        lines.append(f"| {tags.get(tag.TRIAL_NUMBER, '')} | {tags.get(tag.TRIAL_STATE, '')} | "
                     + " | ".join(values.get(p, "") for p in params) + " |")
    return "\n".join(lines) + "\n"


def study_pngs(study: Any) -> dict[str, bytes]:
    """Optuna's own matplotlib figures of a study (those its trials allow)."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    _pyplot()
    out: dict[str, bytes] = {}
    multi = len(study.directions) > 1
    plots: dict[str, Any] = {
        "optimization_history": (lambda: ovm.plot_optimization_history(study, target=lambda t: t.values[0],
                                                                       target_name="objective 0"))
        if multi else (lambda: ovm.plot_optimization_history(study)),
        "param_importances": (lambda: ovm.plot_param_importances(study, target=lambda t: t.values[0]))
        if multi else (lambda: ovm.plot_param_importances(study)),
        "parallel_coordinate": (lambda: ovm.plot_parallel_coordinate(study, target=lambda t: t.values[0]))
        if multi else (lambda: ovm.plot_parallel_coordinate(study)),
    }
    if multi and len(study.directions) <= 3:
        plots["pareto_front"] = lambda: ovm.plot_pareto_front(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, make in plots.items():
            complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
            if len(complete) < 2:
                break
            try:
                ax = make()
            except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. one distinct value: no importances
                continue
            figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            out[name] = _png(figure)
    return out


def method_scores(configs: list[Configuration], metric: str) -> tuple[aggregate.Scores, bool]:
    """Each finished seed's final `metric`, by method and task (see `aggregate`): configurations on one task,
    algorithms across several."""
    multi_task = len({task_of(c) for c in configs}) > 1
    scores: dict[str, dict[str, list[float]]] = {}
    for config in configs:
        values = [s.data.metrics[metric] for s in config.seeds
                  if s.info.status == "FINISHED" and metric in s.data.metrics]
        if values:
            method = (config.algorithm or config.label) if multi_task else config.label
            scores.setdefault(method, {}).setdefault(task_of(config), []).extend(values)
    return {m: {t: np.asarray(v) for t, v in per_task.items()} for m, per_task in scores.items()}, multi_task


def profiles_png(normalised: aggregate.Scores, title: str, colors: dict[str, int] | None = None) -> bytes:
    """Performance profiles (Agarwal et al. 2021, figure 5 style): the fraction of runs above each score.
    `colors`: a method's colour where it is a configuration (the same as in the curves)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    taus = np.linspace(0.0, 1.0, 201)
    for i, (method, per_task) in enumerate(sorted(normalised.items())):
        n = sum(len(v) for v in per_task.values())
        color = f"C{(colors or {}).get(method, i) % 10}"
        ax.step(taus, aggregate.performance_profile(per_task, taus), where="post", color=color,
                label=f"{method} (runs={n})")
    ax.set_xlabel("normalised score tau (0: the task's worst run, 1: its best)")
    ax.set_ylabel("fraction of runs with score > tau")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def aggregate_section(configs: list[Configuration], metric: str) -> tuple[str, bytes | None]:
    """Markdown of the aggregate statistics and the performance-profile figure; ("", None) without runs."""
    scores, multi_task = method_scores(configs, metric)
    if not scores:
        return "", None
    note = ""
    if multi_task:  # methods are compared only on the tasks every one of them ran
        shared = set.intersection(*(set(per_task) for per_task in scores.values()))
        left = sorted(set.union(*(set(per_task) for per_task in scores.values())) - shared)
        if not shared:
            return (f"No task was run by every method, so no aggregate compares them (tasks: {', '.join(left)}).\n",
                    None)
        if left:
            note = (f"\nAggregated over the tasks every method ran ({', '.join(sorted(shared))}); left out: "
                    f"{', '.join(left)}.\n")
            scores = {m: {t: v for t, v in per_task.items() if t in shared} for m, per_task in scores.items()}
    lower = lower_is_better(metric)
    ranges = aggregate.task_ranges(scores)
    normalised = aggregate.normalise(scores, ranges, lower)
    # One task: IQMs in the metric's own units; P(improvement) compares higher-is-better scores.
    shown = normalised if multi_task else scores
    better = normalised if multi_task else ({m: {t: -v for t, v in pt.items()} for m, pt in scores.items()}
                                            if lower else scores)
    text = aggregate.aggregate_markdown(shown, multi_task, ranges if multi_task else None, metric, better) + note
    title = f"performance profiles of {metric}"
    best = aggregate.ranked(better)
    if len(best) > MAX_CURVES:  # a large sweep: the best ones, not a legend of thousands
        title += f" (the {MAX_CURVES} best of {len(best)} by IQM)"
    colors = None if multi_task else {c.label: c.color for c in configs}
    return text, profiles_png({m: normalised[m] for m in best[:MAX_CURVES]}, title, colors)


# --- the report -------------------------------------------------------------------------------------------

def markdown_to_html(text: str) -> str:
    """The report's own Markdown (paragraphs and pipe tables, no other syntax) as HTML."""
    out, table = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):  # not the separator row
                table.append([html.escape(c.strip()) for c in line.strip("|").split("|")])
            continue
        if table:
            head, *body = table
            out.append('<div class="wide"><table><thead><tr>' + "".join(f"<th>{c}</th>" for c in head)
                       + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                                                          for row in body) + "</tbody></table></div>")
            table = []
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "".join(out)


def html_page(title: str, images: dict[str, bytes], table_md: str, names: list[str], rows: list[dict[str, Any]],
              notes: list[str], aggregate_md: str = "") -> str:
    head = ["configuration", "seeds", *names]
    body_rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in [
            row["configuration"], str(row["seeds"]),
            *(f"{_fmt(row[n][0])} ± {_fmt(row[n][1])}" if n in row else "" for n in names)]) + "</tr>"
        for row in rows)
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{html.escape(name.replace('_', ' '))}</figcaption></figure>" for name, data in images.items())
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse;max-width:100%}}.wide{{overflow-x:auto}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right;overflow-wrap:anywhere}}
td:first-child,th:first-child{{text-align:left}}@media print{{body{{margin:0;max-width:none}}td,th{{font-size:9pt}}}}
figure{{display:inline-block;margin:1em}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Final metrics: mean ± standard deviation over the seeds (n in the seeds column), best first; a
configuration with one seed ranks after those with several</h2>
<div class="wide"><table id="results"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr>
</thead><tbody>{body_rows}</tbody></table></div>
{"<h2>Aggregate statistics</h2>" + markdown_to_html(aggregate_md) if aggregate_md else ""}
<h2>Figures</h2>{figures}
<ul>{notes_html}</ul>
<script>window.addEventListener("load",function(){{var n=0;
for(const i of document.images){{if(i.complete&&i.naturalWidth>0)n++;}}
document.body.setAttribute("data-images-rendered",String(n));}});</script>
</body></html>
"""


@dataclass
class Report:
    title: str
    out: Path
    files: list[Path]
    names: list[str]
    rows: list[dict[str, Any]]
    logged_to: str | None


def logged_metric_names(configurations: list[Configuration]) -> list[str]:
    """Every metric a seed or trial run of these configurations logged."""
    return sorted({k for c in configurations for run in (c.trial, *c.seeds) for k in run.data.metrics})


MAX_SAMPLE_GRIDS = 12
SAMPLE_KINDS = ("samples", "reconstructions")


def sample_grids(client: MlflowClient, configs: list[Configuration]) -> dict[str, bytes]:
    """What the generative models draw, beside their numbers: the last sample grid (and reconstructions) of
    each configuration's first seed, for at most MAX_SAMPLE_GRIDS configurations."""
    from labfleet.algorithms import registry

    out: dict[str, bytes] = {}
    shown = 0
    with tempfile.TemporaryDirectory(prefix="labfleet-report-") as tmp:
        for config in configs:
            try:
                generative = registry.get(config.algorithm).kind == "generative"
            except (KeyError, ImportError, TypeError):
                generative = False
            if not generative or not config.seeds:
                continue
            if shown == MAX_SAMPLE_GRIDS:
                break
            shown += 1
            seed = min(config.seeds, key=lambda r: r.data.tags.get(tag.RUN_NAME, ""))
            for kind in SAMPLE_KINDS:
                pngs = [a.path for a in client.list_artifacts(seed.info.run_id, kind) if a.path.endswith(".png")]
                if pngs:
                    local = client.download_artifacts(seed.info.run_id, max(pngs), tmp)
                    out[f"{kind}_{re.sub(r'[^A-Za-z0-9.=-]+', '-', config.label)}"] = Path(local).read_bytes()
    return out


def build_report(client: MlflowClient, target_text: str, out: Path, metric: str | None = None,
                 storage: str | None = None, log: bool = False) -> Report:
    """The report's files in `out`; read-only on the store unless `log`, which attaches them to the
    suite or sweep run as artifacts `report/`."""
    target = resolve_target(client, target_text)
    if not target.configurations:
        raise SpecError([Problem("labfleet report", "TARGET", f"{target.title} has no trial runs to report")])
    if metric is not None and metric not in (names := logged_metric_names(target.configurations)):
        close = difflib.get_close_matches(metric, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SpecError([Problem("labfleet report", "--metric", f"no run of {target.title} logged {metric!r}; "
                                 f"{hint}logged: {', '.join(n for n in names if not n.startswith('intermediate/'))}")])
    asked = metric
    metric = metric or primary_metric(target.configurations)
    images: dict[str, bytes] = {}
    notes: list[str] = []
    png = curves_png(client, target.configurations, asked)
    if png is not None:
        images["curves"] = png
    else:
        notes.append(f"no seed run logged {metric}: no learning curves")
    names, rows = final_rows(target.configurations, metric)
    table = markdown_table(names, rows)
    aggregate_md, profiles = aggregate_section(target.configurations, metric)
    if profiles is not None:
        images["profiles"] = profiles
        table += "\n## Aggregate statistics\n\n" + aggregate_md
    images.update(sample_grids(client, target.configurations))
    if target.parent is not None and target.parent.data.tags.get(tag.ROLE) == "sweep":
        images.update(_sweep_figures(client, target, storage, notes))
        table += "\n## Trials\n\n" + sweep_trials_table(target.configurations)
    contents = {f"{name}.png": data for name, data in images.items()}
    contents["results.csv"] = results_csv(names, rows).encode()
    contents["curves.csv"] = curves_csv(client, target.configurations, metric).encode()
    contents["results.md"] = (f"# {target.title}\n\nMean ± standard deviation over the finished seeds (n: the "
                              f"seeds column); best first, one-seed configurations last.\n\n{table}").encode()
    contents["report.html"] = html_page(target.title, images, table, names, rows, notes, aggregate_md).encode()
    files = [out / name for name in contents]
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, data in zip(files, contents.values(), strict=True):
            path.write_bytes(data)
    except OSError as exc:
        raise SpecError([Problem("labfleet report", "--out", f"cannot write the report in {out}: "
                                 f"{exc.strerror or exc}")]) from None
    logged_to = None
    if log and target.parent is not None and target.parent.data.tags.get(tag.ROLE) in ("suite", "sweep"):
        for path in files:
            client.log_artifact(target.parent.info.run_id, str(path), "report")
        logged_to = target.parent.info.run_id
    return Report(target.title, out, files, names, rows, logged_to)


def _sweep_figures(client: MlflowClient, target: Target, storage: str | None, notes: list[str]) -> dict[str, bytes]:
    """Optuna's figures of the study, and a PBT sweep's schedules and lineage instead of the importance and
    parallel-coordinate plots (PBT changes a trial's hyperparameters as it trains; Optuna sees only the
    initial values)."""
    assert target.parent is not None
    images = _sweep_images(target.parent, storage, notes)
    with tempfile.TemporaryDirectory(prefix="labfleet-report-") as tmp:
        lineage = pbt_png(client, target.parent, target.configurations, Path(tmp))
    if lineage is not None:
        images["pbt"] = lineage
        for name in ("param_importances", "parallel_coordinate"):
            if images.pop(name, None) is not None:
                notes.append(f"{name.replace('_', ' ')}: left out, as Optuna sees only each member's initial "
                             "values and population-based training changed them (see pbt.png)")
    return images


def _sweep_images(sweep_run: Run, storage: str | None, notes: list[str]) -> dict[str, bytes]:

    name = sweep_run.data.tags.get(tag.STUDY_NAME)
    url = storage or sweep_run.data.tags.get(tag.STORAGE)
    if not name or not url:
        notes.append("the sweep run names no Optuna study")
        return {}
    if "***" in url:
        notes.append("the study's storage URL was recorded without its password: pass --storage to plot it")
        return {}
    from labfleet.tracking.studies import load_study_read_only

    try:
        study = load_study_read_only(name, url)
    except Exception as exc:  # noqa: BLE001 - the report goes on without the study's figures
        notes.append(f"could not open study {name!r} at {redact_uri(url)}: {type(exc).__name__}: "
                     f"{redact_text(str(exc), url)}")
        return {}
    return study_pngs(study)
