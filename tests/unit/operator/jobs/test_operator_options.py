"""``edgefleet operator run``'s Job options are checked before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet_operator.operator_cli import app
from edgefleet_operator.runtime import OperatorSettings, RuntimeSetupError


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--build-mode", "jobs"], "--job-image"),
        (["--job-image", "img"], "--job-image"),
        (["--build-mode", "cluster"], "--build-mode"),
        (["--build-mode", "jobs", "--job-image", "img", "--job-deadline-seconds", "5"], "--job-deadline-seconds"),
    ],
)
def test_job_options_that_do_not_fit_are_refused(tmp_path: Path, options: list[str], named: str) -> None:
    base = ["run", "--store", (tmp_path / "s").as_uri(), "--keys", str(tmp_path / "k"), "--server", "http://x", "-A",
            "--standalone"]  # fmt: skip
    result = CliRunner().invoke(app, [*base, *options])
    assert result.exit_code == 2, result.output
    assert named in result.output


def test_help_names_the_job_options() -> None:
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--build-mode", "--job-image", "--job-namespace", "--job-service-account", "--job-s3-secret"):
        assert option in result.output


def test_jobs_mode_needs_job_settings_and_an_api_server(tmp_path: Path) -> None:
    with pytest.raises(RuntimeSetupError, match="Job settings"):
        OperatorSettings(store_url=(tmp_path / "s").as_uri(), keys_dir=tmp_path, build_mode="jobs")
