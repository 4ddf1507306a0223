"""Shared helpers of the agent fault tests: published versions, install records, what the agent serves and holds.

Used by ``tests/integration/test_faults_agent.py`` (random SIGKILLs) and the per-phase, network,
disk and clock scenarios in ``tests/reliability/``. Everything here reads the real processes' outputs
(the gateway's fleet state, the agent's inference API, the agent's state folder) rather than the
agent's own code, so a bug in the agent cannot hide itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path

import grpc
import numpy as np

from edgefleet_core.optimize.model_io import serialize
from edgefleet_operator.fleet.records import InstallRecord
from edgefleet_operator.fleet.state import FleetState
from edgefleet_proto.v1 import inference_pb2, inference_pb2_grpc
from tests.support.fleet import EDGEFLEET, FleetSite, Process, inference_address, start
from tests.support.tiny_models import wide_mlp

NAMESPACE = "demo"
MODEL = "wide"
CLASS = "cpu-small"
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")
AGENT_READY = re.compile(r"agent ready device=(\S+) inference=(\S+)")
"""The line ``edgefleet agent run`` prints once it serves (as tests/support/fleet.py waits for it)."""


def publish_versions(
    site: FleetSite, folder: Path, width: int = 1024, versions: tuple[str, ...] = VERSIONS, extra: tuple[str, ...] = ()
) -> None:
    """Publish one :func:`wide_mlp` per version (a different seed each, so every version differs)."""
    for seed, version in enumerate(versions, start=1):
        path = folder / version / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(serialize(wide_mlp(seed=seed, width=width)))
        site.publish(path, name=MODEL, version=version, device_class=CLASS, extra=extra)


def records(state: FleetState, device: str, revision: int) -> list[InstallRecord]:
    """Every report on one revision from one device, oldest first (one per attempt)."""
    found = [r for _, name, r in state.installs(NAMESPACE) if name == device and r.revision == revision]
    return sorted(found, key=lambda r: r.finished_at)


def record(state: FleetState, device: str, revision: int, outcome: str | None = None) -> InstallRecord | None:
    """The latest report on a revision (with that outcome, if given), or ``None`` yet."""
    found = [r for r in records(state, device, revision) if outcome is None or r.outcome == outcome]
    return found[-1] if found else None


def model_status(process: Process, timeout: float = 10.0) -> inference_pb2.ModelStatus | None:
    """What the agent's local inference API says it serves for :data:`MODEL` (``None``: nothing yet)."""
    with grpc.insecure_channel(inference_address(process)) as channel:
        response = inference_pb2_grpc.InferenceStub(channel).GetModelStatus(
            inference_pb2.GetModelStatusRequest(model_name=MODEL), timeout=timeout
        )
    return response.models[0] if response.models else None


def serving(process: Process, version: str) -> bool:
    """True once the agent serves ``version`` of :data:`MODEL`, ready."""
    try:
        status = model_status(process)
    except grpc.RpcError:
        return False
    return status is not None and status.active_version == version and status.state == inference_pb2.MODEL_STATE_READY


def verified_on_disk(state_dir: Path) -> str | None:
    """The version a restarted agent may serve: the committed slot, re-hashed against its manifest.

    Reads the documented state layout directly (not through the agent's code) so that a bug in the
    agent's own verification cannot hide a partial slot.
    """
    model_dir = state_dir / "models" / NAMESPACE / MODEL
    pointer_file = model_dir / "current.json"
    if not pointer_file.exists():
        return None
    pointer = json.loads(pointer_file.read_text())
    # An uncommitted trial is rolled back at start-up: what counts is the last committed slot.
    if pointer.get("committed", True):
        slot, version = pointer["active_slot"], pointer["active_version"]
    else:
        slot, version = pointer["previous_slot"], pointer["previous_version"]
    if slot is None:
        return None
    folder = model_dir / f"slot-{slot}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] == version, (pointer, manifest["version"])
    for entry in manifest["files"]:
        digest = hashlib.sha256((folder / entry["name"]).read_bytes()).hexdigest()
        assert digest == entry["sha256"], f"{folder / entry['name']} does not match its manifest"
    return str(version)


