"""``edgefleet bench operator`` at toy size: the real kopf operator, the test API server in its own process.

The figures of so small a run say nothing; this checks that both passes run, that the timed passes
only adopted what priming published, and that the results document has the fields the issue names
with sane values and the Markdown section is written between its markers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgefleet_operator.bench import operator as bench
from edgefleet_operator.bench.operator_cmd import command

pytestmark = pytest.mark.integration

MODELS = 6


def _cli() -> typer.Typer:
    # The command as `edgefleet bench` mounts it (the entry point registers the same function).
    app = typer.Typer()
    app.command(name="operator")(command)
    app.command(name="other")(lambda: None)  # two commands: typer keeps the sub-command name
    return app


def test_quick_run_writes_sane_results(tmp_path: Path) -> None:
    out, page = tmp_path / "operator.json", tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\n<!-- bench:operator:begin -->\nold\n<!-- bench:operator:end -->\ntail\n")

    result = CliRunner().invoke(
        _cli(), ["operator", "--quick", "--models", str(MODELS), "--json", str(out), "--markdown", str(page)]
    )

    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["benchmark"] == "operator"
    assert document["quick"] is True
    assert document["setup"]["models"] == MODELS
    assert document["setup"]["device_classes"] == len(bench.CLASS_NAMES)
    for figure in ("reconciles_per_s", "baseline_reconciles_per_s", "ratio_vs_baseline", "first_reconcile_per_s"):
        assert math.isfinite(document[figure]), figure
        assert document[figure] > 0, figure
    assert document["ratio_vs_baseline"] == pytest.approx(
        document["reconciles_per_s"] / document["baseline_reconciles_per_s"]
    )
    assert len(document["baseline_runs_per_s"]) == 2
    latency = document["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["max"]
    # Nothing was built or published again by the timed passes: every (model, class) is at version 1.
    assert document["adopted_only"] is True
    # The operator did the work over the API: a status patch per model at least, and its events.
    requests = document["api_requests"]
    assert requests["patch edgemodels/status"] >= MODELS
    assert requests["watch edgemodels"] >= 1
    # Per model: a status patch, kopf's own patches (finalizer, progress annotations), its events.
    assert document["api_writes_per_model"] >= 2
    assert document["machine"]["cores"] >= 1
    assert document["machine"]["kopf"]
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\n<!-- bench:operator:begin -->\nMeasured on ")
    assert text.endswith("<!-- bench:operator:end -->\ntail\n")
    assert "old" not in text
    assert "reconciles_per_s" in result.output
    assert f"results written to {out}" in result.output


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert bench._percentile(values, 50) == 50.0
    assert bench._percentile(values, 95) == 95.0
    assert bench._percentile([7.0], 95) == 7.0


def test_the_source_model_is_valid_onnx_and_stable() -> None:
    assert bench.source_model() == bench.source_model()  # same bytes: the same sha256 in every run
