"""What a sweep shows: the live table of trials, the leaderboard and best line at the end, and the Pareto
front of a multi-objective study (on the sweep run)."""

from __future__ import annotations

import json
from collections import deque
from typing import TYPE_CHECKING, Any

import optuna
from rich.table import Table

from labfleet.orchestration.progress import ProgressBoard
from labfleet.spec.models import SweepConfig

if TYPE_CHECKING:
    from labfleet.orchestration.recorder import MlflowRecorder

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
        self.events: list[str] = []  # what a scheduler did lately (PBT's exploits), shown under the table
        if not sweep.multi_objective and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            best = study.best_trial
            self.best = (best.number, float(best.value or 0.0))

    def refresh(self, active: list[tuple[int, str, dict[str, Any], float | None]]) -> None:
        """`active`: (number, state, current params, latest intermediate value) of each trial this driver runs
        (state RUNNING, or WAITING for its turn under population-based training)."""
        if not self.board.live:
            return
        names = [name for name, _ in self.sweep.objectives]
        last = "latest" if len(names) == 1 else "values"
        rows: list[tuple[list[str], str]] = []
        for number, state, params, latest in sorted(active, key=lambda row: row[0]):
            rows.append(([str(number), short_state(state), *(_short(params.get(p, "")) for p in self.sweep.space),
                          "" if latest is None else _short(latest)], ""))
        for number, state, value, params in reversed(self.finished):
            style = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(state, "")
            rows.append(([str(number), short_state(state), *(_short(params.get(p, "")) for p in self.sweep.space),
                          _short(value)], style))
        table = fitted_table(f"{self.study_name}: " + ", ".join(f"{m} ({d})" for m, d in self.sweep.objectives),
                             ["trial", "state", *map(param_column, self.sweep.space), last], rows)
        notes = ([f"best so far: {_short(self.best[1])} (trial {self.best[0]})"] if self.best is not None else []) \
            + self.events[-2:]
        table.caption = "; ".join(notes) or None
        self.board.below = table

    def exploited(self, entry: dict[str, Any]) -> None:
        """A PBT exploit (a lineage entry): under the live table, or one line in plain output."""
        changes = ", ".join(f"{param_column(p)} {_short(entry['old'].get(p))}->{_short(v)}"
                            for p, v in entry["new"].items())
        line = f"step {entry['step']}: trial {entry['to_trial']} took trial {entry['from_trial']}'s weights; {changes}"
        self.events = [*self.events[-1:], line]
        self.board.note(line)

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


def log_pareto_front(study: optuna.Study, sweep: SweepConfig, recorder: MlflowRecorder, sweep_run: str) -> None:
    """The Pareto-optimal trials on the sweep run: a tag with their numbers, `pareto_front.json` (values
    and params of each) and, for two objectives, a plot of every complete trial with the front marked."""
    front = sorted(study.best_trials, key=lambda t: t.number)
    names = [m for m, _ in sweep.objectives]
    recorder.run_tags(sweep_run, {"pareto.trials": ",".join(str(t.number) for t in front),
                                  "pareto.size": str(len(front))})
    rows = [{"trial": t.number, "values": dict(zip(names, t.values, strict=True)), "params": t.params,
             "mlflow_run_id": t.user_attrs.get("mlflow_run_id")} for t in front]
    recorder.run_artifact(sweep_run, "pareto_front.json", json.dumps(rows, indent=2).encode())
    if len(names) == 2:
        recorder.run_artifact(sweep_run, "pareto_front.png", _pareto_png(study, names, {t.number for t in front}))


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
    lines: list[tuple[list[str], str]] = []
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
        shown = [_short(v) for v in values] + [""] * (len(names) - len(values))
        state = short_state(t.state.name) + (" *" if sweep.multi_objective and t.state == TrialState.COMPLETE
                                             and t.number in front else "")
        lines.append(([str(t.number), state, *shown, *(_short(t.params.get(p, "")) for p in sweep.space)], ""))
    table = fitted_table(f"{study.study_name}: " + ", ".join(f"{m} ({d})" for m, d in sweep.objectives),
                         ["trial", "state", *names, *map(param_column, sweep.space)], lines)
    if sweep.multi_objective:
        table.caption = "* on the Pareto front"
    return table


# States in 6 characters or fewer: a table in 80 columns has no room for COMPLETE beside a few parameters
SHORT_STATES = {"COMPLETE": "done", "RUNNING": "run", "WAITING": "wait", "PRUNED": "pruned", "FAIL": "failed"}


def short_state(state: str) -> str:
    return SHORT_STATES.get(state, state.lower())


def fitted_table(title: str, heads: list[str], rows: list[tuple[list[str], str]]) -> Table:
    """A table whose cells are never wrapped or cut: each column is at least as wide as its widest cell (a
    number or state stays one token), and only a head wider than that folds onto more lines."""
    table = Table(title=title, title_justify="left")
    for i, head in enumerate(heads):
        widest = max((len(cells[i]) for cells, _ in rows), default=0)
        table.add_column(head, overflow="fold", min_width=max(widest, 1), justify="left")
    for cells, style in rows:
        table.add_row(*cells, style=style)
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
    """A value in a table: floats to 3 significant figures (the best line at the end gives them in full)."""
    if isinstance(value, list | tuple):
        return ",".join(_short(v) for v in value)
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
