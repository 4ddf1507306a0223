"""``edgefleet bench gateway`` end to end at toy sizes: a real gateway process, real mTLS agents.

The figures of so small a run say nothing about the targets; this checks that every phase runs,
the results document has the fields the issue names with sane values, and the Markdown section is
written between its markers.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from edgefleet_operator.bench import gateway as bench

pytestmark = pytest.mark.integration


def test_quick_run_writes_sane_results(tmp_path: Path) -> None:
    config = replace(
        bench.GatewayBenchConfig.quick_run(agents=40, duration_s=2.0),
        health_rate=300.0,
        push_agents=20,
        push_rounds=3,
        streams=2,
        stream_rounds=1,
        payload_mb=2.0,
        enroll_devices=4,
    )
    out, markdown = tmp_path / "gateway.json", tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\n<!-- bench:gateway:begin -->\nold\n<!-- bench:gateway:end -->\ntail\n")

    bench.benchmark(config, out, markdown, progress=lambda _: None)

    document = json.loads(out.read_text())
    assert document["benchmark"] == "gateway"
    assert document["connected_agents"] == 40
    assert document["connect"]["watches_open_after_health"] == 40
    assert document["health_reports_per_s"] > 0
    assert 0 < document["health_p99_ms"] < 10_000
    assert document["health"]["succeeded"] > 0
    assert document["artifact_mb_per_s"] > 0
    assert document["artifact"]["files_verified"] == 2
    assert document["artifact"]["files_failed"] == {}
    assert math.isfinite(document["push_p99_ms"])
    assert 0 < document["push_p50_ms"] <= document["push_p99_ms"] < 10_000
    assert document["push"]["rounds_incomplete"] == 0
    assert document["enroll"]["succeeded"] == 4
    rss = document["gateway_rss_bytes"]
    assert 0 < rss["ready"] <= rss["peak"]
    assert document["gateway_shutdown"]["exit_code"] == 0
    assert document["machine"]["cores"] >= 1
    names = {t["name"] for t in document["targets"]}
    assert any("health reports/s" in n for n in names)
    assert all(isinstance(t["met"], bool) for t in document["targets"])

    text = markdown.read_text()
    section = text.split("<!-- bench:gateway:begin -->")[1].split("<!-- bench:gateway:end -->")[0]
    assert "old" not in section
    assert "| figure | value | target | met |" in section
    assert text.endswith("tail\n")


def test_a_too_low_open_file_limit_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgefleet_operator.bench import loadgen

    monkeypatch.setattr(loadgen, "raise_fd_limit", lambda: (1024, 1024))
    with pytest.raises(bench.GatewayBenchError, match=r"open-file limit too low.*RLIMIT_NOFILE allows 1024"):
        bench.check_fd_limits(bench.GatewayBenchConfig.full())
