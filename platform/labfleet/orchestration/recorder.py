"""The MLflow recorder: the one listener that writes the run hierarchy (ARCHITECTURE section 5).

It turns the driver's events into `suite`, `sweep`, `trial` and `seed` runs, their params, tags, metric
curves, artifacts and checkpoints, and it owns every query the driver makes of the store: the distinct
name of a rerun, the trial run a dead driver left unfinished (with each seed's checkpoint and logged
steps), the suite or sweep run to reopen, and the stale runs to end when a study is recovered. All writes
go through `Tracker` (tracking/runs.py), whose writer thread overlaps them with the driver's waits.

A seed's latest checkpoint is also an artifact of its run (`checkpoints/latest.pt`, rewritten at every
checkpoint), so a rerun after the driver died continues from it without any shared filesystem.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labfleet import metrics as M
from labfleet.errors import Problem, SpecError
from labfleet.orchestration.events import (
    ChunkResult,
    Evaluation,
    Event,
    SeedEnded,
    SeedPlaced,
    SeedRecord,
    SeedRestored,
    SeedRetried,
    SeedStarted,
    Status,
    Trial,
    TrialEnded,
    TrialStarted,
)
from labfleet.orchestration.runner import config_hash, shared_step_means
from labfleet.tracking import queries as Q
from labfleet.tracking import tags as tag
from labfleet.tracking.heartbeat import live_owner
from labfleet.tracking.runs import Tracker, flatten, git_commit, library_versions, redact_tree
from labfleet.tracking.store_process import RunTag, is_store_error
from labfleet.tracking.uri import retry_if_locked

LATEST_CHECKPOINT = "checkpoints/latest.pt"
FINAL_CHECKPOINT = "checkpoints/final.pt"
ERROR_LOG = "error.txt"  # a failed seed run's whole error, its traceback included
UNFINISHED = ("RUNNING", "KILLED")  # a driver that died, or was interrupted; FAILED trials start anew
# How long a driver waits between writing its claim on runs a gone driver left and reading it back (`claim`)
CLAIM_SETTLE_S = 0.25


class RunsOwned(SpecError):
    """Runs a command would continue are still written by another live driver: nothing is taken over."""

    def __init__(self, where: str, what: str, run: Any, owner: str):
        super().__init__([Problem(where, "", f"{what} (run {run.info.run_id}) is being written by another driver "
                                             f"({owner}) right now; wait for it to end, or pass --fresh to start "
                                             "new runs beside it")])


@dataclass
class _Trial:
    run_id: str = ""
    run_name: str = ""
    seeds: dict[int, str] = field(default_factory=dict)  # seed -> run id
    resuming: dict[int, str] = field(default_factory=dict)  # seed -> the run id an earlier driver left
    # The trial run's eval/* curves: each seed's evaluations (seed -> step -> values), the seeds that left the
    # mean (failed or killed), and the last step logged of each name
    evals: dict[int, dict[int, dict[str, float]]] = field(default_factory=dict)
    left: set[int] = field(default_factory=set)
    history: dict[str, int] = field(default_factory=dict)


def placement_tags(where: dict[str, str]) -> dict[str, str]:
    """Where a seed runs, as its run's tags: node, host, device, and the trial actor's process (seeds_per_actor
    > 1: shared by its unit)."""
    tags = {tag.NODE: where["node_id"], tag.HOST: where["host"], tag.DEVICE: where["device"]}
    if where.get("pid"):
        tags[tag.PID] = where["pid"]
    return tags


class MlflowRecorder:
    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.trials: dict[Trial, _Trial] = {}
        self.notes: list[str] = []  # what the driver should tell the user about the runs it took back

    # --- what the rest of the driver asks --------------------------------------------------------
    def has_run(self, trial: Trial) -> bool:
        """Whether the trial's run exists (not when Ctrl-C came while it was being created)."""
        return trial in self.trials

    def trial_run_id(self, trial: Trial) -> str:
        return self.trials[trial].run_id

    def seed_run_id(self, trial: Trial, seed: int) -> str:
        return self.trials[trial].seeds[seed]

    def run_name(self, trial: Trial) -> str:
        entry = self.trials.get(trial)
        return entry.run_name if entry else trial.label

    def run_ids(self, trial: Trial) -> list[str]:
        """The trial run, then its seed runs."""
        entry = self.trials[trial]
        return [entry.run_id, *entry.seeds.values()]

    def pop_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    def forget(self, trial: Trial) -> None:
        """Let go of an ended trial whose runs nothing will write again (a sweep's told trial)."""
        self.trials.pop(trial, None)

    def read_json(self, run_id: str, path: str) -> Any:
        """A JSON artifact of a run (e.g. the sweep's PBT lineage so far), or None."""
        self.tracker.drain()
        return read_json_artifact(self.tracker.client, run_id, path)

    # --- events ---------------------------------------------------------------------------------
    def handle(self, event: Event) -> None:
        tracker = self.tracker
        match event:
            case TrialStarted(trial=trial, resumed=resumed):
                if resumed:
                    tracker.reopen_run(self.trials[trial].run_id, "trial")  # `unfinished` found it
                else:
                    self._start_trial(trial)
            case SeedStarted():
                self._start_seed(event)
            case SeedRestored():
                self._restore_seed(event)
            case SeedPlaced(trial=trial, seed=seed, where=where):
                tracker.queue_tags(self.seed_run_id(trial, seed), placement_tags(where))
            case SeedRetried(trial=trial, seed=seed, retries=retries):
                tracker.queue_tags(self.seed_run_id(trial, seed), {tag.RETRIES: str(retries)})
            case ChunkResult():
                self._chunk(event)
            case Evaluation():
                self._evaluation(event)
            case SeedEnded():
                self._end_seed(event)
            case TrialEnded():
                self._end_trial(event)
        return None

    def _restore_seed(self, event: SeedRestored) -> None:
        """A seed an earlier driver finished: its run and evaluations, as they were."""
        entry = self.trials[event.trial]
        entry.seeds[event.seed] = entry.resuming[event.seed]
        entry.evals[event.seed] = {step: dict(values) for step, values in event.record.evals.items()}

    def _end_trial(self, event: TrialEnded) -> None:
        if not self.has_run(event.trial):  # its run was never created (Ctrl-C inside `create_run`)
            return
        run_id = self.trial_run_id(event.trial)
        history = self.trials[event.trial].history
        # The finals at the trial's last step; a mean whose history already holds that step has it (the same
        # value: the mean over seeds of their last evaluations), and no step is logged twice.
        step = max([event.step, *history.values()])
        finals = {k: v for k, v in event.metrics.items() if history.get(k) != step}
        if finals:
            self.tracker.log_metrics(run_id, finals, step)
        self.tracker.end_run(run_id, event.status, event.error)

    def _history(self, trial: Trial) -> None:
        """The trial run's curve of each eval/* metric: its mean over the seeds that have not failed at every
        step all of them have evaluated, logged once, in step order, as soon as the last seed reaches it."""
        entry = self.trials[trial]
        seeds = [evals for seed, evals in entry.evals.items() if seed not in entry.left]
        names = sorted({k for evals in seeds for values in evals.values() for k in values})
        for name in names:
            for step, mean in shared_step_means(seeds, name, entry.history.get(name, -1)).items():
                self.tracker.log_metrics(entry.run_id, {name: mean}, step)
                entry.history[name] = step
        # what every name's curve has passed is not needed again (a long run's driver keeps a few steps per seed)
        done = min((entry.history.get(name, -1) for name in names), default=-1)
        for evals in entry.evals.values():
            for step in [s for s in evals if s <= done]:
                del evals[step]

    def _end_seed(self, event: SeedEnded) -> None:
        entry = self.trials.get(event.trial)
        run_id = entry.seeds.get(event.seed) if entry else None
        if run_id is None:  # its run (or its trial's) was never created: the store failed first, and that
            return          # error is raised, or Ctrl-C came while the run was being created
        if event.status == Status.FINISHED and event.checkpoint is not None and event.final is not None:
            self.tracker.log_bytes(run_id, FINAL_CHECKPOINT, event.checkpoint)
        if event.error:  # the whole traceback (the tag `labfleet.error` keeps its last 5000 characters)
            self.tracker.log_bytes(run_id, ERROR_LOG, event.error.encode())
        self.tracker.end_run(run_id, event.status, event.error)
        if event.status != Status.FINISHED and entry is not None:
            entry.left.add(event.seed)  # the others' steps it had not reached are complete now
            self._history(event.trial)

    def _evaluation(self, event: Evaluation) -> None:
        if event.trial in self.trials:
            self.trials[event.trial].evals.setdefault(event.seed, {}).setdefault(event.step, {}).update(event.values)
            self._history(event.trial)

    def _start_seed(self, event: SeedStarted) -> None:
        entry, record = self.trials[event.trial], event.record
        entry.evals[event.seed] = {step: dict(values) for step, values in (record.evals if record else {}).items()}
        if record is None or event.seed not in entry.resuming:
            entry.seeds[event.seed] = self._new_seed_run(event.trial, event.seed)
            return
        run_id = entry.seeds[event.seed] = entry.resuming[event.seed]
        self.tracker.reopen_run(run_id, "seed")
        self.tracker.queue_tags(run_id, {tag.RESUMED_FROM: "checkpoint" if record.checkpoint else "scratch"})

    def _chunk(self, event: ChunkResult) -> None:
        tracker = self.tracker
        run_id = self.seed_run_id(event.trial, event.seed)
        if event.resumed is not None:  # how the last restart from a checkpoint went
            tracker.queue_tags(run_id, {tag.RESUME: event.resumed})
        for step, values in event.records:
            tracker.log_metrics(run_id, values, step)
        for path, data in event.artifacts.items():
            tracker.log_bytes(run_id, path, data)
        if event.checkpoint is not None:
            # the metrics up to a durable checkpoint are in the store before it: a seed resumed from it
            # delivers only later steps (exactly once). Otherwise they go with the round's commit.
            tracker.flush(run_id)
            tracker.log_bytes(run_id, LATEST_CHECKPOINT, event.checkpoint)

    def _start_trial(self, trial: Trial) -> None:
        spec, meta = trial.spec, trial.meta
        tags = {tag.ALGORITHM: spec.algorithm, tag.CONFIG_HASH: config_hash(spec), **_task_tag(spec),
                **meta.tags, tag.LABEL: trial.label}
        # A sweep names its trial's params itself (the sampled values); otherwise the whole configuration.
        params = meta.params or flatten(spec.model_dump(mode="json", exclude={"seeds"}))
        params = {**params, "seeds": json.dumps(spec.seeds)}
        # A sweep's labels are distinct already (its trial numbers); elsewhere reruns of a spec are told apart.
        name = trial.label if meta.params else self.distinct_name(trial)
        # A sweep's trial run takes its params (the sampled values, which Optuna holds too) with its first
        # metrics: one store call fewer a trial. Other trial runs write theirs at once: a rerun after a dead
        # driver reopens them, and never writes params again.
        run_id = self.tracker.start_run(trial.experiment, "trial", name, meta.parent_run_id, tags=tags, params=params,
                                        params_with_first_flush=bool(meta.params))
        self.trials[trial] = _Trial(run_id, name)

    def _new_seed_run(self, trial: Trial, seed: int) -> str:
        spec = trial.spec
        seed_spec = {**spec.model_dump(mode="json"), "seeds": [seed]}
        tags = {tag.ALGORITHM: spec.algorithm, tag.SEED: str(seed),
                tag.CONFIG_HASH: config_hash(spec), **_task_tag(spec)}
        commit, dirty = git_commit(trial.meta.spec_dir)
        if commit:
            tags[tag.GIT_COMMIT] = commit
            tags[tag.GIT_DIRTY] = str(dirty).lower()
        tags.update({f"labfleet.lib.{k}": v for k, v in library_versions().items()})
        entry = self.trials[trial]
        run_id = self.tracker.start_run(trial.experiment, "seed", f"{entry.run_name}/seed={seed}", entry.run_id,
                                        tags=tags, params=flatten(seed_spec), params_with_first_flush=True)
        self.tracker.log_yaml(run_id, "spec.yaml", redact_tree(seed_spec))
        return run_id

    # --- queries --------------------------------------------------------------------------------
    def distinct_name(self, trial: Trial) -> str:
        """The label, or "label #N" for the N-th trial run of this label in the experiment, so that reruns
        of a spec are told apart in the MLflow UI and in reports."""
        earlier = self.tracker.client.search_runs([self.tracker.experiment_id(trial.experiment)],
                                                  Q.trials_of_label(trial.label), max_results=10_000)
        return trial.label if not earlier else f"{trial.label} #{len(earlier) + 1}"

    def unfinished(self, trial: Trial) -> tuple[Any, dict[int, SeedRecord]] | None:
        """The latest trial run of this configuration (same label, config hash, seeds and parent) when a
        driver left it RUNNING or KILLED, with a record of each of its seeds; None otherwise (a FINISHED
        one is never reopened). Found, it is the run that `trial.resume` continues."""
        client, spec = self.tracker.client, trial.spec
        experiment_id = self.tracker.experiment_id(trial.experiment)
        for run in client.search_runs([experiment_id], Q.trials_of_label(trial.label, config_hash(spec)),
                                      order_by=["attributes.start_time DESC"], max_results=20):
            if run.data.tags.get(tag.PARENT) != trial.meta.parent_run_id or \
                    run.data.params.get("seeds") != json.dumps(spec.seeds):
                continue
            if run.info.status not in UNFINISHED:  # only the latest such run counts
                return None
            owner = live_owner(run)
            if owner is not None:  # only a gone driver's work is taken over (reconcile's rule)
                raise RunsOwned(trial.meta.tags.get(tag.SPEC_FILE, trial.label), f"trial {trial.label}",
                                run, owner)
            self.claim([run], trial.meta.tags.get(tag.SPEC_FILE, trial.label), f"trial {trial.label}")
            entry = self.trials[trial] = _Trial(run.info.run_id, run.data.tags.get(tag.RUN_NAME, trial.label))
            entry.history = {key: max(m.step for m in client.get_metric_history(run.info.run_id, key))
                             for key in run.data.metrics if key.startswith(M.EVAL_PREFIX)}
            records = {}
            for seed, (run_id, record) in self._seed_records(experiment_id, run.info.run_id).items():
                entry.resuming[seed] = run_id
                records[seed] = record
            return run, records
        return None

    def _seed_records(self, experiment_id: str, trial_run_id: str) -> dict[int, tuple[str, SeedRecord]]:
        client = self.tracker.client
        records = {}
        for run in client.search_runs([experiment_id], Q.children(trial_run_id), max_results=1000):
            if run.data.tags.get(tag.ROLE) != "seed":
                continue
            run_id, status = run.info.run_id, run.info.status
            retries = int(run.data.tags.get(tag.RETRIES, 0))
            # every metric's history for an unfinished seed (what it logged), the evaluations' for a finished one
            histories = {key: client.get_metric_history(run_id, key) for key in run.data.metrics
                         if status != "FINISHED" or key.startswith(M.EVAL_PREFIX)}
            evals: dict[int, dict[str, float]] = {}
            for key, history in histories.items():
                for metric in history if key.startswith(M.EVAL_PREFIX) else ():
                    evals.setdefault(metric.step, {})[key] = metric.value
            if status == "FINISHED":
                final = {k: v for k, v in run.data.metrics.items() if k.startswith(M.EVAL_PREFIX)}
                record = SeedRecord(Status.FINISHED, final=final, retries=retries, evals=evals)
            else:
                logged = {key: max(m.step for m in history) for key, history in histories.items()}
                checkpoint = _download(client, run_id, LATEST_CHECKPOINT)
                if checkpoint is not None and (damage := checkpoint_damage(checkpoint)) is not None:
                    self.notes.append(f"seed run {run_id}: its {LATEST_CHECKPOINT} is damaged ({damage}); the seed "
                                      "starts again from scratch in the same run (--fresh starts new runs)")
                    checkpoint = None
                record = SeedRecord(Status(status), checkpoint, logged, retries=retries, evals=evals)
            records[int(run.data.tags[tag.SEED])] = (run_id, record)
        return records

    def suite_run(self, experiment: str, name: str, fresh: bool = False) -> tuple[str, set[tuple[str, str]]]:
        """The suite run: the latest one of this name when it did not finish (an interrupted suite resumes:
        its FINISHED trials are skipped, the others continue), else (or when `fresh`) a new one. Returns
        it with the (label, config hash) of every trial it finished."""
        tracker = self.tracker
        client = tracker.client
        experiment_id = tracker.experiment_id(experiment)
        found = client.search_runs([experiment_id], Q.suite_runs(name), order_by=["attributes.start_time DESC"],
                                   max_results=1)
        if fresh or not found or found[0].info.status == "FINISHED":
            return tracker.start_run(experiment, "suite", name, tags={tag.SUITE: name}), set()
        owner = live_owner(found[0])
        if owner is not None:
            raise RunsOwned(name, f"suite {name}", found[0], owner)
        self.claim(found, name, f"suite {name}")
        run_id = found[0].info.run_id
        tracker.reopen_run(run_id, "suite")
        done: set[tuple[str, str]] = set()
        for trial in client.search_runs([experiment_id], Q.children(run_id), max_results=5000):
            if trial.data.tags.get(tag.ROLE) != "trial":
                continue
            if trial.info.status == "FINISHED":
                label = trial.data.tags.get(tag.LABEL, trial.data.tags.get(tag.RUN_NAME, ""))
                done.add((label, trial.data.tags.get(tag.CONFIG_HASH, "")))
            stale = client.search_runs([experiment_id], Q.children(trial.info.run_id, running=True))
            for run in [*stale, *([trial] if trial.info.status == "RUNNING" else [])]:
                tracker.end_run(run.info.run_id, "KILLED")
        return run_id, done

    def claim(self, runs: list[Any], where: str, what: str) -> None:
        """Take runs a gone driver left for this driver before continuing them: write this driver's identity
        on each, wait `CLAIM_SETTLE_S`, and read them back. Two drivers that found the same runs free at the
        same moment both write; the later writer keeps them and the other is refused (`RunsOwned`)."""
        client, me = self.tracker.client, self.tracker.driver
        for run in runs:
            retry_if_locked(client.log_batch, run.info.run_id, [], [],
                            [RunTag(tag.DRIVER, me), RunTag(tag.HEARTBEAT, str(int(time.time())))])
        time.sleep(CLAIM_SETTLE_S)
        for run in runs:
            now = client.get_run(run.info.run_id)
            owner = now.data.tags.get(tag.DRIVER, "")
            if owner != me:
                raise RunsOwned(where, what, now, owner)

    def sweep_run(self, experiment: str, study_name: str, storage_shown: str, params: dict[str, str],
                  parent: str | None = None) -> str:
        """The study's `sweep` run: the one an earlier invocation made (reopened, or joined as it is while
        another live driver works on the same study), or a new one."""
        tracker = self.tracker
        found = tracker.client.search_runs([tracker.experiment_id(experiment)],
                                           Q.sweep_runs(study_name, storage_shown), max_results=1)
        if found and live_owner(found[0]) is not None:  # a second driver of the study: its trials join it
            return found[0].info.run_id
        if found:
            run_id = found[0].info.run_id
            tracker.reopen_run(run_id, "sweep")
            return run_id
        return tracker.start_run(experiment, "sweep", study_name, parent,
                                 tags={tag.STUDY_NAME: study_name, tag.STORAGE: storage_shown},
                                 params=params)

    def running_trial_runs(self, sweep_run: str) -> dict[int, Any]:
        """The RUNNING trial runs under a sweep run, by Optuna trial number."""
        client = self.tracker.client
        experiment_id = client.get_run(sweep_run).info.experiment_id
        runs = client.search_runs([experiment_id], Q.children(sweep_run, running=True), max_results=50_000)
        return {int(r.data.tags[tag.TRIAL_NUMBER]): r for r in runs if tag.TRIAL_NUMBER in r.data.tags}

    def end_stale_trials(self, experiment: str, sweep_run: str, states: dict[int, str],
                         failed_run_ids: list[str], keep: set[int] | None = None) -> None:
        """Make a sweep's record agree with its study after a dead driver: each trial run still RUNNING
        under the sweep, and its RUNNING seeds, take the trial's state as `optuna.state` and end (FINISHED
        for a COMPLETE or PRUNED trial, KILLED otherwise); a trial run the study now says FAIL says so too."""
        tracker = self.tracker
        experiment_id = tracker.experiment_id(experiment)
        stale = {r.info.run_id: r for r in tracker.client.search_runs(
            [experiment_id], Q.children(sweep_run, running=True))}
        # A trial whose MLflow record was written just before the driver died, before Optuna was told (the
        # order `OptunaSearcher.tell` keeps), has a run that says COMPLETE or PRUNED: it is FAIL now.
        for run_id in failed_run_ids:
            if run_id and run_id not in stale:
                tracker.set_tags(run_id, {tag.TRIAL_STATE: "FAIL"})
        for trial_run in stale.values():
            number = int(trial_run.data.tags.get(tag.TRIAL_NUMBER, -1))
            if keep and number in keep:  # a trial that goes on in its runs (`OptunaSearcher.adopt_running`)
                continue
            if live_owner(trial_run) is not None:  # another live driver's trial of the same study
                continue
            state = states.get(number, "FAIL")
            status = "FINISHED" if state in ("COMPLETE", "PRUNED") else "KILLED"
            seeds = tracker.client.search_runs([experiment_id], Q.children(trial_run.info.run_id, running=True))
            for run in [*seeds, trial_run]:
                tracker.queue_tags(run.info.run_id, {tag.TRIAL_STATE: state})
                tracker.end_run(run.info.run_id, status)

    # --- what sweeps, schedulers and commands add to the record (they decide; the recorder writes) ----
    def after_record(self, function: Any, *args: Any, **kwargs: Any) -> None:
        """Call `function` once everything recorded so far is in the store, off the driver's path (a sweep
        tells Optuna this way: the MLflow record first)."""
        self.tracker.after_writes(function, *args, **kwargs)

    def trial_state(self, trial: Trial, state: str, seeds: bool = True) -> None:
        """The Optuna state of a sweep's trial (`optuna.state`) on its trial run and, with `seeds`, its seed runs."""
        run_ids = self.run_ids(trial) if seeds else [self.trial_run_id(trial)]
        for run_id in run_ids:
            self.tracker.set_tags(run_id, {tag.TRIAL_STATE: state})

    def trial_metrics(self, trial: Trial, values: dict[str, float], step: int, now: bool = False) -> None:
        """Metrics of the trial run that its seeds do not give (a sweep's intermediate objective, a PBT
        schedule's values); with `now`, written before anything queued after them."""
        run_id = self.trial_run_id(trial)
        self.tracker.log_metrics(run_id, values, step)
        if now:
            self.tracker.flush(run_id)

    def fail_trial(self, trial: Trial, error: str) -> None:
        """End the trial run FAILED (its seeds trained, but its result cannot count)."""
        self.tracker.end_run(self.trial_run_id(trial), "FAILED", error)

    def run_metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        """Metrics of a sweep run (the objective over trials, the best value)."""
        self.tracker.log_metrics(run_id, values, step)

    def run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.tracker.set_tags(run_id, tags)

    def run_artifact(self, run_id: str, path: str, data: bytes) -> None:
        """A file of a sweep run (the PBT lineage, the Pareto front)."""
        self.tracker.log_bytes(run_id, path, data)

    def metric_steps(self, run_id: str, metric: str) -> set[int]:
        """The steps a run's metric has in the store (what another driver logged included)."""
        self.tracker.drain()
        return {m.step for m in self.tracker.client.get_metric_history(run_id, metric)}

    def run_owner(self, run_id: str) -> str | None:
        """The live driver writing the run, or None (`heartbeat.live_owner`)."""
        return live_owner(self.tracker.client.get_run(run_id))

    def end(self, run_id: str, status: str, error: str | None = None) -> None:
        """End a suite or sweep run."""
        self.tracker.end_run(run_id, status, error)


def _task_tag(spec: Any) -> dict[str, str]:
    """`labfleet.env` or `labfleet.dataset`; none for your own code that names neither."""
    if spec.env:
        return {tag.ENV: str(spec.env)}
    return {tag.DATASET: str(spec.dataset)} if spec.dataset else {}


def checkpoint_damage(data: bytes) -> str | None:
    """Why checkpoint bytes cannot be restored, or None. A checkpoint is `torch.save`'s zip archive: a
    truncated file has no central directory, and a flipped bit fails a member's CRC."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        return f"not a readable archive: {exc}"
    except Exception as exc:  # noqa: BLE001 - zlib.error and friends: any failure to read back is damage
        return f"{type(exc).__name__}: {exc}"
    return f"member {bad} fails its CRC check" if bad is not None else None


def read_json_artifact(client: Any, run_id: str, path: str) -> Any:
    data = _download(client, run_id, path)
    return None if data is None else json.loads(data)


def _download(client: Any, run_id: str, path: str) -> bytes | None:
    with tempfile.TemporaryDirectory(prefix="labfleet-resume-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception as exc:
            if isinstance(exc, OSError) or is_store_error(exc):  # no checkpoint yet: the seed starts from scratch
                return None
            raise
        return Path(local).read_bytes()
