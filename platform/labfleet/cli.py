"""The `labfleet` command line.

Exit codes: 0 success, 1 a trial failed, 2 bad input (nothing started, nothing written), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from labfleet.errors import Problem, SpecError, shown
from labfleet.tracking import tags as tag

app = typer.Typer(
    name="labfleet", no_args_is_help=True, add_completion=True, pretty_exceptions_show_locals=False,
    help="Train RL agents and generative models from YAML specs on Ray, tracked in MLflow.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        import labfleet

        typer.echo(f"labfleet {labfleet.__version__}")
        raise typer.Exit()


def quiet_libraries(verbose: bool) -> None:
    """Ray's token-authentication notice, MLflow's INFO lines (database migrations), its tracebacks of store
    errors labfleet reports itself, and Optuna's INFO lines ("A new study created") say nothing a user acts
    on: shown only with --verbose."""
    if verbose:
        os.environ["LABFLEET_VERBOSE"] = "1"
        return
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    # MLflow logs a store's SQL errors (a full disk, say) with their traceback, then raises them: labfleet
    # reports a failed write itself, in one line, and ends the runs it can still reach.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded checkpoint
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its loggers' level from this on import
    # Optuna sets its own level when first imported: `labfleet.orchestration.study` lowers it after that.


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: bool = typer.Option(False, "--verbose", help="Show the INFO lines of Ray, MLflow and Optuna."),
) -> None:
    """Train RL agents and generative models from YAML specs on Ray, tracked in MLflow."""
    quiet_libraries(verbose)

def complete_spec_files(incomplete: str) -> list[str]:
    """Shell completion: YAML files (and directories to walk into) under what is typed so far."""
    base = Path(incomplete).parent if incomplete and not incomplete.endswith("/") else Path(incomplete or ".")
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    shown_base = "" if str(base) == "." and not incomplete.startswith("./") else f"{base}/".replace("//", "/")
    out = [f"{shown_base}{p.name}" + ("/" if p.is_dir() else "") for p in entries
           if (p.is_dir() and not p.name.startswith(".")) or p.suffix in (".yaml", ".yml")]
    return [item for item in out if item.startswith(incomplete)]


def complete_algorithms(incomplete: str) -> list[str]:
    from labfleet.algorithms import registry

    return [name for name in registry.names() if name.startswith(incomplete)]


def complete_set_keys(ctx: typer.Context, incomplete: str) -> list[str]:
    """`--set` completion: the spec's fields as dotted KEY=, with the hyperparameters of the spec's algorithm."""
    from labfleet.spec.models import ExperimentSpec

    keys = [f"{name}=" for name in ExperimentSpec.model_fields if name != "hparams"]
    # (click does not fill ctx.params while it completes an option's value: the spec is read from the words)
    words = os.environ.get("COMP_WORDS", "").split()
    spec = ctx.params.get("spec") or next((w for w in words if w.endswith((".yaml", ".yml"))), None)
    if spec:
        try:
            import yaml

            algorithm = (yaml.safe_load(Path(spec).read_text(encoding="utf-8")) or {}).get("algorithm")
            from labfleet.algorithms import registry

            keys += [f"hparams.{name}=" for name in registry.get(str(algorithm)).hparams.model_fields]
        except Exception:  # noqa: BLE001 - completion offers what it can and never fails the shell
            pass
    return [key for key in keys if key.startswith(incomplete)]


SET_HELP = "Override a spec field: dotted KEY, YAML VALUE (hparams.gamma=0.98, seeds=[3,4]). Repeatable."
TRACKING_HELP = "MLflow tracking URI (default: the spec's, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."
ADDRESS_HELP = "Ray cluster address (default: $RAY_ADDRESS, else a local instance on 127.0.0.1)."

# The options every training command takes, declared once.
SetOption = Annotated[Optional[list[str]], typer.Option(  # noqa: UP045 (typer)
    "--set", help=SET_HELP, autocompletion=complete_set_keys)]
TrackingOption = Annotated[Optional[str], typer.Option("--tracking-uri", help=TRACKING_HELP)]  # noqa: UP045
# The commands that read a store take no spec: their default has no "spec's" step.
StoreOption = Annotated[Optional[str], typer.Option(  # noqa: UP045 (typer)
    "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")]
AddressOption = Annotated[Optional[str], typer.Option("--address", help=ADDRESS_HELP)]  # noqa: UP045
IN_PROCESS_HELP = ("Train in this process, one chunk of each seed in turn, without starting Ray: no start-up "
                   "wait, for work one process holds (no rollout workers, no data-parallel ranks).")
InProcessOption = Annotated[bool, typer.Option("--in-process", help=IN_PROCESS_HELP)]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
TensorBoardOption = Annotated[Optional[Path], typer.Option(  # noqa: UP045 (typer)
    "--tensorboard", metavar="DIR", help="Also write every seed run's metrics as TensorBoard event files, one "
    "directory per seed run under DIR (needs the tensorboard package).")]
FreshOption = Annotated[bool, typer.Option("--fresh", help="Start new runs even where a dead or interrupted "
                                           "invocation of the same spec left runs to continue.")]


@contextmanager
def bad_input_exits_2():
    try:
        yield
    except SpecError as exc:
        for problem in exc.problems:
            err_console.print(str(problem), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextmanager
def store_failures_exit_1():
    """A write to the MLflow store that failed while training (a full disk): one line, exit 1."""
    from labfleet.tracking.runs import TrackingWriteFailed

    try:
        yield
    except TrackingWriteFailed as exc:
        err_console.print(f"{exc}; the runs it could still reach were ended FAILED (labfleet reconcile ends the "
                          "rest once the store takes writes again)", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1) from None


def local_ray_on_loopback(address: str | None) -> None:
    """A local Ray instance listens on 127.0.0.1 only. On Linux Ray maps 127.0.0.1 to the machine's
    routable address unless this is set, and it is read when `ray` is first imported, so every training
    command calls this first. A driver joining a cluster (`--address`, $RAY_ADDRESS) keeps Ray's default."""
    if not address and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Token authentication is Ray 2.60's default; saying so keeps its "enabled by default" notice away.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # A SIGTERM from here on stops the command as Ctrl-C does, also while Ray starts (Python's default
    # would end this process at once and leave the local Ray processes it had started behind).
    import signal
    import threading

    from labfleet.orchestration.signals import raise_interrupt

    if threading.current_thread() is threading.main_thread():  # (a notebook's call from another thread)
        signal.signal(signal.SIGTERM, raise_interrupt)


