"""Tracking URIs: precedence, credential redaction, a reachability check before anything starts."""

from __future__ import annotations

import contextlib
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from labfleet.tracking.template import schema_revision, sqlite_path

T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(cli: str | None, spec: str | None) -> str:
    """--tracking-uri > the spec's tracking.uri > $MLFLOW_TRACKING_URI > sqlite:///mlflow.db."""
    return cli or spec or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "key", "credential", "sslpassword")


def redact_uri(uri: str) -> str:
    """The URI with any password replaced by ***, in its user part and in query parameters that carry one
    (`?password=...`, `token=...`), safe to log as a tag or print. A URI that does not parse is withheld
    whole rather than shown in part."""
    try:
        parts = urlsplit(uri)
        password, port = parts.password, parts.port
    except ValueError:  # a broken port or host: the user part may still hold a password
        return "<unparsable URI withheld>" if "@" in uri else uri
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(_secret_key(k) for k, _ in pairs):
        query = urlencode([(k, "***" if _secret_key(k) else v) for k, v in pairs], safe="*")
    if password is None:
        return uri if query == parts.query else urlunsplit(parts._replace(query=query))
    host = parts.hostname or ""
    if port:
        host = f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}", query=query))


_USERINFO_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s]*@")
_QUERY_SECRET = re.compile(
    r"([?&;](?:[A-Za-z0-9_.-]*(?:" + "|".join(SECRET_QUERY_KEYS) + r")[A-Za-z0-9_.-]*)=)[^&;\s]*", re.IGNORECASE)


def redact_credentials(text: str) -> str:
    """Any text (a param's value, a --set item) with the passwords of the URLs in it replaced by ***."""
    return _QUERY_SECRET.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1***@", text))


def redact_text(text: str, uri: str) -> str:
    """`text` (an error message, say) with the password of `uri`, if it has one, replaced by ***."""
    try:
        password = urlsplit(uri).password
    except ValueError:
        password = uri.rpartition("@")[0].partition("://")[2].partition(":")[2] or None
    for secret in {password, *(v for k, v in _query_pairs(uri) if _secret_key(k))} - {None, ""}:
        text = text.replace(str(secret), "***")
    return text


def _secret_key(key: str) -> bool:
    return any(word in key.lower() for word in SECRET_QUERY_KEYS)


def _query_pairs(uri: str) -> list[tuple[str, str]]:
    try:
        return parse_qsl(urlsplit(uri).query, keep_blank_values=True)
    except ValueError:
        return []


def artifact_root_for(uri: str) -> str | None:
    """Where a local store keeps artifacts: `mlartifacts/` beside the SQLite file, so that a run writes
    nothing outside its tracking location. None for servers (their artifact proxy decides)."""
    path = sqlite_path(uri)
    if path is not None:
        return (path.parent.resolve() / "mlartifacts").as_uri()
    return None


SERVER_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


def tracking_uri_form_problem(uri: str) -> str | None:
    """Why `uri` cannot be a tracking URI by its form alone (no I/O), or None."""
    if any(not ch.isprintable() for ch in uri):
        return "the URI holds control characters or line breaks"
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:  # its message may quote part of a password: not shown
        return (f"{redact_uri(uri)} does not parse as a URI: a port is a number up to 65535, an IPv6 host is "
                "written [ADDRESS], and a password with '/', '@' or ':' in it must be percent-encoded (%2F, %40, "
                "%3A), or better given through the environment")
    scheme = parts.scheme
    if scheme == "sqlite":
        if sqlite_path(uri) is None:
            return f"only file-based SQLite URIs (sqlite:///PATH) are supported, got {redact_uri(uri)}"
        return None
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        return (f"{redact_uri(uri)} names a directory store, which MLflow no longer writes; use "
                f"sqlite:///PATH/mlflow.db (a file), http(s)://HOST:PORT (a tracking server) or postgresql://...")
    if scheme in SERVER_SCHEMES or scheme in ("", "file") or scheme.split("+")[0] in DATABASE_SCHEMES:
        return None
    return (f"unsupported tracking URI scheme {scheme!r} in {redact_uri(uri)}; use sqlite:///PATH, "
            f"http(s)://HOST:PORT (a tracking server), postgresql://... or mysql://...")


def check_tracking_uri(uri: str, timeout: float = 5.0) -> str | None:
    """A sentence saying why the tracking store cannot be used, or None."""
    problem = tracking_uri_form_problem(uri)
    if problem:
        return problem
    scheme = urlsplit(uri).scheme
    if scheme == "sqlite":
        path = sqlite_path(uri)
        assert path is not None
        if not path.parent.resolve().is_dir():
            return f"the directory of the SQLite file does not exist: {path.parent.resolve()}"
        return (sqlite_file_problem(path, "alembic_version", "MLflow store")
                or unless_being_made(path, lambda: mlflow_schema_problem(path)))
    if scheme in SERVER_SCHEMES:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status == 200:
                    return None
                return f"tracking server {redact_uri(uri)} answered HTTP {response.status} on /health"
        except (urllib.error.URLError, OSError) as exc:
            return f"tracking server {redact_uri(uri)} is unreachable: {getattr(exc, 'reason', exc)}"
    return database_driver_problem(uri)  # else MLflow connects on first use, before any trial starts


