"""The MLflow side: tracking URIs, the run hierarchy, batched metrics, artifacts, end states.

The names below are imported on first use: `labfleet.tracking.tags` (what the CLI needs at its start) must not
bring MLflow in with it."""

from __future__ import annotations

from typing import Any

__all__ = ["Tracker", "redact_uri", "resolve_tracking_uri"]


def __getattr__(name: str) -> Any:
    if name == "Tracker":
        from labfleet.tracking.runs import Tracker

        return Tracker
    if name in ("redact_uri", "resolve_tracking_uri"):
        from labfleet.tracking import uri

        return getattr(uri, name)
    raise AttributeError(f"module 'labfleet.tracking' has no attribute {name!r}")
