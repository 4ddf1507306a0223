"""When ``edgefleet up`` counts a model as settled, and its command mounts and helps as ``edgefleet up``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgefleet_core.resources.base import Condition
from edgefleet_core.resources.edge_model import ClassRollout, EdgeModelStatus, RolloutPhase
from edgefleet_operator.local.cli import app
from edgefleet_operator.local.loop import is_settled

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _status(
    *true: str, phase: RolloutPhase = "Pending", devices: int = 0, generation: int = 1, reason: str = "RollingOut"
) -> EdgeModelStatus:
    kinds = ("Ready", "Reconciling", "Stalled", "Optimized", "Published", "RolledOut", "Degraded")
    conditions = [
        Condition(type=k, status="True" if k in true else "False", last_transition_time=NOW,
                  reason=reason if k == "Reconciling" else "Because", message="")
        for k in kinds
    ]  # fmt: skip
    rollout = ClassRollout(device_class="edge-cpu", version="1", phase=phase, devices=devices)
    return EdgeModelStatus(observed_generation=generation, conditions=conditions, rollout=[rollout])


@pytest.mark.parametrize(
    ("status", "settled"),
    [
        (_status("Ready", "Optimized", "Published", "RolledOut", phase="Succeeded", devices=3), True),
        (_status("Stalled"), True),
        (_status("Reconciling", "Optimized", "Published"), True),  # waiting for the class's first device
        (_status("Reconciling", "Optimized", "Published", phase="Paused", devices=2), True),
        (_status("Reconciling", "Optimized", "Published", phase="Progressing", devices=2), False),
        (_status("Reconciling", "Optimized", "Published", reason="Retrying"), False),
        (_status("Reconciling", "Optimized"), False),  # not published yet
        (_status("Ready", generation=0), False),  # an older generation's status
        (None, False),
    ],
    ids=["ready", "stalled", "no-devices", "paused", "devices-installing", "retrying", "unpublished", "old", "none"],
)
def test_settled(status: EdgeModelStatus | None, settled: bool) -> None:
    assert is_settled(status, 1) is settled


def test_up_mounts_as_one_command_and_its_help_renders() -> None:
    root = typer.Typer()

    @root.command()
    def version() -> None:
        """A second command, so the root is a group as in `edgefleet`."""

    root.add_typer(app, name="up")
    result = CliRunner().invoke(root, ["up", "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: root up [OPTIONS]" in result.output
    assert "COMMAND" not in result.output
    result = CliRunner().invoke(root, ["up"])
    assert result.exit_code == 2
    assert "Missing option '--filename'" in result.output


def test_invalid_files_exit_1_and_create_no_state(tmp_path: Path) -> None:
    folder = tmp_path
    (folder / "bad.yaml").write_text(
        "apiVersion: edgefleet.io/v1alpha1\nkind: EdgeModel\nmetadata: {name: x}\nspec: {}\n"
    )
    result = CliRunner().invoke(app, ["-f", str(folder / "bad.yaml"), "--state", str(folder / "state")])
    assert result.exit_code == 1
    assert result.stderr.count(f"error: {folder / 'bad.yaml'}: spec.source") == 1
    assert not (folder / "state").exists()