def database_driver_problem(uri: str) -> str | None:
    """Why a database URI's Python driver cannot be imported (mysql:// without MySQLdb, say), or None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        return f"{redact_uri(uri)} is not a database URL SQLAlchemy knows: {exc}"
    except ImportError as exc:
        return (f"{redact_uri(uri)} needs the Python module {exc.name or exc}, which is not installed: install "
                "it, or name an installed driver in the scheme (postgresql+psycopg2://, mysql+pymysql://)")
    return None


def sqlite_file_problem(path: Path, marker_table: str, what: str, lock_wait_s: float = 5.0) -> str | None:
    """Why a SQLite file cannot hold a store, found in milliseconds, or None: a file that is not SQLite
    (garbage), is shorter than its header says (truncated), cannot be read (damaged), was left half-created
    (tables, but not `marker_table`, which the last migration step writes), cannot be written (a read-only
    file system), or stays locked by another process for `lock_wait_s`. A file that does not exist yet is
    fine where its directory is writable. MLflow itself retries such a store for minutes."""
    import sqlite3

    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            return f"cannot create the {what} {path}: its directory is not writable"
        return None
    if not path.is_file():
        return f"{path} is not a file"
    if path.stat().st_size == 0:
        return None  # an empty file: SQLite makes a database of it
    if (problem := _sqlite_header_problem(path, what, lock_wait_s)) is not None:
        return problem
    if (problem := _half_made_problem(path, marker_table, what, lock_wait_s)) is not None:
        return problem
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
        return f"cannot write the {what} {path}: the file or its directory is read-only"
    try:
        with contextlib.closing(sqlite3.connect(str(path), timeout=lock_wait_s, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            return f"the {what} {path} stayed locked by another process for {lock_wait_s:g} s"
        return f"cannot write the {what} {path}: {exc}"
    return None


def _half_made_problem(path: Path, marker_table: str, what: str, lock_wait_s: float) -> str | None:
    """Why the file's tables are not a whole store (tables, but not `marker_table`, which the last migration
    step writes), once no other process is still making it; or why they cannot be read."""
    tables = _tables(path, what, lock_wait_s)
    if isinstance(tables, str):
        return tables
    if not tables or marker_table in tables:
        return None

    def half_made() -> str | None:
        now = _tables(path, what, lock_wait_s)
        if isinstance(now, str) or not now or marker_table in now:
            return None  # being written, or finished, in the meantime
        return (f"{path} holds tables but is not a whole {what} (was it created on a full disk, or by "
                "another program?); move it away, or name another file")

    return unless_being_made(path, half_made)


def _tables(path: Path, what: str, lock_wait_s: float) -> set[str] | str:
    """The names of a SQLite file's tables, or why they cannot be read."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=lock_wait_s)) as db:
            return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc):
            return f"the {what} {path} stayed locked by another process for {lock_wait_s:g} s"
        return f"{path} cannot be read as the {what}: {exc}"


