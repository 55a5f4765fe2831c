"""New SQLite MLflow stores from a migrated template, instead of MLflow's migrations.

MLflow makes a new SQLite store by running every schema migration since its first release: about 2 s of
CPU, on every command that starts with a fresh `mlflow.db` (and in each test that makes one). The result is
the same file each time, up to the default experiment, whose artifact location names the directory MLflow
was started in. So the first store this MLflow version makes is kept, without that experiment, as a
template in labfleet's cache directory, and later new stores are copies of it: MLflow then finds its whole
schema at the version it writes, migrates nothing, and adds the default experiment as it does to any store
that lacks one.

The cache is `$LABFLEET_CACHE_DIR`, else `$XDG_CACHE_HOME/labfleet`, else `~/.cache/labfleet`, one file per
MLflow version (`mlflow-store-<version>.db`). A cache that cannot be written costs only the time: the store
is then made by MLflow as before. A store is put in place with `os.link`, which never replaces a file, so a
second process making the same store at the same moment finds it whole or makes its own in its place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///PATH` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def cache_dir() -> Path:
    if os.environ.get("LABFLEET_CACHE_DIR"):
        return Path(os.environ["LABFLEET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "labfleet"


def template_path() -> Path:
    from importlib.metadata import version

    return cache_dir() / f"mlflow-store-{version('mlflow')}.db"


def _make_template(path: Path) -> None:
    """MLflow's own new store, less its default experiment, as one self-contained file at `path`."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".template-") as work:
        db = Path(work) / "store.db"
        store = SqlAlchemyStore(f"sqlite:///{db}", str(Path(work) / "artifacts"))
        store.engine.dispose()
        with contextlib.closing(sqlite3.connect(str(db), isolation_level=None)) as con:
            # The default experiment is the one row a new store holds; MLflow adds it again on opening.
            con.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
            con.execute("DELETE FROM experiments WHERE experiment_id = 0")
            con.execute("PRAGMA journal_mode=DELETE")  # one file, whatever journal the store used
        os.replace(db, path)


def schema_revision() -> str | None:
    """The schema revision this MLflow writes, read from the template (None where there is none yet): the
    driver checks an existing store against it without importing MLflow."""
    path = template_path()
    if not _usable(path):
        return None
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
        rows = con.execute("SELECT version_num FROM alembic_version").fetchall()
    return rows[0][0] if rows else None


def _usable(path: Path) -> bool:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return "alembic_version" in tables and con.execute("SELECT COUNT(*) FROM experiments").fetchone()[0] == 0
    except sqlite3.DatabaseError:
        return False


def seed_store(uri: str) -> bool:
    """Put a copy of the template where `uri` (sqlite:///PATH) names a store that does not exist yet (or an
    empty file); True if it did. Anything else, or any failure, leaves the store to MLflow."""
    path = sqlite_path(uri)
    if path is None or (path.exists() and path.stat().st_size > 0):
        return False
    try:
        template = template_path()
        if not _usable(template):
            _make_template(template)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new")
        try:
            with os.fdopen(fd, "wb") as out, open(template, "rb") as src:
                shutil.copyfileobj(src, out)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as a file SQLite creates (mkstemp's are the owner's alone)
            if path.exists():  # an empty file: replaced only if still empty
                if path.stat().st_size == 0:
                    os.replace(tmp, path)
                    return True
                return False
            os.link(tmp, path)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except Exception:  # noqa: BLE001 - whatever went wrong, MLflow makes the store as it always did
        return False