def starting(file: Path, quiet: bool) -> Console:
    """The training commands' console, which says at once what is read: the imports and checks before
    anything starts take seconds (torch, MLflow)."""
    from labfleet.tracking.store_process import prestart

    console = Console()
    if not quiet:
        console.print(f"[dim]reading {shown(str(file))}[/dim]", highlight=False, soft_wrap=True)
    prestart()  # MLflow's store opens in a process of its own, beside this one's imports
    return console


def _overrides(items: list[str] | None) -> dict:
    from labfleet.spec.loading import parse_set_options

    return parse_set_options(items or [])


def static_checks(suite_uri: str | None, source: str, specs: list) -> None:
    """What `validate` checks beyond each spec's fields, without connecting anywhere: tracking URIs by their
    form, and every `sweep:` section (objective, storage URL, sampler, pruner, searched paths)."""
    from labfleet.orchestration.study import check_sweep
    from labfleet.tracking.uri import tracking_uri_form_problem

    problems: list[Problem] = []
    for uri, where, field in [(suite_uri, source, "tracking.uri")] + [(s.tracking.uri, src, "tracking.uri")
                                                                       for _, s, src in specs]:
        if uri and (reason := tracking_uri_form_problem(uri)):
            problems.append(Problem(where, field, reason))
    for data, spec, src in specs:
        if spec.sweep is not None:
            try:
                check_sweep(data, spec, src)
            except SpecError as exc:
                problems.extend(exc.problems)
    if problems:
        raise SpecError(problems)


