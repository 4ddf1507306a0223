"""One ``edgefleet demo`` run, start to finish.

The run's folder (``STATE``) holds everything: the control plane's state (keys, signed repository
and fleet state in ``store/``, cache, stored objects), the resource files it reconciles
(``resources/``), the gateway PKI (``pki/``), each agent's state (``agents/NAME``) and every
child's log (``logs/``). In order:

1. the embedded control plane (:class:`~edgefleet_operator.local.loop.ControlPlane`, watching the
   resource files) starts in a thread: it optimizes the model per class, signs and publishes;
2. the gateway (mTLS on loopback, free ports) and the agents start as child processes and enroll
   with a bootstrap token of their class;
3. the control plane rolls version 1 out in waves; each agent verifies, installs and serves it,
   while the demo sends the digits test set through each agent's inference API and the agents
   report health through the gateway to the rollout's gates;
4. with a fault, the demo changes what a user or an attacker would (:mod:`.faults`) and watches
   the system react: the verdict comes from what the system did, never from the demo's own logic;
5. the summary and the report are built from what was observed (:class:`~.record.DemoRecord`).

Every wait polls for a condition with a deadline and checks for a stop request (Ctrl-C, SIGTERM),
a dead child and a failed control plane, so the demo never hangs.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from edgefleet_core.resources.edge_model import Variant
from edgefleet_core.store.url import open_store
from edgefleet_operator.demo import faults
from edgefleet_operator.demo.errors import DemoError, DemoSetupError, DemoTimeout, Interrupted
from edgefleet_operator.demo.fleet import (
    AGENT_READY,
    GATEWAY_READY,
    Child,
    Children,
    gateway_addresses,
    inference_address,
)
from edgefleet_operator.demo.inference import InferenceDriver, Sample, VersionStats, load_samples
from edgefleet_operator.demo.observe import DeviceView, FleetWatch
from edgefleet_operator.demo.record import DemoRecord, DeviceRow, TimelineEvent
from edgefleet_operator.demo.resources import DemoResources, default_source, prepare
from edgefleet_operator.demo.summary import class_summary, describe_variant, device_row, device_state, stage_note
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.local.api import LocalApi
from edgefleet_operator.local.loop import ControlPlane, LocalSettings, ModelEvent
from edgefleet_operator.local.state import StateDir

if TYPE_CHECKING:
    from edgefleet_operator.demo.live import LiveView

logger = logging.getLogger(__name__)

GOOD: Final = "1"
"""The version the first rollout publishes (every run starts with an empty repository)."""
BAD: Final = "2"
PHASE_TIMEOUT_S: Final = 240.0
HEALTH_SETTLE_S: Final = 15.0
DEMO_BUCKET: Final = "edgefleet-demo"
"""The bucket the demo uses when S3 settings are in the environment and no store is given."""
_CLASS_IN_MESSAGE: Final = re.compile(r"^class (\S+?):")
_EVENT_KINDS: Final = {
    "VariantPublished": "published",
    "RolloutStarted": "wave",
    "WaveAdvanced": "wave",
    "RolloutSucceeded": "rolled-out",
    "RolledBack": "rolled-back",
    "RolloutFailed": "rollout-failed",
    "RolloutPaused": "paused",
    "RolloutResumed": "resumed",
}
"""The reconciler's Events the demo shows, as timeline kinds."""
_INSTALL_KINDS: Final = {"succeeded": "installed", "rolled_back": "rolled-back", "refused_verification": "refused"}


@dataclass(frozen=True)
class DemoSettings:
    """What one run does; built once from the command line."""

    state: Path
    """The run's folder (new or empty)."""
    out: Path
    """The report's folder."""
    agents: int = 6
    fault: faults.Fault | None = None
    inferences: int = 200
    """Successful inferences each device serves on version 1 before the run goes on."""
    store_url: str | None = None
    """The artifact store; ``None``: ``STATE/store`` (a folder)."""
    resources: Path = field(default_factory=default_source)
    phase_timeout_s: float = PHASE_TIMEOUT_S
    """Longest wait for one step (builds, a rollout, a fault's outcome)."""


