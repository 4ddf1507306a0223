"""RELIABILITY.md's tables are written from bench/results/reliability.json and stay in step with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.reliability_report import ReportError, main, render

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = {
    "machine": {"platform": "Linux-x", "python": "3.11.7", "cpus": 2, "processor": "x86_64"},
    "updated": "2026-11-22T00:00:00Z",
    "scenarios": {
        "agent killed during download": {
            "kind": "fault", "guards": "installed versions", "trials": 20, "failures": 0, "lost": 0,
            "recovery_s": {"median": 1.5, "p95": 2.0, "max": 2.25}, "notes": [], "wall_s": 30.0, "mode": "full",
        }
    },
    "fuzz": {"bundle decoder": {"executions": 20000, "crashes_fixed": ["IndexError on a short header"], "mode": "q"}},
    "matrix": {"fleet-gateway": {"cells": {"Enroll": {"no cert": "OK", "revoked": "UNAUTHENTICATED"}}}},
    "load": {"gateway-soak": {"duration_s": 600, "errors": 0}},
}  # fmt: skip
SKELETON = "".join(
    f"before {s}\n<!-- reliability:{s}:begin -->\nstale\n<!-- reliability:{s}:end -->\n"
    for s in ("machine", "scenarios", "fuzz", "matrix", "load")
)


def test_every_section_is_rendered_and_prose_kept() -> None:
    text = render(SKELETON, SAMPLE)
    assert "stale" not in text
    assert "before scenarios" in text
    assert "| agent killed during download | 20 | 0 | 0 | installed versions | 1.50 s / 2.25 s | full |" in text
    assert "| bundle decoder | 20,000 | IndexError on a short header | q |" in text
    assert "| method | no cert | revoked |" in text
    assert "| Enroll | OK | UNAUTHENTICATED |" in text
    assert "| gateway-soak | errors | 0 |" in text
    assert render(text, SAMPLE) == text


def test_a_missing_marker_is_named() -> None:
    with pytest.raises(ReportError, match="reliability:fuzz:begin"):
        render(SKELETON.replace("<!-- reliability:fuzz:begin -->", ""), SAMPLE)


def test_the_command_reports_a_broken_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.json").write_text("{not json")
    (tmp_path / "R.md").write_text(SKELETON)
    assert main([str(tmp_path / "r.json"), str(tmp_path / "R.md")]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert (tmp_path / "R.md").read_text() == SKELETON


def test_the_committed_reliability_md_matches_the_committed_figures() -> None:
    data = json.loads((ROOT / "bench/results/reliability.json").read_text())
    text = (ROOT / "RELIABILITY.md").read_text()
    assert render(text, data) == text, "RELIABILITY.md is stale: run python -m tests.support.reliability_report"