def trainer_round_trips(specs: list) -> None:
    """Each Trainer subclass of the user's that the specs name makes one round trip through the contract
    (`labfleet.algorithms.roundtrip`: its own process, bounded in time); a class that fails it is refused."""
    from labfleet.algorithms import registry
    from labfleet.algorithms.custom import FunctionTrainer, is_import_path
    from labfleet.algorithms.roundtrip import round_trip_problem

    problems: list[Problem] = []
    seen: set[str] = set()
    for _, spec, src in specs:
        if not is_import_path(spec.algorithm) or spec.algorithm in seen:
            continue
        seen.add(spec.algorithm)
        spec_dir = str(Path(src).parent)
        if registry.get(spec.algorithm, spec_dir).trainer is FunctionTrainer:
            continue
        problem, note = round_trip_problem(spec, spec_dir)
        if problem:
            problems.append(Problem(src, "algorithm", f"{spec.algorithm}: {problem}"))
        if note:
            err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    if problems:
        raise SpecError(problems)


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="Spec or suite files.", autocompletion=complete_spec_files),
    set_: SetOption = None,
) -> None:
    """Check specs and suites; print one line per problem (FILE: field.path: what is wrong) and exit 2."""
    from labfleet.spec.loading import is_suite, load_suite, read_yaml, resolve_document

    problems: list[Problem] = []
    with bad_input_exits_2():
        overrides = _overrides(set_)
    for path in files:
        try:
            doc = read_yaml(path)
            if is_suite(doc.data):
                suite, entries = load_suite(path, overrides)
                checked = [(e.data, e.spec, str(e.spec_path)) for e in entries]
                static_checks(suite.tracking.uri, doc.source, checked)
                trainer_round_trips(checked)
                typer.echo(f"ok: {path} (suite {suite.name}: {len(entries)} experiments)")
            else:
                data, spec = resolve_document(doc, overrides)
                static_checks(None, doc.source, [(data, spec, doc.source)])
                trainer_round_trips([(data, spec, doc.source)])
                target = spec.env or spec.dataset or "its own data"
                seeds = f"{len(spec.seeds)} seed" + ("s" if len(spec.seeds) != 1 else "")
                typer.echo(f"ok: {path} ({spec.algorithm} on {target}, {seeds})")
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems:
        with bad_input_exits_2():
            raise SpecError(problems)


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Experiment spec (YAML).", autocompletion=complete_spec_files),
    set_: SetOption = None,
    tracking_uri: TrackingOption = None,
    address: AddressOption = None,
    in_process: InProcessOption = False,
    quiet: QuietOption = False,
    fresh: FreshOption = False,
    tensorboard: TensorBoardOption = None,
) -> None:
    """Train every seed of a spec as a trial on Ray, tracked in MLflow.

    The same command after a dead or interrupted driver continues its runs from their last checkpoints."""
    local_ray_on_loopback(address)
    console = starting(spec, quiet)
    from labfleet.orchestration.commands import execute
    from labfleet.orchestration.session import Planned
    from labfleet.spec.loading import load_spec

    with bad_input_exits_2(), store_failures_exit_1():
        resolved = load_spec(spec, _overrides(set_))
        code = execute([Planned(resolved, spec)], source=str(spec), cli_tracking_uri=tracking_uri,
                       address=address, console=console, quiet=quiet, fresh=fresh, tensorboard=tensorboard,
                       in_process=in_process).code
    raise typer.Exit(code)


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="Experiment spec with a `sweep:` section.",
                                autocompletion=complete_spec_files),
    set_: SetOption = None,
    n_trials: int = typer.Option(None, "--n-trials", min=1, help="Finished trials wanted (default: sweep.n_trials)."),
    storage: str = typer.Option(None, "--storage", help="Optuna storage URL (default: sweep.storage, else "
                                "sqlite:///optuna.db)."),
    tracking_uri: TrackingOption = None,
    address: AddressOption = None,
    in_process: InProcessOption = False,
    quiet: QuietOption = False,
    tensorboard: TensorBoardOption = None,
) -> None:
    """Search a spec's hyperparameters with Optuna; the same command again resumes the study."""
    local_ray_on_loopback(address)
    console = starting(spec, quiet)
    from labfleet.orchestration.commands import execute_sweep
    from labfleet.spec.loading import read_yaml, resolve_document

    with bad_input_exits_2(), store_failures_exit_1():
        data, resolved = resolve_document(read_yaml(spec), _overrides(set_))
        code = execute_sweep(data, resolved, spec, storage=storage, n_trials=n_trials, cli_tracking_uri=tracking_uri,
                             address=address, console=console, quiet=quiet, tensorboard=tensorboard,
                             in_process=in_process).code
    raise typer.Exit(code)


@app.command()
def suite(
    suite_file: Path = typer.Argument(..., metavar="SUITE", help="Suite file (YAML).",
                                      autocompletion=complete_spec_files),
    set_: SetOption = None,  # applied to every entry
    tracking_uri: TrackingOption = None,
    address: AddressOption = None,
    in_process: InProcessOption = False,
    quiet: QuietOption = False,
    fresh: FreshOption = False,
    tensorboard: TensorBoardOption = None,
) -> None:
    """Run every experiment of a suite under one `suite` run, sharing the cluster.

    The same command after an interruption skips what finished and continues the rest from their checkpoints."""
    local_ray_on_loopback(address)
    console = starting(suite_file, quiet)
    from labfleet.orchestration.commands import execute
    from labfleet.orchestration.session import Planned
    from labfleet.spec.loading import load_suite

    with bad_input_exits_2(), store_failures_exit_1():
        suite_spec, entries = load_suite(suite_file, _overrides(set_))
        planned = [Planned(e.spec, e.spec_path, e.data if e.entry.sweep else None) for e in entries]
        code = execute(planned, source=str(suite_file), cli_tracking_uri=tracking_uri, address=address,
                       console=console, quiet=quiet, suite=suite_spec, fresh=fresh, tensorboard=tensorboard,
                       in_process=in_process).code
    raise typer.Exit(code)


