"""The names labfleet writes into its stores, defined once: its MLflow run tags, MLflow's own tags it sets or
reads, the tags that tie a sweep run to its Optuna study, the Optuna trial attributes it sets and the metadata
keys of a Ray job it submits. `../shared/ARCHITECTURE.md` is the contract for the run tags; code names them
only through these constants (`tests/test_names.py` fails on a literal elsewhere in the package)."""

from __future__ import annotations

# --- every run -------------------------------------------------------------------------------------------
ROLE = "labfleet.role"  # suite, sweep, trial or seed
VERSION = "labfleet.version"
DRIVER = "labfleet.driver"  # who drives the run: host:pid:boot:start (heartbeat.py)
HEARTBEAT = "labfleet.heartbeat"  # seconds since the epoch, renewed while the run is open
RECONCILED = "labfleet.reconciled"  # set on a run `labfleet reconcile` ended
SLURM_JOB = "labfleet.slurm_job"  # the SLURM job whose driver opened the run
SLURM_CLUSTER = "labfleet.slurm_cluster"
ERROR = "labfleet.error"  # the last 5000 characters of a failed run's error

# --- trial and seed runs -----------------------------------------------------------------------------------
ALGORITHM = "labfleet.algorithm"
ENV = "labfleet.env"
DATASET = "labfleet.dataset"
SPEC_FILE = "labfleet.spec_file"
CONFIG_HASH = "labfleet.config_hash"  # one configuration: its reruns pool their seeds
LABEL = "labfleet.label"  # a trial run's configuration label (its run name may add " #N" on reruns)
GIT_COMMIT = "labfleet.git_commit"
GIT_DIRTY = "labfleet.git_dirty"
SUITE = "labfleet.suite"  # a suite run's name
SEED = "labfleet.seed"
RETRIES = "labfleet.retries"  # how often the seed's actor was restarted
RESUME = "labfleet.resume"  # on a seed run restarted from a checkpoint: "exact" or "approximate"
RESUMED_FROM = "labfleet.resumed_from"
NODE = "labfleet.node"  # where the seed trains: Ray node, host, device, process
HOST = "labfleet.host"
DEVICE = "labfleet.device"
PID = "labfleet.pid"

# --- MLflow's own ------------------------------------------------------------------------------------------
PARENT = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
EXPERIMENT_KIND = "mlflow.experimentKind"  # an experiment without it opens in MLflow 3's GenAI view

# --- sweeps: a sweep run and its trial runs, and the study's trials -------------------------------------------
STUDY_NAME = "optuna.study_name"
STORAGE = "optuna.storage"
TRIAL_NUMBER = "optuna.trial_number"
TRIAL_STATE = "optuna.state"
DRIVER_ATTR = DRIVER  # an Optuna trial's user attribute: the driver that asked it
RETRY_OF_ATTR = "labfleet.retry_of"  # an Optuna trial's user attribute: the failed trial it retries

# --- Ray jobs `labfleet submit` starts ---------------------------------------------------------------------
JOB_KIND = "labfleet.kind"  # run, suite or sweep
JOB_FILE = "labfleet.file"  # the spec's file name
