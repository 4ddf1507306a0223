"""``edgefleet up -f DIR``: the operator's reconciler over resource files, end to end without a cluster.

Real components throughout: the quickstart example (examples/*.yaml and its digits model), the
real pipeline, a real TUF repository in the state folder's store, the fleet state the gateway
reads. The first run is made once per module; each test starts from a copy of its state.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.signing.keys import KeySet
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.records import DeviceRecord
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.local.cli import app
from edgefleet_operator.local.errors import InputError
from edgefleet_operator.local.loop import ControlPlane, LocalSettings, RunReport
from edgefleet_operator.local.state import StateDir

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MODEL_FILE = "edgemodel-digits.yaml"
runner = CliRunner()


def up(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def _copy_examples(folder: Path) -> Path:
    """The files `edgefleet up -f examples/` reads, and the model folder their URIs point into."""
    folder.mkdir(parents=True)
    for path in EXAMPLES.glob("*.yaml"):
        shutil.copy(path, folder / path.name)
    shutil.copytree(EXAMPLES / "models", folder / "models")
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file aside) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _published(state: Path) -> dict[str, list[str]]:
    publisher = Publisher(LocalStore(state / "store"), KeySet.load(state / "keys"))
    return publisher.model_versions("default", "digits")


def _model(document: dict[str, Any], name: str = "digits") -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in document["edgeModels"] if m["name"] == name)
    return found


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in status["conditions"] if c["type"] == kind)
    return found


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")


@dataclass(frozen=True)
class FirstRun:
    files: Path
    state: Path
    document: dict[str, Any]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    base = tmp_path_factory.mktemp("up")
    files = _copy_examples(base / "examples")
    state = base / "state"
    result = up("-f", files, "--state", state, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    return FirstRun(files, state, json.loads(result.stdout))


@pytest.fixture
def copied(first_run: FirstRun, tmp_path: Path) -> FirstRun:
    """The first run's files and state, for a test to change."""
    files = tmp_path / "examples"
    shutil.copytree(first_run.files, files)
    state = tmp_path / "state"
    shutil.copytree(first_run.state, state)
    return FirstRun(files, state, first_run.document)


def test_the_first_run_creates_keys_and_publishes_a_signed_variant(first_run: FirstRun) -> None:
    document, state = first_run.document, first_run.state
    assert document["keysCreated"] is True
    assert document["settled"] is True
    assert document["deviceClasses"] == ["edge-cpu"]
    model = _model(document)
    assert model["generation"] == 1
    assert model["file"] == str(first_run.files / MODEL_FILE)
    status = model["status"]
    assert status["observedGeneration"] == 1
    assert status["version"] == "1"
    (variant,) = status["variants"]
    assert variant["deviceClass"] == "edge-cpu"
    assert variant["version"] == "1"
    assert 0 < variant["sizeBytes"] < (first_run.files / "models" / "digits-small-cnn.onnx").stat().st_size
    assert variant["bundle"] == "edge-cpu/default/digits/1/manifest.json"
    for kind in ("Optimized", "Published"):
        assert _condition(status, kind)["status"] == "True"
    assert _condition(status, "Stalled")["status"] == "False"
    # No devices enrolled yet: the rollout waits for the class's first one, which counts as settled.
    (rollout,) = status["rollout"]
    assert (rollout["phase"], rollout["devices"], rollout["version"]) == ("Pending", 0, "1")
    assert _condition(status, "Ready")["status"] == "False"
    reasons = [e["reason"] for e in document["events"]]
    assert "VariantPublished" in reasons
    # The repository is real and devices are handed its root.
    assert _published(state) == {"edge-cpu": ["1"]}
    root = Publisher(LocalStore(state / "store"), KeySet.load(state / "keys")).trusted_root()
    assert (state / "trusted-root.json").read_bytes() == root
    assert document["trustedRoot"] == str(state / "trusted-root.json")
    assert (state / "keys").stat().st_mode & 0o777 == 0o700


