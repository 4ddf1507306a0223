"""The agent's state disk fills up during an update.

The agent runs with its state folder on a small tmpfs of its own: ``unshare -rm`` (a user and mount
namespace, no real root needed) mounts it, then execs ``edgefleet agent run``. The test fills it
through ``/proc/PID/root`` (the agent's view of its mounts) with a ballast file, leaving:

- *too little for the bundle*: the Updater refuses before downloading anything;
- *room for the download but not the decoded slot*: the slot write hits ENOSPC half-way;
- *nothing at all*: not even the install report fits.

Each time the update must fail with a clear error naming the disk (``OutOfSpace``), the old version
keeps serving, nothing half-written stays, and once the ballast is deleted the agent finishes the
update by itself. Recovery time: space freed → the new version served.

Where ``unshare`` is not permitted (some CI sandboxes), the same scenario runs with ``RLIMIT_FSIZE``
instead (set on the running agent with ``prlimit``; CPython ignores SIGXFSZ, so writes fail with EFBIG), and
the test says so in its output (``EDGEFLEET_DISK_FAULT=rlimit`` forces it); it runs the "no room for the
decoded slot" case only, the others need a real filesystem.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.state import FleetState
from tests.support.agent_faults import (
    CLASS,
    MODEL,
    NAMESPACE,
    interrupted_writes,
    model_status,
    partial_downloads,
    predict,
    publish_versions,
    record,
    records,
    serving,
    start_agent,
    verified_on_disk,
)
from tests.support.fleet import FleetSite, Process, fleet_site, gateway_address, wait_for
from tests.support.reliability import scenario, trials

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

DEVICE = "diskfull"
TMPFS_KIB = 6 * 1024
FALLBACK_ENV = "EDGEFLEET_DISK_FAULT"
"""``rlimit`` forces the RLIMIT_FSIZE fallback (to check it where unshare works)."""
CASES = ("no room for the bundle", "no room for the decoded slot", "no room at all")


def _namespaces_allowed() -> bool:
    if os.environ.get(FALLBACK_ENV) == "rlimit":
        return False
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False, timeout=30)
    return probe.returncode == 0


@dataclass
class Device:
    """The agent process and how to reach its state folder (inside its own mount namespace, or not)."""

    process: Process
    state_dir: Path
    namespaced: bool

    @property
    def state(self) -> Path:
        """The state folder as the agent sees it."""
        if self.namespaced:
            return Path(f"/proc/{self.process.popen.pid}/root") / self.state_dir.relative_to("/")
        return self.state_dir

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.state).free


def _start(site: FleetSite, namespaced: bool) -> Device:
    fleet, enroll = gateway_address(site.processes[0])
    state_dir = site.agent_state(DEVICE)
    state_dir.mkdir(parents=True, exist_ok=True)
    wrapper: tuple[str, ...] = ()
    if namespaced:
        mount = f'mount -t tmpfs -o size={TMPFS_KIB}k tmpfs "$0" && exec "$@"'
        wrapper = ("unshare", "-rm", "sh", "-c", mount, str(state_dir))
    process = start_agent(site, DEVICE, gateway=fleet, enroll_gateway=enroll, token=site.token(CLASS),
                          wrapper=wrapper, extra=("--heartbeat-interval", "0.5"))  # fmt: skip
    return Device(process, state_dir, namespaced)


def _sizes(site: FleetSite, device: Device, version: str) -> tuple[int, int]:
    """(bytes of ``version``'s full bundle, bytes of the decoded slot of the version installed now)."""
    folder = site.folder / "store" / "tuf" / "targets" / CLASS / NAMESPACE / MODEL / version
    bundle = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    slot = device.state / "models" / NAMESPACE / MODEL / "slot-a"
    return bundle, sum(p.stat().st_size for p in slot.iterdir())


def _fill(device: Device, leave: int) -> Callable[[], None]:
    """Leave about ``leave`` bytes free; returns what frees the space again."""
    if not device.namespaced:
        # RLIMIT_FSIZE caps each file, not the disk: the slot's model file is what must not fit.
        # Only the soft limit: raising it back up to the (unlimited) hard one needs no privilege.
        pid, infinity = device.process.popen.pid, resource.RLIM_INFINITY
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (max(leave, 64 * 1024), infinity))

        def lift() -> None:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (infinity, infinity))

        return lift
    ballast = device.state / "ballast"
    size = max(0, device.free_bytes() - leave)
    # tmpfs allocates on write: write real bytes (a sparse file would take no space), unbuffered so
    # that "no space" comes from the write that hit it.
    with ballast.open("wb", buffering=0) as f:
        for start in range(0, size, 1 << 20):
            f.write(b"\0" * min(1 << 20, size - start))
        if leave == 0:
            with contextlib.suppress(OSError):  # top up the last pages until the filesystem says no
                while True:
                    f.write(b"\0" * 4096)
    return ballast.unlink


