"""``edgefleet gateway`` commands that write the fleet state, in-process through typer's runner."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from typer.testing import CliRunner

from edgefleet_core.cli.main import build_app
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.records import DeviceRecord
from edgefleet_operator.fleet.state import FleetState

runner = CliRunner()


def _enrolled(store: LocalStore, *names: str) -> FleetState:
    fleet = FleetState(store)
    for name in names:
        fleet.put_device(
            DeviceRecord(device_id=f"demo.{name}", namespace="demo", name=name, device_class="cpu-small", labels={},
                         hardware={}, agent_version="0.1.0", cert_serial="1f2e3d",
                         cert_not_after=datetime(2027, 1, 1, tzinfo=UTC), enrolled_at=datetime(2026, 1, 1, tzinfo=UTC))
        )  # fmt: skip
    return fleet


def test_assign_refuses_revoked_and_unknown_devices_and_removes_without_a_bundle(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    fleet = _enrolled(store, "cam-1", "cam-2")
    fleet.revoke_device("demo", "cam-2")
    url = f"file://{tmp_path / 'store'}"
    base = ["gateway", "assign", "--store", url, "--namespace", "demo", "--model", "digits", "--version", "1.0.0"]

    result = runner.invoke(build_app(), [*base, "--device", "cam-1", "--device", "cam-2"])
    assert result.exit_code == 1
    assert "revoked" in result.stderr
    assert "cam-2" in result.stderr
    result = runner.invoke(build_app(), [*base, "--device", "cam-9"])
    assert result.exit_code == 1
    assert "not enrolled" in result.stderr
    assert fleet.head_revision() == 0  # nothing was written by either refusal

    # A remove names no bundle, so it works without anything published.
    result = runner.invoke(build_app(), [*base, "--device", "cam-1", "--action", "remove"])
    assert result.exit_code == 0, result.stderr
    record = fleet.assignments_for("demo", "cam-1").assignments["demo/digits"]
    assert (record.action, record.revision, record.target_paths) == ("remove", int(result.stdout), [])


def test_pki_secret_prints_a_secret_the_gateway_can_mount(tmp_path: Path) -> None:
    import base64

    import yaml

    from edgefleet_operator.gateway.pki import load_pki

    assert (
        runner.invoke(build_app(), ["gateway", "pki", "init", str(tmp_path / "pki"), "--host", "gw.example"]).exit_code
        == 0
    )
    result = runner.invoke(build_app(), ["gateway", "pki", "secret", str(tmp_path / "pki"), "--namespace", "fleet"])
    assert result.exit_code == 0, result.output
    secret = yaml.safe_load(result.stdout)
    assert (secret["kind"], secret["metadata"]["name"], secret["metadata"]["namespace"]) == (
        "Secret",
        "edgefleet-gateway-pki",
        "fleet",
    )
    mounted = tmp_path / "mounted"  # what the kubelet writes from the Secret
    mounted.mkdir()
    for name, data in secret["data"].items():
        (mounted / name).write_bytes(base64.b64decode(data))
    assert sorted(secret["data"]) == ["ca-key.pem", "ca.pem", "server-key.pem", "server.pem"]
    assert load_pki(mounted).server_cert_pem == (tmp_path / "pki" / "server.pem").read_bytes()
    result = runner.invoke(build_app(), ["gateway", "pki", "secret", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "missing" in result.output
