"""Experiment specs and suites: models, YAML loading, --set overrides, validation."""

from labfleet.spec.loading import apply_overrides, load_spec, load_suite, parse_set_options, read_yaml
from labfleet.spec.models import Budget, EvalConfig, ExperimentSpec, Resources, SuiteSpec, TrackingConfig

__all__ = [
    "Budget", "EvalConfig", "ExperimentSpec", "Resources", "SuiteSpec", "TrackingConfig",
    "apply_overrides", "load_spec", "load_suite", "parse_set_options", "read_yaml",
]