def _token_auth() -> None:
    """Ray 2.60 clusters require token authentication; Ray reads the mode when it is first imported."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")


JobsAddress = Annotated[Optional[str], typer.Option(  # noqa: UP045 (typer)
    "--address", help="Ray Jobs API of the cluster (default: $RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265).")]


def _submit_options_agree(slurm: bool, slurm_only: dict[str, Any], ray_only: dict[str, Any]) -> None:
    """Options of one backend given to the other are refused, not ignored."""
    from labfleet.errors import Problem, SpecError

    wrong = [name for name, given in (ray_only if slurm else slurm_only).items() if given]
    if wrong:
        where = "a SLURM submission (--slurm)" if slurm else "a Ray Jobs submission (without --slurm)"
        raise SpecError([Problem("labfleet submit", wrong[0], f"{', '.join(wrong)} cannot be used with {where}")])


@app.command()
def submit(
    file: Path = typer.Argument(..., metavar="SPEC_OR_SUITE", help="A spec or a suite file."),
    address: JobsAddress = None,
    set_: SetOption = None,
    tracking_uri: TrackingOption = None,
    wait: bool = typer.Option(False, "--wait", help="Follow the job's logs and exit with its result."),
    sweep: bool = typer.Option(False, "--sweep", help="Run the spec as `labfleet sweep` (default: `run`)."),
    n_trials: int = typer.Option(None, "--n-trials", min=1, help="With --sweep: finished trials wanted."),
    python: str = typer.Option("python", "--python", help="The interpreter with labfleet on the head node "
                               "(with --slurm: default this one, as nodes share the filesystem)."),
    ship_package: bool = typer.Option(False, "--ship-package", help="Send this labfleet package with the job "
                                      "(for a cluster that lacks it or has another version)."),
    slurm: bool = typer.Option(False, "--slurm", help="Submit to SLURM (the cluster $SLURM_CONF names) as a "
                               "requeueable batch job that starts its own Ray cluster; prints slurm:<jobid>."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="With --slurm: nodes, one Ray node each."),
    partition: Optional[str] = typer.Option(None, "--partition", help="With --slurm: the partition."),  # noqa: UP045
    time_limit: Optional[str] = typer.Option(None, "--time", help="With --slurm: the time limit (SLURM's form)."),  # noqa: UP045
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", min=0,  # noqa: UP045
                                                help="With --slurm: GPUs a node."),
    cpus_per_node: Optional[int] = typer.Option(None, "--cpus-per-node", min=1,  # noqa: UP045
                                                help="With --slurm: CPUs a node (default: whole nodes)."),
    account: Optional[str] = typer.Option(None, "--account", help="With --slurm: the account."),  # noqa: UP045
    qos: Optional[str] = typer.Option(None, "--qos", help="With --slurm: the QOS."),  # noqa: UP045
    sbatch_arg: Optional[list[str]] = typer.Option(None, "--sbatch-arg", metavar="ARG",  # noqa: UP045
                                                   help="With --slurm: one more sbatch option (--constraint=v100)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --slurm: print the batch script, submit nothing."),
) -> None:
    """Submit a spec or suite as a Ray Job, or with --slurm as a SLURM batch job; its driver runs on the cluster."""
    _token_auth()
    with bad_input_exits_2():
        _submit_options_agree(slurm, {"--nodes": nodes != 1, "--partition": partition, "--time": time_limit,
                                      "--gpus-per-node": gpus_per_node is not None, "--cpus-per-node": cpus_per_node,
                                      "--account": account, "--qos": qos, "--sbatch-arg": sbatch_arg,
                                      "--dry-run": dry_run}, {"--address": address, "--ship-package": ship_package})
        if slurm:
            from labfleet.orchestration.slurm import SlurmOptions
            from labfleet.orchestration.slurm import submit as submit_slurm

            options = SlurmOptions(nodes=nodes, partition=partition, time=time_limit, gpus_per_node=gpus_per_node,
                                   cpus_per_node=cpus_per_node, account=account, qos=qos,
                                   sbatch_args=sbatch_arg or [])
            code = submit_slurm(file, overrides=set_ or [], tracking_uri=tracking_uri, sweep=sweep,
                                python=None if python == "python" else python, options=options, dry_run=dry_run,
                                wait=wait, console=Console(), n_trials=n_trials)
        else:
            from labfleet.orchestration.jobs import submit as submit_job

            code = submit_job(file, address=address, overrides=set_ or [], tracking_uri=tracking_uri, sweep=sweep,
                              python=python, ship_package=ship_package, wait=wait, console=Console(),
                              n_trials=n_trials)
    raise typer.Exit(code)


@app.command()
def status(job: str = typer.Argument(..., metavar="JOB", help="A Ray job id, or slurm:<jobid>."),
           address: JobsAddress = None) -> None:
    """A submitted job's state."""
    _token_auth()
    with bad_input_exits_2():
        if job.startswith("slurm:"):
            from labfleet.orchestration import slurm as slurm_jobs

            raise typer.Exit(slurm_jobs.status(job, Console()))
        from labfleet.orchestration.jobs import status as job_status

        raise typer.Exit(job_status(job, address, Console()))


