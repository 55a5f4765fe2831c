"""Optuna storages named by URL: SQLAlchemy URLs (SQLite, PostgreSQL, ...) and journal files. Shared by
the driver (which creates and resumes studies) and the reports (which read them)."""

from __future__ import annotations

from pathlib import Path

import optuna

DEFAULT_STORAGE = "sqlite:///optuna.db"
JOURNAL_PREFIX = "journal:"


def journal_path(url: str) -> str | None:
    """The file of an Optuna journal storage: `journal:PATH`, or a plain path ending in .log / .jsonl."""
    if url.startswith(JOURNAL_PREFIX):
        return url[len(JOURNAL_PREFIX):].removeprefix("//")
    if "://" not in url and url.endswith((".log", ".jsonl")):
        return url
    return None


def storage_problem(url: str) -> str | None:
    """Why `url` cannot name an Optuna storage (checked without connecting or writing anything)."""
    path = journal_path(url)
    if path is not None:
        parent = Path(path).expanduser().resolve().parent
        return None if parent.is_dir() else f"the journal file's directory {parent} does not exist"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        return (f"not a storage URL ({exc}); use a SQLAlchemy URL such as sqlite:///optuna.db or "
                f"postgresql://user@host/db, or journal:PATH for an Optuna journal file")
    from labfleet.tracking.uri import database_driver_problem

    if (problem := database_driver_problem(url)) is not None:
        return problem
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        parent = Path(parsed.database).expanduser().resolve().parent
        if not parent.is_dir():
            return f"the SQLite file's directory {parent} does not exist"
    return None


def build_storage(url: str) -> str | optuna.storages.BaseStorage:
    path = journal_path(url)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(Path(path).expanduser())))
    from labfleet.tracking.uri import sqlite_wal

    sqlite_wal()  # a SQLite study in write-ahead-log mode, as MLflow's store (tracking/uri.py)
    return url


def load_study_read_only(study_name: str, url: str) -> optuna.Study:
    """A study opened for reading only (`labfleet report`): a SQLite or journal file that does not exist
    is not created (FileNotFoundError), a SQLite file is opened read-only, and no storage gets tables made
    or migrated. The URL may come from a run's tag, which whoever writes the store decides."""
    path = journal_path(url)
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"no journal file {file}")
        from optuna.storages.journal import JournalFileBackend

        return optuna.load_study(study_name=study_name,
                                 storage=optuna.storages.JournalStorage(JournalFileBackend(str(file))))
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        file = Path(parsed.database or "").expanduser()
        if not parsed.database or not file.is_file():
            raise FileNotFoundError(f"no SQLite file {file}")
        url = f"sqlite:///file:{file.resolve()}?mode=ro&uri=true"
    storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)
    return optuna.load_study(study_name=study_name, storage=storage)


def storage_open_problem(url: str) -> str | None:
    """Why the storage cannot be opened for writing now (a SQLite file that is garbage, damaged, half-made,
    read-only or locked by another process), found before anything starts; None otherwise or for servers."""
    from sqlalchemy.engine import make_url

    from labfleet.tracking.uri import sqlite_file_problem

    if journal_path(url) is not None:
        return None
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return sqlite_file_problem(Path(parsed.database).expanduser(), "studies", "Optuna storage")
