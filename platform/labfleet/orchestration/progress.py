"""Progress of running seeds: rich bars on a terminal, a plain line per tenth of the budget otherwise
(CI logs), nothing with --quiet."""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

from labfleet import metrics as M
from labfleet.orchestration.events import ChunkResult, Event, SeedEnded, SeedRestored, SeedStarted


class _BoardProgress(Progress):
    """Rich progress bars with one more renderable below them (a sweep's live table of trials). In a narrow
    terminal the bar goes first, then the ETA, then the elapsed time: never a number (rich would cut the
    columns' text with an ellipsis); a label that still does not fit folds onto a second line."""

    def __init__(self, *columns: Any, board: ProgressBoard, optional: tuple[Any, ...] = (), **kwargs: Any):
        self._board = board
        self._optional = optional  # groups of columns, the first to go first
        super().__init__(*columns, **kwargs)

    def _fitting(self, tasks: list[Any]) -> tuple[Any, ...]:
        from rich.measure import Measurement

        options = self.console.options
        widths = {id(column): max((Measurement.get(self.console, options, column(task)).maximum for task in tasks),
                                  default=0) for column in self.columns if not isinstance(column, str)}
        columns = list(self.columns)
        for group in self._optional:
            if sum(widths.get(id(c), 0) for c in columns) + len(columns) - 1 <= options.max_width:
                break
            columns = [c for c in columns if c not in group]
        return tuple(columns)

    def make_tasks_table(self, tasks):  # type: ignore[no-untyped-def]
        every = self.columns
        if not hasattr(self, "live"):  # rich renders once while it is still being built
            return super().make_tasks_table(tasks)
        self.columns = self._fitting([t for t in tasks if t.visible])
        try:
            return super().make_tasks_table(tasks)
        finally:
            self.columns = every

    def get_renderables(self):  # type: ignore[no-untyped-def]
        yield self.make_tasks_table(self.tasks)
        if self._board.below is not None:
            yield self._board.below


class ProgressBoard:
    """`below`: a renderable shown under the bars on a terminal; the driver replaces it (never mutates it),
    because rich redraws from its own thread."""

    def __init__(self, console: Console, quiet: bool = False, hide_finished: bool = False):
        self.console = console
        self.quiet = quiet
        self.hide_finished = hide_finished  # a sweep's many trials: finished bars give way to the table
        self.live = console.is_terminal and not quiet
        self.below: Any = None
        self._progress: Progress | None = None
        self._tasks: dict[Hashable, Any] = {}
        self._running: set[Hashable] = set()
        self._plain: dict[Hashable, dict[str, Any]] = {}

    def __enter__(self) -> ProgressBoard:
        if self.live:
            bar, elapsed, eta = BarColumn(), TimeElapsedColumn(), (TextColumn("eta"), TimeRemainingColumn())
            self._progress = _BoardProgress(
                TextColumn("{task.description}", table_column=Column(overflow="fold")), bar, MofNCompleteColumn(),
                TextColumn("{task.fields[latest]}", table_column=Column(no_wrap=True)), elapsed, *eta,
                console=self.console, refresh_per_second=4, board=self, optional=((bar,), eta, (elapsed,)),
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            if self.hide_finished:  # a sweep: its summary follows; the last screen keeps no stale table
                self.below = None
                self._progress.refresh()
            self._progress.__exit__(None, None, None)
            self._progress = None

    def add(self, key: Hashable, label: str, total: int) -> None:
        """A seed, PENDING (its clock stopped) until its first result: it may wait for resources."""
        if self._progress is not None:
            self._tasks[key] = self._progress.add_task(label, total=total, latest="PENDING", start=False)
        elif not self.quiet:
            self._plain[key] = {"label": label, "total": total, "shown": -1, "start": time.perf_counter()}

    def update(self, key: Hashable, completed: int, latest: str) -> None:
        if self._progress is not None:
            task = self._tasks.get(key)
            if task is None:  # finished and removed already
                return
            if key not in self._running:
                self._running.add(key)
                self._progress.start_task(task)  # the time column counts running time, not waiting
            self._progress.update(task, completed=completed, latest=latest)
            return
        entry = self._plain.get(key)
        if entry is None:
            return
        tenth = int(10 * completed / max(entry["total"], 1))
        if tenth > entry["shown"]:
            entry["shown"] = tenth
            elapsed = time.perf_counter() - entry["start"]
            self.console.print(f"{entry['label']}: {completed}/{entry['total']} ({10 * tenth}%) {latest} "
                               f"[{elapsed:.0f}s]", highlight=False)

    def finish(self, key: Hashable, status: str) -> None:
        if self._progress is not None:
            task = self._tasks.pop(key, None) if self.hide_finished else self._tasks.get(key)
            if task is None:
                return
            if self.hide_finished:  # gone, not hidden: a long sweep's bars would otherwise pile up in rich
                self._progress.remove_task(task)
                self._running.discard(key)
            else:
                self._progress.update(task, latest=status)
        elif key in self._plain:
            self.console.print(f"{self._plain.pop(key)['label']}: {status}", highlight=False)

    def note(self, line: str) -> None:
        """A line for plain output (CI logs) only; a terminal shows the same in `below`."""
        if not self.live and not self.quiet:
            self.console.print(line, highlight=False)


class ProgressListener:
    """The bars of the driver's seeds, from its events: a bar per seed, PENDING until its first result,
    its latest headline metric while it runs, its end state after."""

    def __init__(self, board: ProgressBoard):
        self.board = board

    def handle(self, event: Event) -> None:
        board = self.board
        match event:
            case SeedStarted(trial=trial, seed=seed, total=total):
                board.add((trial.label, seed), f"{trial.label} seed={seed}", total)
            case SeedRestored(trial=trial, seed=seed):
                total = trial.spec.budget.total
                board.add((trial.label, seed), f"{trial.label} seed={seed}", total)
                board.update((trial.label, seed), total, "")
                board.finish((trial.label, seed), "FINISHED")
            case ChunkResult(trial=trial, seed=seed, progress=progress, latest=latest):
                metric = trial.info.primary_metric_for(trial.spec.dataset)
                board.update((trial.label, seed), progress, headline(latest, metric))
            case SeedEnded(trial=trial, seed=seed, status=status):
                board.finish((trial.label, seed), str(status))
        return None


def headline(latest: dict[str, float], primary_metric: str | None) -> str:
    """The one value a progress bar shows: the primary metric (else the first evaluation, for your own
    code), else the training return, with the throughput."""
    rate = f" {latest[M.SPS]:.0f} sps" if M.SPS in latest else ""
    keys = [primary_metric] if primary_metric else sorted(k for k in latest if k.startswith(M.EVAL_PREFIX))
    for key in [*keys[:1], M.TRAIN_EPISODE_RETURN]:
        if key in latest:
            return f"{key}={latest[key]:.4g}{rate}"
    return rate.strip()


def summary_table(title: str, rows: list[dict[str, str]]) -> Table:
    """Rows of the same keys; names fold onto more lines instead of being cut (two names that differ only
    at their end stay told apart in 80 columns)."""
    table = Table(title=title)
    for column in rows[0] if rows else []:
        left = column in ("trial", "status", "metric")
        table.add_column(column, justify="left" if left else "right", overflow="fold")
    for row in rows:
        style = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow"}.get(row.get("status", ""), "")
        table.add_row(*row.values(), style=style)
    return table
