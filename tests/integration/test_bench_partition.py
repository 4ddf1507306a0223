"""``edgefleet bench partition`` in a tiny quick run: every figure is there and sane (targets are not judged)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from edgefleet_agent.bench import partition as bench

pytestmark = pytest.mark.integration

FIGURES = (
    "pipelined_vs_one_core",
    "pipelined_vs_two_cores",
    "planner_vs_best",
    "planner_vs_best_throughput",
    "stages_alone_vs_one_core",
    "stages_together_vs_one_core",
)
VARIANTS = (
    "whole_one_core",
    "whole_two_cores",
    "sequential",
    "pipelined",
    "pipelined_remote",
    "stages_alone",
    "stages_together",
)


def test_tiny_run_writes_every_figure(tmp_path: Path) -> None:
    config = replace(
        bench.PartitionBenchConfig.quick_run(),
        models=(bench.BenchModel("digits-cnn", 2), bench.BenchModel("overparameterized-mlp", 8)),
        requests=6,
        warmup=1,
        runs=2,
        repeat=2,
    )
    out = tmp_path / "partition.json"
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("intro\n<!-- bench:partition:begin -->\nold\n<!-- bench:partition:end -->\noutro\n")

    document = bench.benchmark(config, out, page, progress=lambda _: None)

    assert json.loads(out.read_text()) == document
    assert document["quick"] is True
    assert "second CPU core" in document["accelerator"]
    assert document["machine"]["cores"] >= 1
    assert [m["model"] for m in document["models"]] == ["digits-cnn", "overparameterized-mlp"]
    assert document["repeat"] == 2
    for model in document["models"]:
        assert model["repeats"] == 2
        assert len(model["runs"]) == 2
        # The lower median of two: the shown run's own ratio.
        assert model["pipelined_vs_one_core"] == min(r["pipelined_vs_one_core"] for r in model["runs"])
        runs = {t["name"]: t["runs"] for t in model["targets"]}
        assert runs["pipelined_vs_one_core"] == runs["planner_vs_best"] == 2
        assert all(1 <= n <= 2 for n in runs.values())  # slow-link targets exist only where a smaller cut does
        for figure in FIGURES:
            assert math.isfinite(model[figure]), figure
            assert model[figure] > 0, figure
        for variant in VARIANTS:
            assert model[variant]["throughput_per_s"] > 0, variant
        for bound in ("stages_alone", "stages_together"):
            assert model[bound]["head_ms"] > 0
            assert model[bound]["tail_ms"] > 0
        # Head and tail together compute what the whole model does, in-process and across the process boundary.
        assert all(diff < 1e-4 for diff in model["max_abs_diff_vs_whole"].values())
        assert model["planner_vs_best"] >= 1.0
        cut = model["chosen_cut"]
        assert cut["cut_index"] is not None
        assert cut["bytes"] > 0
        assert sum("pipelined" in row for row in model["cuts"]) == len(model["cuts"]) - 1  # all but no split
        slow = model["slow_link"]
        assert slow["slow_link_cut"]["bytes"] <= slow["fast_link_cut"]["bytes"]
        assert {t["name"] for t in model["targets"]} >= {"pipelined_vs_one_core", "planner_vs_best"}
    cnn = document["models"][0]
    assert cnn["slow_link"]["smaller_cut_exists"] is True
    assert cnn["slow_link"]["bytes_slow_vs_fast"] < 0.5
    text = page.read_text()
    assert text.startswith("intro\n")
    assert text.endswith("outro\n")
    assert "old" not in text
    assert "| digits-cnn | 2 |" in text
    assert "Each model was run 2 times" in text
    assert "Where the 2x goes" in text
    assert isinstance(bench.missed(document), list)


def test_unknown_model_is_named() -> None:
    with pytest.raises(bench.PartitionBenchError, match="no sample model named 'resnet'"):
        bench.bench_model(bench.BenchModel("resnet", 1))
