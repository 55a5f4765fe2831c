"""Every MLflow search filter labfleet uses, in one place (the driver's recorder and the reports read the
run hierarchy through these; a different tracking backend would translate them here)."""

from __future__ import annotations

ROLE_TAG = "labfleet.role"
PARENT_TAG = "mlflow.parentRunId"
LABEL_TAG = "labfleet.label"  # a trial run's configuration label (its run name may add " #N" on reruns)


def _quote(value: str) -> str:
    """`value` as a quoted string of MLflow's filter syntax, which has no escapes: single quotes, or double
    quotes around a value that holds a single one. A value with both cannot be searched for (ValueError)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both kinds of quote, which MLflow's search cannot match")


def role(name: str) -> str:
    return f"tags.`{ROLE_TAG}` = {_quote(name)}"


def children(parent_run_id: str, *, running: bool = False) -> str:
    query = f"tags.`{PARENT_TAG}` = {_quote(parent_run_id)}"
    return query + " and attributes.status = 'RUNNING'" if running else query


def trials_of_label(label: str, config_hash: str | None = None) -> str:
    query = f"{role('trial')} and tags.`{LABEL_TAG}` = {_quote(label)}"
    if config_hash is not None:
        query += f" and tags.`labfleet.config_hash` = {_quote(config_hash)}"
    return query


def suite_runs(name: str) -> str:
    return f"{role('suite')} and tags.`labfleet.suite` = {_quote(name)}"


def sweep_runs(study_name: str, storage: str) -> str:
    return (f"{role('sweep')} and tags.`optuna.study_name` = {_quote(study_name)} "
            f"and tags.`optuna.storage` = {_quote(storage)}")


def running() -> str:
    return "attributes.status = 'RUNNING'"


def named(name: str) -> str:
    return f"tags.`mlflow.runName` = {_quote(name)}"