@app.command()
def logs(job: str = typer.Argument(..., metavar="JOB"), address: JobsAddress = None,
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends.")) -> None:
    """A submitted job's output (its driver's)."""
    _token_auth()
    with bad_input_exits_2():
        if job.startswith("slurm:"):
            from labfleet.orchestration import slurm as slurm_jobs

            raise typer.Exit(slurm_jobs.logs(job, follow, Console()))
        from labfleet.orchestration.jobs import logs as job_logs

        raise typer.Exit(job_logs(job, address, follow, Console()))


@app.command()
def stop(job: str = typer.Argument(..., metavar="JOB"), address: JobsAddress = None) -> None:
    """Cancel a submitted job: its driver stops like Ctrl-C, and its open runs end KILLED."""
    _token_auth()
    with bad_input_exits_2():
        if job.startswith("slurm:"):
            from labfleet.orchestration import slurm as slurm_jobs

            raise typer.Exit(slurm_jobs.stop(job, Console()))
        from labfleet.orchestration.jobs import stop as job_stop

        raise typer.Exit(job_stop(job, address, Console()))


@app.command("list")
def list_(what: str = typer.Argument(..., metavar="algorithms|envs|datasets", help="What to list.")) -> None:
    """List the registered algorithms, the gymnasium environments an RL spec can name, or the datasets
    a generative spec can name."""
    from rich.table import Table

    if what == "algorithms":
        from labfleet.algorithms import registry

        for name in registry.names():  # a list, not a table: a table's summary column is one word wide in 80
            info = registry.get(name)
            spaces = (f"actions {', '.join(info.action_spaces)}; observations {', '.join(info.observation_spaces)}"
                      if info.kind == "rl" else f"dataset; primary metric {info.primary_metric}")
            typer.echo(f"{name}  ({info.kind}, budget in {' or '.join(info.budget_units)})")
            typer.echo(_indented(info.summary))
            typer.echo(_indented(spaces))
    elif what == "datasets":
        from labfleet.data.datasets import DATASETS

        table = Table("dataset", "shape", "summary")
        for name, data in DATASETS.items():
            table.add_row(name, "x".join(map(str, data.shape)) or "from the file", data.summary)
        Console().print(table)
    elif what == "envs":
        from labfleet.spec.envcheck import env_availability

        envs = env_availability()
        for env_id, need in envs:
            if need is None:
                typer.echo(env_id)
        missing = [(env_id, need) for env_id, need in envs if need is not None]
        if missing:
            typer.echo("\nRegistered, but not available here:")
            for env_id, need in missing:
                typer.echo(f"  {env_id}: {need}")
        from labfleet.spec.envcheck import envpool_ids

        pooled = envpool_ids()
        if pooled:
            typer.echo("\nWith env_backend: envpool (EnvPool's own ids):")
            for env_id in pooled:
                typer.echo(f"  {env_id}")
    else:
        with bad_input_exits_2():
            raise SpecError([Problem("labfleet list", what, "expected algorithms, envs or datasets")])


def _indented(text: str) -> str:
    """`text` wrapped to the terminal's width, indented by four spaces."""
    import shutil
    import textwrap

    width = max(40, shutil.get_terminal_size((100, 24)).columns)
    return textwrap.fill(text, width=width, initial_indent="    ", subsequent_indent="    ")


data_app = typer.Typer(help="Datasets from local files.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("import")
def data_import(
    source: str = typer.Argument(..., help="fashion_mnist or mnist (their usual local places), or a path: a "
                                 "directory of IDX files, a folder of PNG/JPEG images in train/ and test/, or a .npz."),
    out: Path = typer.Option(..., "--out", help="The .npz file to write (x_train, y_train, x_test, y_test)."),
    size: tuple[int, int] = typer.Option((0, 0), "--size", help="Scale and centre-crop folder images to H W."),
) -> None:
    """Turn local image files into one .npz that `dataset: images` (or mnist / fashion_mnist) reads with
    `dataset_kwargs.path`: uint8 (n, H, W) or (n, H, W, C) arrays, labels where the files have them."""
    import os

    import numpy as np

    from labfleet.data import images

    with bad_input_exits_2():
        name, path = (source, None) if source in images.PACKAGES or source == "mnist" else ("images", source)
        if out.suffix != ".npz":
            raise SpecError([Problem("labfleet data import", "--out", f"{out}: the file must end in .npz")])
        if out.exists():
            raise SpecError([Problem("labfleet data import", "--out", f"{out} exists; name another file")])
        if not out.parent.is_dir():
            raise SpecError([Problem("labfleet data import", "--out", f"no directory {out.parent}")])
        try:
            arrays = images.read(name, path, size if size != (0, 0) else None)
        except (OSError, ValueError) as exc:
            raise SpecError([Problem("labfleet data import", "SOURCE", str(exc))]) from None
    stored = {k: (v[:, 0] if v.shape[1] == 1 else v.transpose(0, 2, 3, 1)) if k.startswith("x") else v
              for k, v in arrays.items()}
    partial = out.with_name(f".{out.name}.{os.getpid()}.part.npz")
    np.savez_compressed(partial, **stored)  # type: ignore[arg-type]  # (numpy types the keywords as its own)
    os.replace(partial, out)
    shape = "x".join(map(str, arrays["x_train"].shape[1:]))
    typer.echo(f"wrote {out}: {len(arrays['x_train'])} training and {len(arrays['x_test'])} test images of "
               f"{shape}{', with labels' if 'y_train' in arrays else ''}")


@app.command()
def show(
    algorithm: str = typer.Argument(..., help="A registered algorithm.", autocompletion=complete_algorithms),
    as_yaml: bool = typer.Option(False, "--yaml", help="Print a spec skeleton with every hyperparameter's "
                                 "default instead."),
) -> None:
    """Print an algorithm's hyperparameters: name, type, default and documentation, from its model."""
    from labfleet.algorithms import registry
    from labfleet.spec.schema import hparam_rows, spec_skeleton

    with bad_input_exits_2():
        try:
            info = registry.get(algorithm)
        except (KeyError, ImportError, TypeError) as exc:
            raise SpecError([Problem("labfleet show", "algorithm", str(exc.args[0]))]) from None
    if as_yaml:
        typer.echo(spec_skeleton(algorithm), nl=False)
        return
    typer.echo(f"{algorithm}: {info.summary}")
    for name, kind, default, description in hparam_rows(info.hparams):  # full names: they are typed into specs
        typer.echo(f"\n{name}: {kind} = {default}")
        if description:
            typer.echo(_indented(description))


@app.command()
def report(
    target: str = typer.Argument(..., help="A run id, the name of a suite or sweep run, or an experiment name."),
    out: Path = typer.Option(Path("report"), "--out", help="Directory for the PNGs, results.md and report.html."),
    metric: str = typer.Option(None, "--metric", help="Metric of the curves and the ranking (default: the "
                               "algorithm's primary metric)."),
    tracking_uri: StoreOption = None,
    storage: str = typer.Option(None, "--storage", help="Optuna storage of a sweep (default: the one its sweep "
                                "run recorded)."),
    log: bool = typer.Option(False, "--log", help="Also attach the report to the suite or sweep run (artifacts "
                             "report/); without it the report only reads the store."),
) -> None:
    """Learning curves with 95 % bands, a table of final metrics and, for a sweep, Optuna's figures."""
    from labfleet.tracking.uri import redact_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, None)
    with bad_input_exits_2():
        if out.exists() and not out.is_dir():
            raise SpecError([Problem("labfleet report", "--out", f"{out} is a file; the report needs a directory "
                                     "(it writes several files into it)")])
        if any(not ch.isprintable() for ch in target):
            raise SpecError([Problem("labfleet report", "TARGET", "holds control characters or line breaks")])
        _existing_store(uri, "report")
        from mlflow.tracking import MlflowClient

        from labfleet.reporting.report import build_report, terminal_table

        client = MlflowClient(uri)
        result = build_report(client, target, out, metric, storage, log=log)
    console = Console()
    warn_stale(client, console)
    console.print(f"[bold]{shown(result.title)}[/bold]")
    console.print(terminal_table(result.names, result.rows), highlight=False)
    console.print(f"Wrote {', '.join(p.name for p in result.files)} to {result.out}/", highlight=False)
    if result.logged_to:
        console.print(f"Logged as artifacts report/ of run {result.logged_to} in {redact_uri(uri)}", highlight=False)


def _existing_store(uri: str, command: str) -> None:
    """Refuse a tracking URI that is unusable, or a SQLite file that does not exist (reading must not
    create an empty store)."""
    from labfleet.tracking.uri import check_tracking_uri, sqlite_path

    problem = check_tracking_uri(uri)
    if problem:
        raise SpecError([Problem(f"labfleet {command}", "--tracking-uri", problem)])
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        raise SpecError([Problem(f"labfleet {command}", "--tracking-uri", f"no MLflow store at {path}")])


def warn_stale(client, console: Console) -> None:
    """One line when the store holds RUNNING runs whose driver is gone (see `labfleet reconcile`)."""
    from labfleet.tracking.heartbeat import stale_note

    note = stale_note(client)
    if note:
        console.print(f"[yellow]{shown(note)}[/yellow]", highlight=False)


@app.command()
def reconcile(
    tracking_uri: StoreOption = None,
    stale_after: float = typer.Option(150.0, "--stale-after", help="Seconds without a heartbeat after which a "
                                      "run whose driver runs on another machine counts as orphaned."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would change."),
) -> None:
    """End KILLED every RUNNING run whose driver is gone (dead here, or no heartbeat); live drivers' runs stay."""
    from mlflow.tracking import MlflowClient

    from labfleet.tracking.heartbeat import HEARTBEAT_SECONDS, stale_runs
    from labfleet.tracking.heartbeat import reconcile as end_stale
    from labfleet.tracking.uri import redact_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, None)
    with bad_input_exits_2():
        if not math.isfinite(stale_after) or stale_after < 2 * HEARTBEAT_SECONDS:
            # shorter than two heartbeats would end the runs of live drivers on other machines
            raise SpecError([Problem("labfleet reconcile", "--stale-after", f"expected seconds, at least "
                                     f"{2 * HEARTBEAT_SECONDS:g} (drivers renew their heartbeat every "
                                     f"{HEARTBEAT_SECONDS:g} s), got {stale_after}")])
        _existing_store(uri, "reconcile")
    client = MlflowClient(uri)
    changed = stale_runs(client, stale_after) if dry_run else end_stale(client, stale_after)
    for item in changed:
        tags = item.run.data.tags
        typer.echo(f"{item.run.info.run_id} {tags.get(tag.ROLE, '-')} {tags.get(tag.RUN_NAME, '')}: "
                   f"RUNNING -> KILLED ({item.reason})" + (" [dry run]" if dry_run else ""))
    verb = "would end" if dry_run else "ended"
    typer.echo(f"{redact_uri(uri)}: {verb} {len(changed)} run(s) KILLED" if changed else
               f"{redact_uri(uri)}: nothing to reconcile (every RUNNING run has a live driver)")


@app.command()
def enjoy(
    target: str = typer.Argument(..., metavar="RUN_OR_EXPERIMENT", help="A seed run id, a trial run id (its best "
                                 "seed), or an experiment (its latest finished trial's best seed)."),
    episodes: int = typer.Option(3, "--episodes", min=1, help="Episodes of the greedy policy."),
    video: bool = typer.Option(False, "--video", help="Record MP4s (gymnasium's RecordVideo; needs moviepy) and "
                               "log them to the run as videos/."),
    out: Path = typer.Option(Path("enjoy"), "--out", help="Where the videos or sample grids are written."),
    tracking_uri: StoreOption = None,
) -> None:
    """Watch a trained agent: its final policy's returns (and videos), or a generative model's samples."""
    from labfleet.tracking.uri import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, None)
    with bad_input_exits_2():
        _existing_store(uri, "enjoy")
        from labfleet.playback import load_run, play, sample_grid

        loaded = load_run(target, uri)
        trainer, run = loaded.trainer, loaded.run
        needed = "greedy_actions" if trainer.spec.env is not None else "sample_images"
        if not callable(getattr(trainer, needed, None)):
            what = "plays the greedy policy through greedy_actions(obs) -> actions" if trainer.spec.env else \
                "draws samples through sample_images() -> {name: PNG bytes}"
            raise SpecError([Problem("labfleet enjoy", "RUN_OR_EXPERIMENT", f"{trainer.spec.algorithm} has no "
                                     f"{needed}(); enjoy {what} (docs/your-own-code.md)")])
    name = run.data.tags.get(tag.RUN_NAME, run.info.run_id)
    if trainer.spec.env is None:  # a generative model: a grid of samples
        out.mkdir(parents=True, exist_ok=True)
        for image, data in sample_grid(trainer).items():
            (out / f"{image}.png").write_bytes(data)
            typer.echo(f"{name}: wrote {out / image}.png")
        return
    if video and trainer.spec.env_backend == "envpool":
        with bad_input_exits_2():
            raise SpecError([Problem("labfleet enjoy", "--video", "videos are rendered through gymnasium; this run "
                                     "stepped EnvPool's environments (env_backend: envpool)")])
    if video:
        import importlib.util

        if importlib.util.find_spec("moviepy") is None:
            with bad_input_exits_2():
                raise SpecError([Problem("labfleet enjoy", "--video", "recording needs moviepy: pip install "
                                         "'labfleet[video]'")])
    video_dir = out / run.info.run_id if video else None
    returns = play(trainer, episodes, video_dir)
    typer.echo(f"{name}: returns {', '.join(f'{r:.4g}' for r in returns)} (mean {sum(returns) / len(returns):.4g})")
    if video_dir is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        for mp4 in sorted(video_dir.glob("*.mp4")):
            client.log_artifact(run.info.run_id, str(mp4), "videos")
        typer.echo(f"videos: {video_dir}/ (and artifacts videos/ of run {run.info.run_id})")