def _sqlite_header_problem(path: Path, what: str, lock_wait_s: float) -> str | None:
    """Whether the file is SQLite, and as long as the size its header declares (sqlite.org/fileformat2), read
    through SQLite itself. Never with a plain `open()`: closing any descriptor of a database file drops every
    POSIX lock this process holds on it (sqlite.org/howtocorrupt.html, 2.2), and an MLflow or Optuna
    connection this process keeps to the same store (a notebook's, the Python API's reports) would then read
    a write-ahead log that another process has already checkpointed and removed."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=lock_wait_s)) as db:
            page_size, = db.execute("PRAGMA page_size").fetchone()
            pages, = db.execute("PRAGMA page_count").fetchone()
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            return f"{path} is not a SQLite database (the {what} was expected there)"
        if "locked" in str(exc):
            return f"the {what} {path} stayed locked by another process for {lock_wait_s:g} s"
        if "malformed" in str(exc):
            return f"{path} is damaged (truncated?): SQLite reads the {what} as malformed"
        return f"{path} cannot be read as the {what}: {exc}"
    wal = path.with_name(path.name + "-wal")  # a checkpoint cut short is finished from the log: not damage
    if pages and path.stat().st_size < pages * page_size and not (wal.exists() and wal.stat().st_size > 0):
        return f"{path} is damaged: it is shorter than its header says (truncated?)"
    return None


def _file_stamp(path: Path) -> tuple[int, ...]:
    """Sizes and modification times of a SQLite file and its write-ahead log and journal."""
    stamp: list[int] = []
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-journal")):
        with contextlib.suppress(OSError):
            info = file.stat()
            stamp += [info.st_size, info.st_mtime_ns]
    return tuple(stamp)


def unless_being_made(path: Path, probe: Callable[[], str | None], quiet_s: float = 3.0,
                      most_s: float = 60.0) -> str | None:
    """`probe()`'s problem with the SQLite file at `path`, once the file has been left alone for `quiet_s`.
    Another process that is creating or migrating the store right now (a `labfleet ui`, a second driver, a
    notebook's MlflowClient) shows it half-made for a moment; a half-made store a full disk left, or one of
    another version, stays the same. At most `most_s` is spent waiting; a store with no problem costs one probe."""
    problem = probe()
    if problem is None:
        return None
    deadline = time.monotonic() + most_s
    seen, since = (problem, _file_stamp(path)), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.2)
        problem = probe()
        if problem is None:
            return None
        if (now := (problem, _file_stamp(path))) != seen:
            seen, since = now, time.monotonic()
    return problem


def mlflow_schema_problem(path: Path) -> str | None:
    """Why an existing SQLite MLflow store's schema is not the one this MLflow writes (left half-migrated
    on a full disk, or made by another MLflow version), or None."""
    import sqlite3

    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        head = schema_revision()
        if head is None:  # no template yet: MLflow says
            from mlflow.store.db.utils import _get_latest_schema_revision

            head = _get_latest_schema_revision()
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            rows = db.execute("SELECT version_num FROM alembic_version").fetchall()
    except (ImportError, sqlite3.DatabaseError):  # no such table (an empty store) or MLflow moved its helper
        return None
    found = rows[0][0] if rows else None
    if found == head:
        return None
    return (f"the MLflow store {path} has schema {found}, this MLflow writes {head}: it was left half-made (a full "
            f"disk?) or made by another MLflow version; back it up, then run `mlflow db upgrade sqlite:///{path}`")


_WAL_ON = False


def sqlite_wal() -> None:
    """SQLite stores (MLflow's and Optuna's) in this process use write-ahead logging with
    `synchronous=NORMAL`: a commit no longer rewrites a rollback journal, which makes each of the
    driver's many small writes about a third cheaper, and readers (`mlflow ui`, `optuna-dashboard`)
    never block the writer. WAL is a property of the database file, so later readers see it too;
    it needs a local filesystem (never put a SQLite store on NFS anyway)."""
    global _WAL_ON
    if _WAL_ON:
        return
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _pragmas(dbapi_connection: object, record: object) -> None:
        if isinstance(dbapi_connection, sqlite3.Connection):
            cursor = dbapi_connection.cursor()
            try:
                # Switching a store made without WAL needs a moment alone with the file: another of this
                # process's connections may hold a write lock then, and SQLite answers "locked" at once.
                # The switch is the file's, made once; until one connection makes it, the others go without.
                deadline = time.monotonic() + 5.0
                while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    try:
                        cursor.execute("PRAGMA journal_mode=WAL")
                    except sqlite3.OperationalError as exc:
                        if "locked" not in str(exc):
                            raise
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.02)
                cursor.execute("PRAGMA synchronous=NORMAL")
            finally:
                cursor.close()

    _WAL_ON = True


def close_engines() -> None:
    """Close this process's SQLAlchemy engines (MLflow's and Optuna's stores). Closing a SQLite store's last
    connection folds its write-ahead log back into the database file: the interpreter's own exit does
    that, `os._exit` does not (it would leave mlflow.db-wal beside mlflow.db), and a copy of the file alone
    needs it."""
    import sys

    sqlalchemy = sys.modules.get("sqlalchemy")
    if sqlalchemy is None:
        return
    import gc

    # type(o), not isinstance(o, ...): isinstance falls back to o.__class__, and some of torch's module-level
    # objects warn when that is read (a FutureWarning for torch.distributed.reduce_op at every command's end)
    engine_type = sqlalchemy.engine.Engine
    for engine in [o for o in gc.get_objects() if issubclass(type(o), engine_type)]:
        try:
            engine.dispose()
        except Exception:  # noqa: BLE001 - a store that cannot close now is left to the operating system
            continue


LOCK_PATIENCE_S = 120.0  # a loaded machine can starve the other writer's commit for many seconds


def retry_if_locked(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args, **kwargs)`, again after a pause while SQLite says "database is locked".

    Two writers share a SQLite store (the driver creates runs, the tracker's writer thread logs to them
    over another connection; or two commands run at once). A transaction that read before it writes
    cannot take the lock once the other writer has committed since its read began, and SQLite fails it
    at once instead of waiting; the transaction was rolled back, so running it again is safe."""
    deadline, attempt = time.monotonic() + LOCK_PATIENCE_S, 0
    while time.monotonic() < deadline:
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # MLflow wraps SQLAlchemy's OperationalError in MlflowException
            if "database is locked" not in str(exc):
                raise
            time.sleep(min(0.01 * 2 ** attempt, 0.5))
            attempt += 1
    return call(*args, **kwargs)  # the last try: its error, whatever it is, is the caller's
