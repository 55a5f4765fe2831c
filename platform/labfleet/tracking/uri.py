"""Tracking URIs: precedence, credential redaction, a reachability check before anything starts."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(cli: str | None, spec: str | None) -> str:
    """--tracking-uri > the spec's tracking.uri > $MLFLOW_TRACKING_URI > sqlite:///mlflow.db."""
    return cli or spec or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def redact_uri(uri: str) -> str:
    """The URI with any password replaced by ***, safe to log as a tag or print."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def artifact_root_for(uri: str) -> str | None:
    """Where a local store keeps artifacts: `mlartifacts/` beside the SQLite file, so that a run writes
    nothing outside its tracking location. None for servers (their artifact proxy decides)."""
    path = sqlite_path(uri)
    if path is not None:
        return (path.parent.resolve() / "mlartifacts").as_uri()
    return None


def check_tracking_uri(uri: str, timeout: float = 5.0) -> str | None:
    """A sentence saying why the tracking store cannot be used, or None."""
    scheme = urlsplit(uri).scheme
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            return f"only file-based SQLite URIs (sqlite:///PATH) are supported, got {redact_uri(uri)}"
        if not path.parent.resolve().is_dir():
            return f"the directory of the SQLite file does not exist: {path.parent.resolve()}"
        return None
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status == 200:
                    return None
                return f"tracking server {redact_uri(uri)} answered HTTP {response.status} on /health"
        except (urllib.error.URLError, OSError) as exc:
            return f"tracking server {redact_uri(uri)} is unreachable: {getattr(exc, 'reason', exc)}"
    if scheme in ("postgresql", "mysql", "mssql") or scheme.startswith(("postgresql+", "mysql+")):
        return None  # MLflow connects on first use; errors surface then, before any trial starts
    if scheme in ("", "file"):
        return None
    return f"unsupported tracking URI scheme {scheme!r} in {redact_uri(uri)}"