@contextmanager
def environment_warnings_hidden():
    """Python warnings and what C libraries (MuJoCo's model compiler) print to the stderr file descriptor,
    hidden while an environment is made only to be checked."""
    import warnings

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@app.command("zoo-import")
def zoo_import(
    file: Path = typer.Argument(..., help="An rl-baselines3-zoo hyperparameter file (hyperparams/ALGO.yml)."),
    env_id: str = typer.Argument(..., metavar="ENV_ID", help="The entry to take, e.g. CartPole-v1."),
    algorithm: str = typer.Argument(..., metavar="ALGO", help="The labfleet algorithm, e.g. ppo."),
    out: Path = typer.Option(None, "--out", help="Spec file to write (default: print it)."),
) -> None:
    """Write a labfleet spec from an rl-zoo hyperparameter entry; what labfleet cannot take is named."""
    import yaml

    from labfleet.spec.loading import parse_yaml, resolve_spec_data
    from labfleet.spec.zoo import drop_rejected, render, zoo_entry

    with bad_input_exits_2():
        try:
            document = parse_yaml(file.read_text(encoding="utf-8"))[0]
            imported = zoo_entry(document, env_id, algorithm)
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
            raise SpecError([Problem(str(file), "", f"cannot read: {exc}")]) from None
        except (KeyError, ValueError, TypeError) as exc:
            raise SpecError([Problem(str(file), env_id, str(exc.args[0] if exc.args else exc))]) from None
        with environment_warnings_hidden():  # making the env to check it: gymnasium's and MuJoCo's notices
            try:
                resolve_spec_data(imported.spec, str(file))
            except SpecError as exc:  # leave out the hyperparameters labfleet refuses, then it must validate
                drop_rejected(imported, [(p.path, p.message) for p in exc.problems])
                resolve_spec_data(imported.spec, str(file))
    text = render(imported, f"{file} ({env_id})")
    for change in imported.changes:
        err_console.print(f"note: {change}", highlight=False, markup=False, soft_wrap=True)
    for note in imported.notes:
        err_console.print(f"left out: {note}", highlight=False, markup=False, soft_wrap=True)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}")