def test_a_second_run_adopts_a_changed_spec_versions_bad_files_change_nothing_and_removal_finalizes(
    copied: FirstRun,
) -> None:
    files, state = copied.files, copied.state
    first_status = _model(copied.document)["status"]

    # Again, the same resources (from another folder: only the applied-from annotation changes):
    # the build is adopted, nothing is published, the status stays as it was.
    result = up("-f", files, "--state", state, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["applied"]["configured"] == []
    assert _model(document)["generation"] == 1
    assert _model(document)["status"] == first_status
    assert "VariantPublished" not in [e["reason"] for e in document["events"]]
    # And once more: not a byte of the state changes.
    before = _tree(state)
    result = up("-f", files, "--state", state)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "default/digits" in result.stdout
    assert "edge-cpu" in result.stdout
    assert "Pending (no devices)" in result.stdout
    assert _tree(state) == before

    # A spec change that is a build input: generation 2, a new version built and published.
    _edit(files / MODEL_FILE, "maxDrop: 0.02", "maxDrop: 0.03")
    result = up("-f", files, "--state", state, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["applied"]["configured"] == ["EdgeModel default/digits"]
    model = _model(document)
    assert model["generation"] == 2
    assert model["status"]["observedGeneration"] == 2
    assert model["status"]["version"] == "2"
    assert model["status"]["rollout"][0]["version"] == "2"
    assert _published(state) == {"edge-cpu": ["1", "2"]}

    # An invalid file: exit 1 naming the file and the field; nothing stored changes.
    before = _tree(state)
    _edit(files / MODEL_FILE, "maxDrop: 0.03", "maxDrop: 2")
    _edit(files / "deviceclass-edge-cpu.yaml", "cores: 2", "cores: 0")
    result = up("-f", files, "--state", state)
    assert result.exit_code == 1
    assert f"{files / MODEL_FILE}: spec.accuracy.maxDrop:" in result.stderr
    assert f"{files / 'deviceclass-edge-cpu.yaml'}: spec.cpu.cores:" in result.stderr
    assert "nothing was applied" in result.stderr
    assert _tree(state) == before

    # The model leaves the files: finalized, then gone; its artifacts stay (artifactPolicy Retain).
    _edit(files / "deviceclass-edge-cpu.yaml", "cores: 0", "cores: 2")
    (files / MODEL_FILE).unlink()
    result = up("-f", files, "--state", state, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["applied"]["deleted"] == ["EdgeModel default/digits"]
    assert document["edgeModels"] == []
    assert any(e["reason"] == "Deleted" for e in document["events"])
    assert not (state / "api" / "edgemodels" / "default" / "digits.json").exists()
    assert _published(state) == {"edge-cpu": ["1", "2"]}


def test_a_stalled_model_names_its_file_and_field_and_the_others_go_on(copied: FirstRun) -> None:
    files, state = copied.files, copied.state
    text = (files / MODEL_FILE).read_text(encoding="utf-8")
    typo = text.replace("name: digits\n", "name: digits-typo\n", 1)
    typo = re.sub(r"(digits-small-cnn\.onnx\n\s+sha256: )[0-9a-f]{64}", rf"\g<1>{'f' * 64}", typo)
    (files / "edgemodel-typo.yaml").write_text(typo, encoding="utf-8")
    nowhere = text.replace("name: digits\n", "name: digits-nowhere\n", 1).replace("[edge-cpu]", "[gpu-box]")
    (files / "edgemodel-nowhere.yaml").write_text(nowhere, encoding="utf-8")

    result = up("-f", files, "--state", state, "--json")
    assert result.exit_code == 1, result.stdout + result.stderr
    document = json.loads(result.stdout)
    stalled_typo = _condition(_model(document, "digits-typo")["status"], "Stalled")
    assert stalled_typo["status"] == "True"
    assert "spec.source.sha256" in stalled_typo["message"]
    stalled_nowhere = _condition(_model(document, "digits-nowhere")["status"], "Stalled")
    assert stalled_nowhere["status"] == "True"
    assert "spec.targets.deviceClasses[0]" in stalled_nowhere["message"]
    # The good model is untouched: still version 1, adopted.
    assert _model(document)["status"]["version"] == "1"
    assert _published(state) == {"edge-cpu": ["1"]}

    result = up("-f", files, "--state", state)
    assert result.exit_code == 1
    assert f"default/digits-typo ({files / 'edgemodel-typo.yaml'}): Stalled" in result.stdout
    assert "spec.source.sha256" in result.stdout


def test_another_run_on_the_same_state_is_refused(copied: FirstRun) -> None:
    before = _tree(copied.state)
    with StateDir.at(copied.state).locked():
        result = up("-f", copied.files, "--state", copied.state)
    assert result.exit_code == 1
    assert "in use by another `edgefleet up`" in result.stderr
    assert _tree(copied.state) == before


def _enroll(state: Path, name: str) -> FleetState:
    fleet = FleetState(LocalStore(state / "store"))
    fleet.put_device(
        DeviceRecord(device_id=f"default.{name}", namespace="default", name=name, device_class="edge-cpu",
                     labels={"edgefleet.io/hardware": "edge-cpu"}, hardware={}, agent_version="0.1.0",
                     cert_serial="1f2e3d", cert_not_after=datetime(2030, 1, 1, tzinfo=UTC),
                     enrolled_at=datetime(2026, 1, 1, tzinfo=UTC))
    )  # fmt: skip
    return fleet


def test_a_rollout_to_devices_waits_for_them_and_deleting_unassigns_and_unpublishes(copied: FirstRun) -> None:
    files, state = copied.files, copied.state
    fleet = _enroll(state, "box-1")
    _edit(files / MODEL_FILE, "  task: classification", "  artifactPolicy: Delete\n  task: classification")

    # The device gets the version; the rollout then waits for its report, which never comes here.
    result = up("-f", files, "--state", state, "--timeout", "1", "--json")
    assert result.exit_code == 3, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["timedOut"] is True
    (rollout,) = _model(document)["status"]["rollout"]
    assert (rollout["phase"], rollout["devices"], rollout["updated"]) == ("Progressing", 1, 1)
    held = fleet.assignments_for("default", "box-1").assignments["default/digits"]
    assert (held.action, held.version) == ("install", "1")

    # Deleted: the device is told to remove it, and with artifactPolicy Delete the bundles go.
    (files / MODEL_FILE).unlink()
    result = up("-f", files, "--state", state, "--json")
    assert result.exit_code == 0, result.stderr
    reasons = [e["reason"] for e in json.loads(result.stdout)["events"]]
    assert {"AssignmentsRemoved", "ArtifactsDeleted", "Deleted"} <= set(reasons)
    assert fleet.assignments_for("default", "box-1").assignments["default/digits"].action == "remove"
    assert _published(state) == {}


@pytest.fixture
def watching(copied: FirstRun) -> Iterator[tuple[ControlPlane, list[RunReport], list[InputError], threading.Thread]]:
    settled: list[RunReport] = []
    problems: list[InputError] = []
    settings = LocalSettings(
        paths=(copied.files,), state=StateDir.at(copied.state), watch=True, timeout_s=90.0, poll_interval_s=0.05
    )
    control = ControlPlane(
        settings,
        on_settled=lambda report: settled.append(_snapshot(report)),
        on_input_problem=problems.append,
    )
    reports: list[RunReport] = []
    thread = threading.Thread(target=lambda: reports.append(control.run()), daemon=True)
    thread.start()
    yield control, settled, problems, thread
    control.stop()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert reports[0].stopped


def _snapshot(report: RunReport) -> RunReport:
    """A copy of the report as it was when it settled (the loop goes on filling the same one)."""
    return RunReport(report.state, report.store_url, models=list(report.models), settled=report.settled)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling the condition, not waiting for it to happen


def test_watching_applies_changed_files_and_keeps_the_last_valid_ones(
    copied: FirstRun, watching: tuple[ControlPlane, list[RunReport], list[InputError], threading.Thread]
) -> None:
    _, settled, problems, _ = watching
    _wait_for(lambda: bool(settled), "the first settled state")
    assert settled[-1].models[0].generation == 1

    # Not a build input: generation 2 is reconciled without a new version.
    _edit(copied.files / MODEL_FILE, "pause: 30s", "pause: 45s")
    _wait_for(lambda: settled[-1].models[0].generation == 2, "generation 2 to settle")
    status = settled[-1].models[0].status
    assert status is not None
    assert (status.observed_generation, status.version) == (2, "1")

    # A broken file is reported and the last valid state stays applied.
    _edit(copied.files / MODEL_FILE, "maxDrop: 0.02", "maxDrop: 7")
    _wait_for(lambda: bool(problems), "the invalid file to be reported")
    assert "spec.accuracy.maxDrop" in str(problems[-1])
    stored = json.loads((copied.state / "api" / "edgemodels" / "default" / "digits.json").read_text())
    assert stored["metadata"]["generation"] == 2


def test_watch_with_a_timeout_prints_json_lines_and_ends_cleanly(copied: FirstRun) -> None:
    result = up("-f", copied.files, "--state", copied.state, "--watch", "--timeout", "0.5", "--json")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines
    assert json.loads(lines[-1])["edgeModels"][0]["status"]["version"] == "1"


def test_sigterm_ends_a_watch_cleanly(copied: FirstRun) -> None:
    command = [sys.executable, "-c", "from edgefleet_operator.local.cli import app; app(prog_name='edgefleet up')"]
    args = ["-f", str(copied.files), "--state", str(copied.state), "--watch", "--timeout", "90"]
    with subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        # The table is printed once everything settled: then stop it as a service manager would.
        for line in process.stdout:
            if line.startswith("default/digits"):
                break
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "stopping after the reconcile under way" in err
    # The lock is free again: another run can take the state folder.
    with StateDir.at(copied.state).locked():
        pass
