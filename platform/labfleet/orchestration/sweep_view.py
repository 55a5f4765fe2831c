"""What a sweep shows: the live table of trials, the leaderboard and best line at the end, and the Pareto
front of a multi-objective study (on the sweep run)."""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import optuna
from rich.table import Table

from labfleet.orchestration.progress import ProgressBoard
from labfleet.spec.models import SweepConfig
from labfleet.tracking.runs import Tracker

TrialState = optuna.trial.TrialState


class TrialBoard:
    """The live table of trials (number, state, params, latest value, best so far) below the progress
    bars on a terminal; one line per finished trial in plain output."""

    SHOWN_FINISHED = 8

    def __init__(self, study: optuna.Study, sweep: SweepConfig, board: ProgressBoard):
        self.sweep, self.board, self.study_name = sweep, board, study.study_name
        # (number, state, value, params) of the last few finished trials: all a long sweep's table shows
        self.finished: deque[tuple[int, str, Any, dict[str, Any]]] = deque(maxlen=self.SHOWN_FINISHED)
        self.best: tuple[int, float] | None = None
        if not sweep.multi_objective and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            best = study.best_trial
            self.best = (best.number, float(best.value or 0.0))

    def refresh(self, active: list[tuple[int, dict[str, Any], float | None]]) -> None:
        """`active`: (number, params, latest intermediate value) of each running trial."""
        if not self.board.live:
            return
        names = [name for name, _ in self.sweep.objectives]
        table = Table(title=f"{self.study_name}: " + ", ".join(f"{m} ({d})" for m, d in self.sweep.objectives),
                      title_justify="left")
        last = "latest" if len(names) == 1 else "values"
        for column in ("trial", "state", *map(param_column, self.sweep.space), last):
            table.add_column(column, overflow="fold")
        for number, params, latest in sorted(active, key=lambda row: row[0]):
            table.add_row(str(number), "RUNNING", *(_short(params.get(p, "")) for p in self.sweep.space),
                          "" if latest is None else _short(latest))
        for number, state, value, params in reversed(self.finished):
            style = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(state, "")
            table.add_row(str(number), state, *(_short(params.get(p, "")) for p in self.sweep.space),
                          _short(value), style=style)
        if self.best is not None:
            table.caption = f"best so far: {_short(self.best[1])} (trial {self.best[0]})"
        self.board.below = table

    def told(self, number: int, params: dict[str, Any], state: TrialState, value: Any, error: str | None) -> None:
        self.finished.append((number, state.name, value, dict(params)))
        if state == TrialState.COMPLETE and not self.sweep.multi_objective:
            sign = 1.0 if self.sweep.direction == "maximize" else -1.0
            if self.best is None or sign * value > sign * self.best[1]:
                self.best = (number, float(value))
        best = f"; best {_short(self.best[1])} (trial {self.best[0]})" if self.best else ""
        shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
        what = (error or "no reason recorded").strip().splitlines()[-1][:200] if state == TrialState.FAIL \
            else _short(value)
        self.board.note(f"trial {number} {state.name}: {what} [{shown}]{best}")


def log_pareto_front(study: optuna.Study, sweep: SweepConfig, tracker: Tracker, sweep_run: str) -> None:
    """The Pareto-optimal trials on the sweep run: a tag with their numbers, `pareto_front.json` (values
    and params of each) and, for two objectives, a plot of every complete trial with the front marked."""
    front = sorted(study.best_trials, key=lambda t: t.number)
    names = [m for m, _ in sweep.objectives]
    tracker.set_tags(sweep_run, {"pareto.trials": ",".join(str(t.number) for t in front),
                                 "pareto.size": str(len(front))})
    rows = [{"trial": t.number, "values": dict(zip(names, t.values, strict=True)), "params": t.params,
             "mlflow_run_id": t.user_attrs.get("mlflow_run_id")} for t in front]
    tracker.log_bytes(sweep_run, "pareto_front.json", json.dumps(rows, indent=2).encode())
    if len(names) == 2:
        tracker.log_bytes(sweep_run, "pareto_front.png", _pareto_png(study, names, {t.number for t in front}))


def _pareto_png(study: optuna.Study, names: list[str], front: set[int]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    others = [t for t in complete if t.number not in front]
    best = sorted((t for t in complete if t.number in front), key=lambda t: t.values[0])
    ax.scatter([t.values[0] for t in others], [t.values[1] for t in others], c="0.6", s=18, label="trials")
    ax.plot([t.values[0] for t in best], [t.values[1] for t in best], "o-", c="C3", ms=5, label="Pareto front")
    for t in best:
        ax.annotate(str(t.number), (t.values[0], t.values[1]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(study.study_name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def leaderboard(study: optuna.Study, sweep: SweepConfig, rows: int = 20) -> Table:
    names = [m for m, _ in sweep.objectives]
    table = Table(title=f"{study.study_name}: " + ", ".join(f"{m} ({d})" for m, d in sweep.objectives))
    for column in ("trial", "state", *names, *map(param_column, sweep.space)):
        table.add_column(column, overflow="fold")  # folded onto more lines, never cut
    rank = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}  # a pruned trial's value is its last report
    if sweep.multi_objective:  # the Pareto front first, then by the first objective
        front = {t.number for t in study.best_trials} if any(
            t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)) else set()
        sign0 = -1.0 if sweep.objectives[0][1] == "maximize" else 1.0
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: (
            rank.get(t.state, 2), t.number not in front, t.values is None, sign0 * (t.values or [0.0])[0]))
    else:
        sign = -1.0 if sweep.direction == "maximize" else 1.0
        trials = sorted(study.get_trials(deepcopy=False),
                        key=lambda t: (rank.get(t.state, 2), t.value is None, sign * (t.value or 0.0)))
    for t in trials[:rows]:
        values = list(t.values) if t.values is not None else []
        shown = [f"{v:.4g}" for v in values] + [""] * (len(names) - len(values))
        state = t.state.name + (" *" if sweep.multi_objective and t.state == TrialState.COMPLETE
                                and t.number in front else "")
        table.add_row(str(t.number), state, *shown, *(_short(t.params.get(p, "")) for p in sweep.space))
    if sweep.multi_objective:
        table.caption = "* on the Pareto front"
    return table


def param_column(path: str) -> str:
    """A searched path as a column head: `hparams.` says nothing in a table of hyperparameters."""
    return path.removeprefix("hparams.")


def best_line(study: optuna.Study, sweep: SweepConfig) -> str | None:
    """The best trial with every parameter in full, for the end of the command."""
    if sweep.multi_objective or not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    best = study.best_trial
    params = "  ".join(f"{path}={value!r}" for path, value in best.params.items())
    return f"best: trial {best.number}, {sweep.metric} = {best.value!r}; {params}"


def _short(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(_short(v) for v in value)
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