def interrupted_writes(state_dir: Path) -> list[str]:
    """Files an interrupted write leaves in the agent's state: temp files, staging and set-aside folders.

    The patterns of :mod:`edgefleet_core.atomic` (``.NAME.*.tmp``, ``.NAME.old-PID``) and of
    python-tuf's metadata writes (``tmp*`` beside the metadata).
    """
    found = []
    for path in sorted(state_dir.rglob("*")):
        name = path.name
        if (name.startswith(".") and (name.endswith(".tmp") or ".old-" in name)) or (
            name.startswith("tmp") and path.parent.name == "metadata"
        ):
            found.append(str(path.relative_to(state_dir)))
    return found


def partial_downloads(state_dir: Path) -> list[str]:
    """Partial downloads left in ``STATE/downloads`` (none may stay once an update finished)."""
    return sorted(p.name for p in (state_dir / "downloads").glob("*.part"))


def start_agent(
    site: FleetSite,
    name: str,
    *,
    gateway: str,
    enroll_gateway: str,
    token: str | None = None,
    env: dict[str, str] | None = None,
    wrapper: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
) -> Process:
    """:meth:`FleetSite.start_agent` with an environment of its own (failpoints, clock offset) and an
    optional command ``wrapper`` it runs under (e.g. ``unshare -rm sh -c '... exec "$@"' sh``)."""
    args = ["agent", "run", "--state", str(site.agent_state(name)), "--gateway", gateway,
            "--enroll-gateway", enroll_gateway, "--gateway-ca", str(site.pki / "ca.pem"),
            "--tuf-root", str(site.trusted_root), "--name", name,
            "--inference-listen", "127.0.0.1:0", *extra]  # fmt: skip
    if token is not None:
        args += ["--token", token]
    return launch(site, name, [*wrapper, *EDGEFLEET, *args], AGENT_READY, env=env)


def launch(site: FleetSite, name: str, argv: list[str], ready: re.Pattern[str], *,
           env: dict[str, str] | None = None) -> Process:  # fmt: skip
    """Start the whole command ``argv`` with its output in the site's log folder, wait for its ``ready``
    line; the process is stopped with the site's others."""
    process = start(name, argv, site.folder / "logs", ready, env=env, argv=argv)
    site.processes.append(process)
    return process


def predict(process: Process, *, version: str = "", error: bool = False, timeout: float = 10.0) -> str:
    """One inference on the agent's local API (``error``: a malformed input, counted as a failed one)."""
    x = np.zeros((1, 63 if error else 64), dtype="<f4")
    tensor = inference_pb2.Tensor(name="x", dtype=inference_pb2.DATA_TYPE_FLOAT, shape=list(x.shape), data=x.tobytes())
    with grpc.insecure_channel(inference_address(process)) as channel:
        response = inference_pb2_grpc.InferenceStub(channel).Predict(
            inference_pb2.PredictRequest(model_name=MODEL, model_version=version, inputs=[tensor]), timeout=timeout
        )
    return str(response.model_version)


class InferenceLoad:
    """Inference requests in a loop on a thread, counted: what the gateway's health totals must add up to."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.served = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-load", daemon=True)

    def __enter__(self) -> InferenceLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                predict(self.process, timeout=5)
            except grpc.RpcError as e:
                self.failed.append(str(e))
            else:
                self.served += 1
            self._stop.wait(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def health_totals(state: FleetState, device: str) -> dict[str, tuple[int, int]]:
    """The gateway's cumulative health counts for ``device``: version → (inferences, errors)."""
    totals: dict[str, tuple[int, int]] = {}
    for health in state.read_health_report()[0]:
        if health.name != device:
            continue
        for entry in health.totals.values():
            inferences, errors = totals.get(entry.version, (0, 0))
            totals[entry.version] = (inferences + entry.inference_count, errors + entry.error_count)
    return totals
