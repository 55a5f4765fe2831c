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


def test_docs_describe_the_project_not_its_history():
    """The docs say what exists and what it measures; how the work was organised is in git."""
    import re

    diary = re.compile(r"\b(stop|issue|session) #?\d+\b|\btried and (dropped|not kept)\b|\bthis task\b", re.I)
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = [f"{page.name}:{n}: {line.strip()[:100]}" for page in pages
             for n, line in enumerate(page.read_text().splitlines(), 1) if diary.search(line)]
    assert not found, "\n".join(found)
