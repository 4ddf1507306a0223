"""How ``edgefleet bench partition`` combines a model's repeated runs into one document."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from edgefleet_agent.bench.partition import _together, combined, markdown


def _run(ratio: float, planner: float, cut: str, whole_ms: float) -> dict[str, Any]:
    return {
        "model": "m",
        "whole_model_ms": whole_ms,
        "chosen_cut": {"label": cut},
        "pipelined_vs_one_core": ratio,
        "pipelined_vs_two_cores": ratio / 2,
        "sequential_vs_one_core": 0.9,
        "planner_vs_best": planner,
        "planner_vs_best_single_pass": planner,
        "planner_vs_best_throughput": 1.0,
        "stages_together_vs_one_core": ratio + 0.1,
        "targets": [
            {"name": "pipelined_vs_one_core", "value": ratio, "bound": 1.6, "rule": ">=", "met": ratio >= 1.6},
            {"name": "planner_vs_best", "value": planner, "bound": 1.1, "rule": "<=", "met": planner <= 1.1},
        ],
    }


def test_the_median_run_is_shown_and_every_ratio_and_target_is_the_median_over_runs() -> None:
    runs = [
        _run(1.52, 1.20, "cut 3", 2.5),
        _run(1.71, 1.00, "cut 9", 2.4),
        _run(1.64, 1.05, "cut 9", 2.6),
        _run(1.58, 1.02, "cut 8", 2.3),
        _run(1.66, 1.30, "cut 9", 2.2),
    ]
    document = combined(runs)
    assert document["repeats"] == 5
    assert document["whole_model_ms"] == 2.6  # the shown run is the one with the median ratio
    assert document["pipelined_vs_one_core"] == 1.64
    assert document["pipelined_vs_two_cores"] == pytest.approx(0.82)
    assert document["planner_vs_best"] == 1.05  # its own median, not the shown run's
    assert [r["chosen_cut"] for r in document["runs"]] == ["cut 3", "cut 9", "cut 9", "cut 8", "cut 9"]
    assert [r["pipelined_vs_one_core"] for r in document["runs"]] == [1.52, 1.71, 1.64, 1.58, 1.66]
    targets = {t["name"]: t for t in document["targets"]}
    assert targets["pipelined_vs_one_core"] == {
        "name": "pipelined_vs_one_core", "value": 1.64, "bound": 1.6, "rule": ">=", "met": True,
        "runs_met": 3, "runs": 5,
    }  # fmt: skip
    assert targets["planner_vs_best"]["value"] == 1.05
    assert targets["planner_vs_best"]["runs_met"] == 3
    assert runs[2]["pipelined_vs_two_cores"] == pytest.approx(0.82)  # the runs themselves are not changed


def test_a_median_below_the_bound_is_a_miss_even_when_some_runs_held() -> None:
    document = combined([_run(1.65, 1.0, "a", 2.0), _run(1.50, 1.0, "a", 2.0), _run(1.55, 1.0, "a", 2.0)])
    (target,) = [t for t in document["targets"] if t["name"] == "pipelined_vs_one_core"]
    assert target["met"] is False
    assert target["value"] == 1.55
    assert target["runs_met"] == 1


def test_no_runs_is_refused() -> None:
    with pytest.raises(ValueError, match="no runs"):
        combined([])


def test_the_markdown_lists_every_run() -> None:
    model = combined([_run(1.7, 1.0, "cut 9", 2.0), _run(1.6, 1.0, "cut 8", 2.1)])
    for variant in ("whole_one_core", "whole_two_cores", "sequential", "pipelined"):
        model[variant] = {"throughput_per_s": 100.0}
    model.update(
        batch=4,
        slow_link={
            "fast_link_cut": {"tensors": ["t"], "bytes": 10},
            "fast_link_cut_on_slow_link": {"measured_latency_ms": 3.0},
            "slow_link_cut": {"tensors": ["s"], "bytes": 1, "measured_latency_ms": 1.0},
        },
    )
    model["chosen_cut"] = {"label": "cut 8", "tensors": ["t"], "bytes": 10}
    document = {
        "machine": {"cpu": "cpu", "cores": 2, "onnxruntime": "1"},
        "rounds": 7,
        "requests": 200,
        "quick": False,
        "repeat": 2,
        "accelerator": "None.",
        "slow_link": {"bandwidthMBps": 1.25},
        "models": [model],
    }
    text = markdown(document)
    assert "Each model was run 2 times" in text
    # Two runs: the lower median, so the row shown is a real run and its ratio is the median.
    assert "| m | 1.70x (cut 9) | 1.60x (cut 8) | 1.60x |" in text
    assert "| 1.60x | 0.80x | cut 8: t (10) |" in text
    assert "| m | pipelined_vs_one_core | 1.600 | >= 1.6 | yes | 2 of 2 |" in text
    # A figure the document lacks (an older run's) is a dash, not an error.
    assert "| m | 0.90x | — | 1.70x | 1.60x |" in text


def test_stages_together_run_at_once_and_the_slower_sets_the_pace() -> None:
    both = _together(lambda: time.sleep(0.002), lambda: time.sleep(0.004), requests=20, warmup=1)
    assert both["first_ms"] >= 2.0
    assert both["second_ms"] >= 4.0
    assert both["throughput_per_s"] == pytest.approx(1000.0 / both["second_ms"])
    # Both stop once the first has made its 20 calls: the slower one made fewer, all of them at once.
    assert both["first_calls"] >= 20
    assert both["second_calls"] < 20


def _fails_at(call: int) -> Callable[[], None]:
    made = [0]

    def stage() -> None:
        made[0] += 1
        if made[0] >= call:
            raise ValueError(f"stage failed at call {call}")

    return stage


@pytest.mark.parametrize("call", [1, 5], ids=["in-warm-up", "while-timed"])
def test_a_stage_that_fails_ends_both_loops_and_is_raised(call: int) -> None:
    with pytest.raises(ValueError, match=f"at call {call}"):
        _together(lambda: time.sleep(0.001), _fails_at(call), requests=50, warmup=2)


def test_a_target_some_runs_lack_is_judged_on_the_runs_that_have_it() -> None:
    runs = [_run(1.7, 1.0, "a", 2.0), _run(1.6, 1.0, "a", 2.0), _run(1.8, 1.0, "b", 2.0)]
    runs[1]["targets"].append({"name": "slow_link_bytes_vs_fast", "value": 0.02, "bound": 0.5, "rule": "<="})
    runs[2]["targets"].append({"name": "slow_link_bytes_vs_fast", "value": 0.7, "bound": 0.5, "rule": "<="})
    document = combined(runs)  # the shown run (1.7) has no such target: it is kept all the same
    assert document["whole_model_ms"] == 2.0
    (target,) = [t for t in document["targets"] if t["name"] == "slow_link_bytes_vs_fast"]
    assert (target["value"], target["met"], target["runs_met"], target["runs"]) == (0.02, True, 1, 2)