@pytest.mark.timeout(600)  # full mode (EDGEFLEET_RELIABILITY=full) runs more trials
def test_full_state_disk_fails_the_update_cleanly_and_it_completes_once_space_is_freed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    namespaced = _namespaces_allowed()
    mode = "unshare -rm + tmpfs" if namespaced else "RLIMIT_FSIZE fallback (unshare not permitted here)"
    with capsys.disabled():
        print(f"\nfull-disk scenario runs with {mode}")
    cases = CASES if namespaced else CASES[1:2]
    record_ = scenario(f"state disk full ({'tmpfs' if namespaced else 'RLIMIT_FSIZE'})",
                       guards="served version, slots, install reports")  # fmt: skip
    with fleet_site(tmp_path / "site") as site:
        publish_versions(site, tmp_path / "models", width=512)  # ~1 MB per version
        state = FleetState(LocalStore(site.folder / "store"))
        site.start_gateway()
        device = _start(site, namespaced)
        current = "1.0.0"
        revision = site.assign(model=MODEL, version=current, devices=(DEVICE,))
        wait_for("the first install", lambda: record(state, DEVICE, revision, "succeeded"), timeout=60)
        for index in range(trials(len(cases), 3 * len(cases))):
            case = cases[index % len(cases)]
            target = "2.0.0" if current == "1.0.0" else "1.0.0"
            with record_.trial() as trial:
                bundle, slot = _sizes(site, device, target)
                leave = {CASES[0]: bundle // 2, CASES[1]: (bundle + slot) // 2, CASES[2]: 0}[case]
                free_space = _fill(device, leave)
                revision = site.assign(model=MODEL, version=target, devices=(DEVICE,))
                failed = wait_for(f"{case}: the failure reported",
                                  lambda: record(state, DEVICE, revision, "failed"), timeout=60)  # fmt: skip  # noqa: B023
                assert failed.reason == "OutOfSpace", (case, failed)
                assert str(device.state_dir) in failed.message, failed.message  # names the disk
                assert device.process.alive(), device.process.output()[-3000:]
                status = model_status(device.process)
                assert status is not None
                assert status.active_version == current
                assert predict(device.process) == current
                assert verified_on_disk(device.state) == current
                assert not interrupted_writes(device.state), interrupted_writes(device.state)
                free_space()
                freed = time.monotonic()
                wait_for(f"{case}: {target} served once space is free",
                         lambda: serving(device.process, target), timeout=90)  # fmt: skip  # noqa: B023
                trial.recovered(time.monotonic() - freed)
                wait_for("the success reported", lambda: record(state, DEVICE, revision, "succeeded"), timeout=30)  # noqa: B023
                outcomes = {r.outcome for r in records(state, DEVICE, revision)}
                assert outcomes == {"failed", "succeeded"}, outcomes
                assert verified_on_disk(device.state) == target
                wait_for("partials removed", lambda: not partial_downloads(device.state))
                current = target
        device.process.terminate()
    summary = record_.summary()
    print(f"{record_.name}: {summary}")
    assert summary["failures"] == 0
    assert summary["lost"] == 0
