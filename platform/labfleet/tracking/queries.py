"""Every MLflow search filter labfleet uses, in one place (the driver's recorder and the reports read the
run hierarchy through these; a different tracking backend would translate them here)."""

from __future__ import annotations

import labfleet.tracking.tags as tag


def _quote(value: str) -> str:
    """`value` as a quoted string of MLflow's filter syntax, which has no escapes: single quotes, or double
    quotes around a value that holds a single one. A value with both cannot be searched for (ValueError)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both kinds of quote, which MLflow's search cannot match")


def role(name: str) -> str:
    return f"tags.`{tag.ROLE}` = {_quote(name)}"


def children(parent_run_id: str, *, running: bool = False) -> str:
    query = f"tags.`{tag.PARENT}` = {_quote(parent_run_id)}"
    return query + " and attributes.status = 'RUNNING'" if running else query


def trials_of_label(label: str, config_hash: str | None = None) -> str:
    query = f"{role('trial')} and tags.`{tag.LABEL}` = {_quote(label)}"
    if config_hash is not None:
        query += f" and tags.`{tag.CONFIG_HASH}` = {_quote(config_hash)}"
    return query


def suite_runs(name: str) -> str:
    return f"{role('suite')} and tags.`{tag.SUITE}` = {_quote(name)}"


def sweep_runs(study_name: str, storage: str) -> str:
    return (f"{role('sweep')} and tags.`{tag.STUDY_NAME}` = {_quote(study_name)} "
            f"and tags.`{tag.STORAGE}` = {_quote(storage)}")


def running() -> str:
    return "attributes.status = 'RUNNING'"


def named(name: str) -> str:
    return f"tags.`{tag.RUN_NAME}` = {_quote(name)}"
