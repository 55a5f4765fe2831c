"""Docs that are generated from the code must match it."""

from __future__ import annotations

from labfleet.spec.schema import reference_markdown
from tests.conftest import REPO


def test_spec_reference_is_current():
    page = (REPO / "docs" / "spec-reference.md").read_text()
    assert page == reference_markdown(), (
        "docs/spec-reference.md is stale: run `python -m labfleet.spec.schema > docs/spec-reference.md`")


def test_spec_reference_names_every_field_of_a_spec():
    from labfleet.spec.models import ExperimentSpec

    page = reference_markdown()
    for name in ExperimentSpec.model_fields:
        assert f"| `{name}` |" in page, name
