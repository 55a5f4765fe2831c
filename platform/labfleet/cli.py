"""The `labfleet` command line.

Exit codes: 0 success, 1 a trial failed, 2 bad input (nothing started, nothing written), 130 interrupted.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from labfleet.errors import Problem, SpecError

app = typer.Typer(
    name="labfleet", no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
    help="Train RL agents and generative models from YAML specs on Ray, tracked in MLflow.",
)
err_console = Console(stderr=True)

SET_HELP = "Override a spec field: dotted KEY, YAML VALUE (hparams.gamma=0.98, seeds=[3,4]). Repeatable."
TRACKING_HELP = "MLflow tracking URI (default: the spec's, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."
ADDRESS_HELP = "Ray cluster address (default: $RAY_ADDRESS, else a local instance on 127.0.0.1)."

# The options every training command takes, declared once.
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP)]  # noqa: UP045 (typer)
TrackingOption = Annotated[Optional[str], typer.Option("--tracking-uri", help=TRACKING_HELP)]  # noqa: UP045
AddressOption = Annotated[Optional[str], typer.Option("--address", help=ADDRESS_HELP)]  # noqa: UP045
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]


@contextmanager
def bad_input_exits_2():
    try:
        yield
    except SpecError as exc:
        for problem in exc.problems:
            err_console.print(str(problem), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(2) from None


def local_ray_on_loopback(address: str | None) -> None:
    """A local Ray instance listens on 127.0.0.1 only. On Linux Ray maps 127.0.0.1 to the machine's
    routable address unless this is set, and it is read when `ray` is first imported, so every training
    command calls this first. A driver joining a cluster (`--address`, $RAY_ADDRESS) keeps Ray's default."""
    if not address and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _overrides(items: list[str] | None) -> dict:
    from labfleet.spec.loading import parse_set_options

    return parse_set_options(items or [])


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="Spec or suite files."),
    set_: SetOption = None,
) -> None:
    """Check specs and suites; print one line per problem (FILE: field.path: what is wrong) and exit 2."""
    from labfleet.spec.loading import apply_overrides, is_suite, load_suite, read_yaml, resolve_spec_data

    problems: list[Problem] = []
    with bad_input_exits_2():
        overrides = _overrides(set_)
    for path in files:
        try:
            doc = read_yaml(path)
            if is_suite(doc.data):
                suite, entries = load_suite(path, overrides)
                typer.echo(f"ok: {path} (suite {suite.name}: {len(entries)} experiments)")
            else:
                spec = resolve_spec_data(apply_overrides(doc.data, overrides), doc.source, doc)
                target = spec.env or spec.dataset
                seeds = f"{len(spec.seeds)} seed" + ("s" if len(spec.seeds) != 1 else "")
                typer.echo(f"ok: {path} ({spec.algorithm} on {target}, {seeds})")
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems:
        with bad_input_exits_2():
            raise SpecError(problems)


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Experiment spec (YAML)."),
    set_: SetOption = None,
    tracking_uri: TrackingOption = None,
    address: AddressOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train every seed of a spec as a trial on Ray, tracked in MLflow."""
    local_ray_on_loopback(address)
    from labfleet.orchestration.session import Planned, execute
    from labfleet.spec.loading import load_spec

    with bad_input_exits_2():
        resolved = load_spec(spec, _overrides(set_))
        code = execute([Planned(resolved, spec)], source=str(spec), cli_tracking_uri=tracking_uri,
                       address=address, console=Console(), quiet=quiet)
    raise typer.Exit(code)


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="Experiment spec with a `sweep:` section."),
    set_: SetOption = None,
    n_trials: int = typer.Option(None, "--n-trials", min=1, help="Finished trials wanted (default: sweep.n_trials)."),
    storage: str = typer.Option(None, "--storage", help="Optuna storage URL (default: sweep.storage, else "
                                "sqlite:///optuna.db)."),
    tracking_uri: TrackingOption = None,
    address: AddressOption = None,
    quiet: QuietOption = False,
) -> None:
    """Search a spec's hyperparameters with Optuna; the same command again resumes the study."""
    local_ray_on_loopback(address)
    from labfleet.orchestration.sweep import execute_sweep
    from labfleet.spec.loading import apply_overrides, read_yaml, resolve_spec_data

    with bad_input_exits_2():
        doc = read_yaml(spec)
        data = apply_overrides(doc.data, _overrides(set_))
        resolved = resolve_spec_data(data, doc.source, doc)
        code = execute_sweep(data, resolved, spec, storage=storage, n_trials=n_trials, cli_tracking_uri=tracking_uri,
                             address=address, console=Console(), quiet=quiet)
    raise typer.Exit(code)


@app.command()
def suite(
    suite_file: Path = typer.Argument(..., metavar="SUITE", help="Suite file (YAML)."),
    set_: SetOption = None,  # applied to every entry
    tracking_uri: TrackingOption = None,
    address: AddressOption = None,
    quiet: QuietOption = False,
) -> None:
    """Run every experiment of a suite under one `suite` run, sharing the cluster."""
    local_ray_on_loopback(address)
    from labfleet.orchestration.session import Planned, execute
    from labfleet.spec.loading import load_suite

    with bad_input_exits_2():
        suite_spec, entries = load_suite(suite_file, _overrides(set_))
        planned = [Planned(e.spec, e.spec_path) for e in entries]
        code = execute(planned, source=str(suite_file), cli_tracking_uri=tracking_uri, address=address,
                       console=Console(), quiet=quiet, suite=suite_spec)
    raise typer.Exit(code)


@app.command("list")
def list_(what: str = typer.Argument(..., metavar="algorithms|envs", help="What to list.")) -> None:
    """List the registered algorithms, or the gymnasium environments an RL spec can name."""
    from rich.table import Table

    if what == "algorithms":
        from labfleet.algorithms import registry

        table = Table("algorithm", "actions", "observations", "budget", "summary")
        for name in registry.names():
            info = registry.get(name)
            table.add_row(name, ", ".join(info.action_spaces), ", ".join(info.observation_spaces),
                          ", ".join(info.budget_units), info.summary)
        Console().print(table)
    elif what == "envs":
        import gymnasium as gym

        for env_id in sorted(gym.registry):
            typer.echo(env_id)
    else:
        with bad_input_exits_2():
            raise SpecError([Problem("labfleet list", what, "expected algorithms or envs")])


@app.command()
def show(algorithm: str = typer.Argument(..., help="A registered algorithm.")) -> None:
    """Print an algorithm's hyperparameters: name, type, default and documentation, from its model."""
    from rich.table import Table

    from labfleet.algorithms import registry
    from labfleet.spec.schema import hparam_rows

    with bad_input_exits_2():
        try:
            info = registry.get(algorithm)
        except KeyError as exc:
            raise SpecError([Problem("labfleet show", "algorithm", str(exc.args[0]))]) from None
    table = Table("hparam", "type", "default", "description", title=f"{algorithm}: {info.summary}")
    for row in hparam_rows(info.hparams):
        table.add_row(*row)
    Console().print(table)


def main() -> None:
    app(prog_name="labfleet")


if __name__ == "__main__":
    main()
