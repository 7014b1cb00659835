"""Say up front when the working tree's params.yaml is not the committed one: the tests use the committed one."""

from __future__ import annotations

from tests.pipeline_fixtures import REPO, committed_params_text


def pytest_report_header() -> str | None:
    path = REPO / "params.yaml"
    if path.is_file() and path.read_text(encoding="utf-8") != committed_params_text():
        return "params.yaml: the working tree's copy differs from HEAD; the tests use the committed one"
    return None
