"""The MLflow side: tracking URIs, the run hierarchy, batched metrics, artifacts, end states."""

from labfleet.tracking.runs import Tracker
from labfleet.tracking.uri import redact_uri, resolve_tracking_uri

__all__ = ["Tracker", "redact_uri", "resolve_tracking_uri"]