@app.command()
def ui(
    tracking_uri: StoreOption = None,
    port: int = typer.Option(5000, "--port", help="Port of the MLflow UI (127.0.0.1)."),
    storage: str = typer.Option(None, "--storage", help="An Optuna storage to open in optuna-dashboard too "
                                "(default: sqlite:///optuna.db when it exists)."),
    dashboard_port: int = typer.Option(8080, "--dashboard-port", help="Port of optuna-dashboard."),
    experiment: str = typer.Option(None, "--experiment", help="The experiment whose runs page to print "
                                   "(default: that of the latest run)."),
    browser: bool = typer.Option(True, "--browser/--no-browser", help="Open the runs page in a browser "
                                 "(where there is a display)."),
) -> None:
    """Serve the MLflow UI on 127.0.0.1 over the store the runs used (and optuna-dashboard when installed);
    print (and open) the runs page of the latest experiment."""
    from labfleet.reporting.ui import serve

    with bad_input_exits_2():
        code = serve(tracking_uri, port, storage, dashboard_port, Console(), experiment, browser)
    raise typer.Exit(code)


def _stop_ray(ray: Any) -> None:
    """`ray.shutdown()`, less the second it waits for the autoscaler's monitor of a local instance to end
    on SIGTERM (it keeps no state this command needs): that process is killed first."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    for info in (getattr(node, "all_processes", None) or {}).get("monitor", []):
        with contextlib.suppress(Exception):
            info.process.kill()
    ray.shutdown()


def _leave(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _can_leave_early() -> bool:
    """Nothing is left for the interpreter's own exit to do: no other thread still working (non-daemon
    threads would be joined), and no profiler or coverage tracer waiting for its exit hook."""
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    return not others and sys.getprofile() is None and sys.gettrace() is None


# What an option's value looks like in `-h`, in place of typer's type names (<str>, <list[str]>, <bool>)
METAVARS = {"set_": "KEY=VALUE", "tracking_uri": "URI", "storage": "URL", "address": "ADDRESS", "n_trials": "N",
            "out": "PATH", "metric": "NAME", "port": "PORT", "dashboard_port": "PORT", "episodes": "N",
            "stale_after": "SECONDS", "python": "PYTHON", "size": "H W", "experiment": "NAME"}


def tidy_metavars(command: Any) -> Any:
    """Every command's options and arguments named as the README writes them: no metavar on a flag, KEY=VALUE
    for --set, SPEC for an argument (typer 0.29 would show <bool>, <list[str]>, {spec})."""
    for sub in getattr(command, "commands", {}).values():
        tidy_metavars(sub)
    for param in getattr(command, "params", []):
        if param.metavar not in (None, (param.name or "").upper()):  # one of ours (typer's default: NAME)
            continue
        if param.param_type_name == "option":  # (typer 0.29 carries its own copy of click)
            param.metavar = "" if param.is_flag else METAVARS.get(param.name or "", (param.name or "").upper())
        else:
            param.metavar = (param.name or "").upper() + ("..." if param.nargs == -1 else "")
    return command


def _stop_store_process() -> None:
    store_process = sys.modules.get("labfleet.tracking.store_process")
    if store_process is not None:
        store_process.shutdown()  # its stores closed before this process leaves without its exit hooks


def main() -> None:
    try:
        tidy_metavars(typer.main.get_command(app))(prog_name="labfleet")
    except SystemExit as exc:
        signals = sys.modules.get("labfleet.orchestration.signals")
        if signals is not None and signals.TERMINATED.is_set():
            # After a SIGTERM the end states are already in the stores, and Ray's exit hook would wait a
            # minute on a dead cluster: leave at once. A SIGTERM to the process group reached the local Ray's
            # processes too; one sent to this process alone (`kill PID`, a service manager) did not, and
            # without this its raylet's agents would outlive it.
            from labfleet.processes import kill_tree

            _stop_store_process()
            kill_tree(os.getpid(), include_root=False)
            _leave(exc.code if isinstance(exc.code, int) else 1)
        code = 0 if exc.code is None else exc.code
        if isinstance(code, int) and _can_leave_early():
            # The command's stores are closed by now. Ray's exit hook sleeps 0.5 s before it stops the local
            # instance, and the interpreter then takes 1-2 s to tear down torch, Ray and MLflow, which
            # nothing needs: stop Ray here (its processes end with it) and leave (measured in
            # docs/benchmarks.md, "Start-up and the test suite").
            ray = sys.modules.get("ray")
            try:
                if ray is not None and ray.is_initialized():
                    _stop_ray(ray)
            except Exception:  # noqa: BLE001 - Ray's own exit hook, in the ordinary exit, tries again
                raise exc from None
            from labfleet.tracking.uri import close_engines

            _stop_store_process()
            close_engines()
            _leave(code)
        raise


if __name__ == "__main__":
    main()
