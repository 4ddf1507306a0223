"""``edgefleet demo``'s command line: its options, and inputs it refuses before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet_core.cli.main import PLANNED_GROUPS, build_app
from edgefleet_operator.demo.session import default_store_url

runner = CliRunner()


def test_help_names_every_option() -> None:
    result = runner.invoke(build_app(), ["demo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--agents", "--fault", "--out", "--state", "--inferences", "--store"):
        assert option in result.output
    assert "bad-model" in result.output
    assert "tampered-artifact" in result.output


def test_the_cli_no_longer_announces_the_demo_as_missing() -> None:
    assert PLANNED_GROUPS == ""
    result = runner.invoke(build_app(), ["--help"], env={"COLUMNS": "200"})
    assert "Not yet available" not in result.output
    assert "demo" in result.output


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--agents", "1"], "--agents"),
        (["--fault", "power-cut"], "--fault"),
        (["--inferences", "0"], "--inferences"),
    ],
)
def test_bad_options_are_refused(args: list[str], problem: str) -> None:
    result = runner.invoke(build_app(), ["demo", *args])
    assert result.exit_code == 2
    assert problem in result.output


def test_a_state_folder_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(build_app(), ["demo", "--state", str(tmp_path)])
    assert result.exit_code == 1
    assert "is not an empty folder" in " ".join(result.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # nothing written, nothing started


def test_a_report_folder_holding_other_files_is_refused_before_anything_starts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(build_app(), ["demo", "--state", str(tmp_path / "run"), "--out", str(out)])
    assert result.exit_code == 1
    assert "holds files that are not a report" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_the_store_is_a_bucket_when_s3_settings_are_in_the_environment(tmp_path: Path) -> None:
    run = tmp_path / "demo-1"
    assert default_store_url(run, {}) == (run / "store").as_uri()
    assert default_store_url(run, {"AWS_ENDPOINT_URL": ""}) == (run / "store").as_uri()
    assert default_store_url(run, {"MINIO_ENDPOINT": "localhost:9000"}) == "s3://edgefleet-demo/demo-1"