@dataclass
class _Device:
    name: str
    device_class: str
    child: Child
    driver: InferenceDriver | None = None

    def serving(self) -> str | None:
        return self.driver.last_version if self.driver is not None else None

    def stats(self) -> dict[str, VersionStats]:
        return self.driver.stats() if self.driver is not None else {}


class DemoSession:
    """Runs the demo: :meth:`run` returns the record; :class:`Interrupted` when ``stop`` is set."""

    def __init__(self, settings: DemoSettings, console: Console, stop: threading.Event) -> None:
        self.settings = settings
        self.console = console
        self.stop_signal = 0
        """The signal that set ``stop`` (the caller's signal handler sets both)."""
        self._stop = stop
        self._started = time.monotonic()
        self._started_at = datetime.now(UTC)
        self._timeline: list[TimelineEvent] = []
        self._timeline_lock = threading.Lock()
        self._devices: list[_Device] = []
        self._good_variants: dict[str, Variant] = {}
        self._notes: list[str] = []
        self._seen_installs: set[tuple[str, int]] = set()
        self._children = Children(settings.state / "logs")
        self._control: ControlPlane | None = None
        self._control_thread: threading.Thread | None = None
        self._control_error: BaseException | None = None
        self._live: LiveView | None = None
        self._samples: tuple[Sample, ...] = ()
        self._model = ""
        self._store_url = ""

    # ------------------------------------------------------------------ the run

    def run(self) -> DemoRecord:
        try:
            resources, watch = self._setup()
            self._bring_up(resources, watch)
            self._serve_first_version(resources, watch)
            ok, verdict = True, f"version {GOOD} rolled out to every device, which served the digits test set"
            if self.settings.fault == "bad-model":
                ok, verdict = self._bad_model(resources, watch)
            elif self.settings.fault == "tampered-artifact":
                ok, verdict = self._tampered(resources, watch)
            self._settle_health(watch)
            return self._record(resources, watch, ok, verdict)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop the traffic, every child and the control plane (idempotent)."""
        if self._control is not None:
            self._control.stop()
        for device in self._devices:
            if device.driver is not None:
                device.driver.stop()
        self._children.stop_all()
        if self._control_thread is not None:
            # The reconcile under way (a build, say) finishes first; its writes are atomic either way.
            self._control_thread.join(timeout=120)

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> tuple[DemoResources, FleetWatch]:
        state = self.settings.state
        if state.exists() and (not state.is_dir() or any(state.iterdir())):
            raise DemoSetupError(f"{state} is not an empty folder: give --state a new folder (every run starts afresh)")
        out = self.settings.out
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.html").is_file())):
            raise DemoSetupError(f"{out} holds files that are not a report: give --out a new folder")
        state.mkdir(parents=True, exist_ok=True)
        resources = prepare(self.settings.resources, state / "resources")
        state_dir = StateDir.at(state)
        self._store_url = self.settings.store_url or default_store_url(state)
        _ensure_bucket(self._store_url)
        settings = LocalSettings(
            paths=(resources.folder,),
            state=state_dir,
            store_url=self._store_url,
            watch=True,
            timeout_s=None,
            # Seconds, not a cluster's minutes: the demo's devices report every half second.
            poll_interval_s=0.3,
            resync_s=1.0,
            rollout_poll_s=0.5,
            workers=2,
        )
        self._control = ControlPlane(settings, on_event=self._on_event)
        self._control_thread = threading.Thread(target=self._run_control, name="demo-control-plane", daemon=True)
        self._control_thread.start()
        self._fleet = FleetState(open_store(self._store_url))
        watch = FleetWatch(
            LocalApi(state_dir.api_dir),
            self._fleet,
            resources.namespace,
            resources.model_name,
            healthy_error_rate=float(resources.edge_model["spec"]["rollout"]["healthGates"]["maxErrorRate"]),
        )
        self._samples = load_samples(str(resources.data_path))
        self._model = resources.model_name
        self.console.print(
            f"[bold]EdgeFleet demo[/bold] in {state} (artifact store {self._store_url})", highlight=False
        )
        return resources, watch

    def _run_control(self) -> None:
        assert self._control is not None
        try:
            self._control.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the main loop, which reports it
            self._control_error = exc

    def _on_event(self, event: ModelEvent) -> None:
        """From the control plane's thread: the reconciler's Events, shown and put on the timeline."""
        kind = _EVENT_KINDS.get(event.reason)
        if kind is None:
            return
        found = _CLASS_IN_MESSAGE.match(event.message)
        self._add(kind, device_class=found.group(1) if found else None, detail=event.message)
        style = "red" if event.type == "Warning" else "cyan"
        self.console.print(f"[{style}]{event.reason}[/{style}] {event.message}", highlight=False)

    def _add(self, kind: str, *, device_class: str | None = None, device: str | None = None,
             version: str | None = None, detail: str = "") -> None:  # fmt: skip
        event = TimelineEvent(time.monotonic() - self._started, kind, device_class, device, version, detail)
        with self._timeline_lock:
            self._timeline.append(event)

    # ------------------------------------------------------------------ waiting

    def _check(self) -> None:
        """Raise when the run must end: a stop request, a failed control plane, a dead child."""
        if self._stop.is_set():
            raise Interrupted(self.stop_signal)
        if self._control_error is not None:
            raise DemoError(f"the control plane stopped: {self._control_error}")
        if self._control_thread is not None and not self._control_thread.is_alive():
            raise DemoError("the control plane stopped")
        self._children.check_alive()

    def _wait(self, what: str, done: Callable[[], bool], tick: Callable[[], None], every: float = 0.25) -> None:
        deadline = time.monotonic() + self.settings.phase_timeout_s
        while True:
            self._check()
            tick()
            if done():
                return
            if time.monotonic() > deadline:
                raise DemoTimeout(f"timed out after {self.settings.phase_timeout_s:.0f} s waiting for {what}")
            self._stop.wait(every)

    # ------------------------------------------------------------------ bring-up: build, publish, enroll

    def _bring_up(self, resources: DemoResources, watch: FleetWatch) -> None:
        from edgefleet_operator.gateway.pki import init_pki  # noqa: PLC0415 - cryptography only when run

        pki = self.settings.state / "pki"
        init_pki(pki, ["localhost", "127.0.0.1"])
        gateway = self._children.start(
            "gateway",
            ["gateway", "serve", "--store", self._store_url, "--pki", str(pki), "--listen", "127.0.0.1:0",
             "--enroll-listen", "127.0.0.1:0", "--poll-interval", "0.1", "--status-interval", "0.5",
             "--heartbeat-interval", "1"],
            GATEWAY_READY,
        )  # fmt: skip
        classes = [c.name for c in resources.classes]
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())  # fmt: skip
        with Progress(*columns, console=self.console) as progress:
            builds = {name: progress.add_task(f"optimize, sign, publish for {name}", total=1) for name in classes}
            enrolled = progress.add_task(f"start and enroll {self.settings.agents} agents", total=self.settings.agents)
            trusted_root = StateDir.at(self.settings.state).trusted_root
            self._wait("the signed repository's root", trusted_root.is_file, lambda: None)
            self._children.wait_ready([gateway], tick=self._check)
            self._start_agents(resources, gateway, trusted_root)

            def ready() -> bool:
                watch.poll([d.name for d in self._devices])
                published = [name for name in classes if (v := watch.variant(name)) is not None and v.version == GOOD]
                for name in published:
                    progress.update(builds[name], completed=1)
                progress.update(enrolled, completed=self._enroll())
                return len(published) == len(classes) and all(d.driver is not None for d in self._devices)

            self._wait("every class's variant published and every agent enrolled", ready, lambda: None)
        for name in classes:
            if (variant := watch.variant(name)) is not None:
                self.console.print(f"  {describe_variant(variant)}", highlight=False)

    def _start_agents(self, resources: DemoResources, gateway: Child, trusted_root: Path) -> None:
        fleet_address, enroll_address = gateway_addresses(gateway)
        members: list[tuple[str, str, dict[str, str]]] = []
        for index in range(self.settings.agents):
            demo_class = resources.classes[index % len(resources.classes)]
            number = sum(1 for m in members if m[1] == demo_class.name) + 1
            members.append((f"{demo_class.name}-{number}", demo_class.name, demo_class.labels))
        # One token per class, good for exactly its devices: an agent joins the class its token names.
        tokens = {
            name: self._fleet.create_token(
                resources.namespace, name, ttl=timedelta(hours=1), uses=sum(1 for m in members if m[1] == name)
            )
            for name in {m[1] for m in members}
        }
        ca = self.settings.state / "pki" / "ca.pem"
        for name, device_class, labels in members:
            child = self._children.start(
                name,
                ["agent", "run", "--state", str(self.settings.state / "agents" / name), "--gateway", fleet_address,
                 "--enroll-gateway", enroll_address, "--gateway-ca", str(ca), "--tuf-root", str(trusted_root),
                 "--name", name, "--inference-listen", "127.0.0.1:0", "--heartbeat-interval", "0.5",
                 *[a for k, v in labels.items() for a in ("--label", f"{k}={v}")]],
                AGENT_READY,
                env={"EDGEFLEET_AGENT_TOKEN": tokens[device_class]},  # not on the command line, where ps shows it
            )  # fmt: skip
            self._devices.append(_Device(name, device_class, child))

    def _enroll(self) -> int:
        """Start the traffic to every agent that became ready; how many are ready."""
        for device in self._devices:
            if device.driver is None and device.child.poll_ready():
                device.driver = InferenceDriver(
                    device.name, inference_address(device.child), self._samples, model_name=self._model
                )
                device.driver.start()
                self._add("enrolled", device_class=device.device_class, device=device.name)
        return sum(1 for d in self._devices if d.driver is not None)

    # ------------------------------------------------------------------ version 1 everywhere

    def _serve_first_version(self, resources: DemoResources, watch: FleetWatch) -> None:
        classes = [c.name for c in resources.classes if self._class_devices(c.name)]

        def done() -> bool:
            return all(watch.rolled_out(c, GOOD) for c in classes) and all(
                d.driver is not None and d.driver.successes_on(GOOD) >= self.settings.inferences for d in self._devices
            )

        self._watching(f"version {GOOD} rolled out and {self.settings.inferences} inferences per device", done, watch)
        for name in classes:
            if (variant := watch.variant(name)) is not None and variant.version == GOOD:
                self._good_variants[name] = variant

    def _watching(self, what: str, done: Callable[[], bool], watch: FleetWatch) -> None:
        """Wait for ``done`` with the live device table on screen."""
        from edgefleet_operator.demo.live import LiveView  # noqa: PLC0415 - the renderer, when it runs

        with LiveView(self.console) as live:
            self._live = live
            try:
                self._wait(what, done, lambda: self._refresh(watch))
                self._refresh(watch)
            finally:
                self._live = None

    def _class_devices(self, device_class: str) -> list[_Device]:
        return [d for d in self._devices if d.device_class == device_class]

    def _refresh(self, watch: FleetWatch) -> None:
        watch.poll([d.name for d in self._devices])
        self._note_installs(watch)
        parts = []
        for device_class in sorted({d.device_class for d in self._devices}):
            rollout = watch.rollout(device_class)
            if rollout is not None:
                wave = f" wave {rollout.wave}/{rollout.waves}" if rollout.wave and rollout.waves else ""
                parts.append(f"{device_class}: version {rollout.version} {rollout.phase}{wave} "
                             f"({rollout.updated or 0}/{rollout.devices or 0} updated)")  # fmt: skip
        if self._live is not None:
            self._live.update(self._rows(watch), "; ".join(parts))

    def _note_installs(self, watch: FleetWatch) -> None:
        """Each install report becomes one timeline entry."""
        for device in self._devices:
            view = watch.devices.get(device.name)
            for revision, record in view.installs.items() if view is not None else ():
                if (device.name, revision) not in self._seen_installs:
                    self._seen_installs.add((device.name, revision))
                    self._add(_INSTALL_KINDS.get(record.outcome, "install-failed"), device_class=device.device_class,
                              device=device.name, version=record.to_version,
                              detail=f"{record.reason}: {record.message}"[:300])  # fmt: skip

    def _rows(self, watch: FleetWatch) -> list[DeviceRow]:
        return [
            device_row(
                d.name,
                d.device_class,
                device_state(d.child.match is not None, watch.devices.get(d.name), d.serving()),
                d.stats(),
                d.serving(),
            )
            for d in self._devices
        ]

    # ------------------------------------------------------------------ faults

    def _bad_model(self, resources: DemoResources, watch: FleetWatch) -> tuple[bool, str]:
        model, data = faults.write_bad_model(resources.model_path, resources.data_path, resources.model_path.parent)
        relative = f"file://./{resources.model_path.parent.name}"
        self.console.print(
            f"[bold yellow]fault bad-model[/bold yellow]: version {BAD} renames the model's input to "
            f"{faults.BAD_INPUT_NAME!r}; the applications on the devices still send 'input'",
            highlight=False,
        )
        self._add("fault", detail=f"bad-model: the EdgeModel's source changes; version {BAD} renames the input")
        resources.write_edge_model(
            faults.bad_model_spec(
                resources.edge_model,
                f"{relative}/{model.name}",
                faults.sha256_of(model),
                f"{relative}/{data.name}",
                faults.sha256_of(data),
            )
        )
        classes = {d.device_class for d in self._devices}

        def rolled_back() -> bool:
            ended = {c for c in classes if (r := watch.rollout(c)) is not None and r.version == BAD
                     and r.phase in ("RolledBack", "Failed", "Succeeded")}  # fmt: skip
            canaries = [d for d in self._devices if BAD in self._view(watch, d).ever_installed]
            return ended == classes and all(d.serving() == GOOD and self._assigned(watch, d) == GOOD for d in canaries)

        self._watching(f"version {BAD}'s rollout to end", rolled_back, watch)
        for name in sorted(classes):
            if (rollout := watch.rollout(name)) is not None and rollout.message:
                self._notes.append(f"{name}: {rollout.message}")
        verdict = faults.judge_bad_model(
            self._outcomes(watch),
            good=GOOD,
            bad=BAD,
            rolled_back_classes={c for c in classes if (r := watch.rollout(c)) is not None and r.phase == "RolledBack"},
            classes=classes,
        )
        return verdict.ok, verdict.text

    def _tampered(self, resources: DemoResources, watch: FleetWatch) -> tuple[bool, str]:
        retrained = faults.write_retrained_model(resources.model_path, resources.model_path.parent)
        relative = f"file://./{resources.model_path.parent.name}/{retrained.name}"
        paused = faults.tampered_spec(resources.edge_model, relative, faults.sha256_of(retrained))
        self.console.print(
            f"[bold yellow]fault tampered-artifact[/bold yellow]: version {BAD} is published paused; then bytes of "
            "its payloads are flipped in the artifact store and its rollout resumes, to every device at once",
            highlight=False,
        )
        resources.write_edge_model(paused)
        classes = {d.device_class for d in self._devices}

        def published() -> bool:
            watch.poll([d.name for d in self._devices])
            return watch.current() and all((v := watch.variant(c)) is not None and v.version == BAD for c in classes)

        self._wait(f"version {BAD} to be published, paused", published, lambda: None)
        tampered = faults.tamper_version(open_store(self._store_url), resources.namespace, resources.model_name, BAD)
        if not tampered:
            return False, f"no payload of version {BAD} was found in the artifact store to tamper with"
        self._add("fault", detail=f"tampered-artifact: flipped bytes in {len(tampered)} payload(s) of version {BAD}")
        self.console.print(f"  flipped bytes in {len(tampered)} signed payload(s) of version {BAD}", highlight=False)
        resources.write_edge_model(faults.resumed(paused))

        def reported() -> bool:
            reports = [self._view(watch, d).report_for(BAD) for d in self._devices]
            if any(r is not None and r.outcome == "succeeded" for r in reports):
                return True  # a device took the tampered version: the verdict is already clear
            return all(r is not None for r in reports) and all(d.serving() == GOOD for d in self._devices)

        self._watching(f"every device's install report on version {BAD}", reported, watch)
        reasons = sorted({r.reason for d in self._devices if (r := self._view(watch, d).report_for(BAD)) is not None})
        self._notes.append(f"install reports on version {BAD}: {', '.join(reasons) or 'none'}")
        verdict = faults.judge_tampered(self._outcomes(watch), good=GOOD, bad=BAD)
        return verdict.ok, verdict.text

    def _view(self, watch: FleetWatch, device: _Device) -> DeviceView:
        return watch.devices.get(device.name) or DeviceView()

    def _assigned(self, watch: FleetWatch, device: _Device) -> str | None:
        assignment = self._view(watch, device).assignment
        return assignment.version if assignment is not None else None

    def _outcomes(self, watch: FleetWatch) -> list[faults.DeviceOutcome]:
        outcomes = []
        for device in self._devices:
            view = self._view(watch, device)
            report = view.report_for(BAD)
            outcomes.append(
                faults.DeviceOutcome(
                    name=device.name,
                    assigned_bad=BAD in view.ever_installed,
                    install_outcome=report.outcome if report is not None else None,
                    assigned_now=self._assigned(watch, device),
                    serving=device.serving(),
                )
            )
        return outcomes

    def _settle_health(self, watch: FleetWatch, within_s: float = HEALTH_SETTLE_S) -> None:
        """Give the agents' next health reports a moment to reach the fleet state (after a rollback they lag).

        Not a condition of success: the summary shows what the fleet reports when the moment is over.
        """
        deadline = time.monotonic() + within_s
        classes = {d.device_class for d in self._devices}
        while time.monotonic() < deadline:
            self._check()
            watch.poll([d.name for d in self._devices])
            healthy = {c: (h.devices_healthy if (h := watch.health.get((c, GOOD))) else 0) for c in classes}
            if all(healthy[c] >= len(self._class_devices(c)) for c in classes):
                return
            self._stop.wait(0.25)

    # ------------------------------------------------------------------ the record

    def _record(self, resources: DemoResources, watch: FleetWatch, ok: bool, verdict: str) -> DemoRecord:
        source_bytes = resources.model_path.stat().st_size
        summaries = []
        notes = []
        for name, variant in sorted(self._good_variants.items()):
            devices = self._class_devices(name)
            served = [s for d in devices if (s := d.stats().get(GOOD)) is not None]
            summaries.append(
                class_summary(
                    variant,
                    source_bytes=source_bytes,
                    served=served,
                    devices_total=len(devices),
                    health=watch.health.get((name, GOOD)),
                    build=(
                        self._control.build_summary(resources.namespace, resources.model_name, name)
                        if self._control is not None
                        else None
                    ),
                )
            )
            if (note := stage_note(name, served)) is not None:
                notes.append(note)
        with self._timeline_lock:
            timeline = tuple(self._timeline)
        return DemoRecord(
            started_at=self._started_at,
            fault=self.settings.fault,
            classes=tuple(summaries),
            devices=tuple(self._rows(watch)),
            timeline=timeline,
            ok=ok,
            verdict=verdict,
            notes=(*notes, *self._notes),
        )


def default_store_url(state: Path, environ: Mapping[str, str] | None = None) -> str:
    """``s3://edgefleet-demo/<run folder name>`` when an S3 endpoint is in the environment, else ``STATE/store``."""
    from edgefleet_core.store.url import ENDPOINT_VARIABLES  # noqa: PLC0415 - next to its only use

    env = os.environ if environ is None else environ
    if any(env.get(name) for name in ENDPOINT_VARIABLES):
        return f"s3://{DEMO_BUCKET}/{state.name}"
    return StateDir.at(state).store_url


def _ensure_bucket(store_url: str) -> None:
    """Create the demo's bucket on a fresh MinIO or S3 endpoint (a folder store needs nothing)."""
    from minio.error import MinioException  # noqa: PLC0415
    from urllib3.exceptions import HTTPError  # noqa: PLC0415

    from edgefleet_core.errors import StoreError  # noqa: PLC0415
    from edgefleet_core.store.s3 import S3Store  # noqa: PLC0415

    try:
        store = open_store(store_url)
        if isinstance(store, S3Store) and not store.client.bucket_exists(store.bucket):
            store.client.make_bucket(store.bucket)
    except (StoreError, MinioException, HTTPError, OSError, ValueError) as exc:
        raise DemoSetupError(f"cannot use the artifact store {store_url}: {exc}") from None
