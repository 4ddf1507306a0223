"""Applying assignments: verified download into the inactive A/B slot, trial, self-test, commit or roll back.

One install, phase by phase (each timed, ``cancelled()`` checked between them so a newer revision
supersedes this one):

1. *verify* — the assignment's first target must be this model's manifest for this device class;
   TUF metadata is refreshed and the manifest target's signed sha256 must equal the assignment's.
2. *download* — :func:`fetch_bundle` downloads every payload through TUF (length and hash from
   signed metadata), as a delta against the active version when one was published, decodes it
   and checks the decoded files against the signed manifest.
3. *decode* — the files and manifest are published into the inactive slot and read back verified.
4. *activate* — the pointer names the new slot as an uncommitted trial (atomic, durable).
5. *self_test* — sessions are created and the manifest's golden inputs run; on success the
   pointer is committed and the runtime swaps to the new sessions; on failure the pointer goes
   back to the previous slot and nothing ever served the new version.

A process that dies during a trial leaves an uncommitted pointer: :meth:`Updater.recover` rolls it
back at start-up. Trials are counted in ``STATE/updater.json`` per (model, revision) before the
self-test, so a version that kills the process in its self-test is given up after
:data:`CRASH_LOOP_ATTEMPTS` tries ("CrashLoop") instead of being retried forever.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from tuf.api.exceptions import DownloadError, DownloadLengthMismatchError, ExpiredMetadataError

from edgefleet_agent.assignments import AssignmentSpec, InstallResult, Outcome, Phase, SlotName
from edgefleet_agent.errors import InstallFailed, ModelLoadError, SlotCorrupt, SlotError
from edgefleet_agent.runtime import LoadedModel, ModelRuntime
from edgefleet_agent.slots import ModelSlots, SlotPointer, SlotStore, VerifiedSlot, other_slot
from edgefleet_core.atomic import write_file_atomic
from edgefleet_core.bundle.distribution import MANIFEST, BundleRef, fetch_bundle
from edgefleet_core.bundle.manifest import MAX_MANIFEST_BYTES, BundleManifest, parse_manifest
from edgefleet_core.errors import BundleError, BundleVerificationError, VerificationError
from edgefleet_core.failpoints import failpoint
from edgefleet_core.signing.client import TufClient

log = logging.getLogger(__name__)

CRASH_LOOP_ATTEMPTS: Final = 3
"""Trials of one (model, revision) that may end with the process gone before it is reported failed."""
ATTEMPTS_FILE: Final = "updater.json"
_OUT_OF_SPACE: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""A full disk, a quota, or a file-size limit (RLIMIT_FSIZE): all "make room", none a bug."""
MAX_ATTEMPTS_BYTES: Final = 1 << 20


def _never() -> bool:
    return False


def _now() -> datetime:
    return datetime.now(UTC)


class _Attempts:
    """Trials started per (model, revision), persisted so they survive the process they may kill."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._counts: dict[str, int] = {}
        try:
            data = path.read_bytes()
            loaded = json.loads(data) if len(data) <= MAX_ATTEMPTS_BYTES else {}
            counts = loaded.get("attempts", {}) if isinstance(loaded, dict) else {}
            self._counts = {str(k): int(v) for k, v in counts.items() if isinstance(v, int)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            # Losing the counters only means a crash-looping version gets three more tries.
            log.warning("cannot read %s (%s); trial counters start again", path, exc)

    @staticmethod
    def key(namespace: str, name: str, revision: int) -> str:
        return f"{namespace}/{name}@{revision}"

    def get(self, namespace: str, name: str, revision: int) -> int:
        return self._counts.get(self.key(namespace, name, revision), 0)

    def bump(self, namespace: str, name: str, revision: int) -> None:
        key = self.key(namespace, name, revision)
        self._counts[key] = self._counts.get(key, 0) + 1
        self._save()

    def clear(self, namespace: str, name: str) -> None:
        prefix = f"{namespace}/{name}@"
        if any(k.startswith(prefix) for k in self._counts):
            self._counts = {k: v for k, v in self._counts.items() if not k.startswith(prefix)}
            self._save()

    def _save(self) -> None:
        try:
            write_file_atomic(self._path, json.dumps({"attempts": self._counts}, sort_keys=True).encode())
        except OSError as exc:
            # A full disk: the counters live on in memory; only a crash loop across restarts goes uncounted.
            log.warning("cannot write %s (%s); trial counters kept in memory", self._path, exc)


@dataclass
class _Run:
    """Timing and bookkeeping of one apply()."""

    assignment: AssignmentSpec
    from_version: str = ""
    durations: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    current: Phase = "download"
    """The phase running (or the last one that ran): what a failure without a phase of its own reports."""

    @contextlib.contextmanager
    def phase(self, name: Phase) -> Iterator[None]:
        self.current = name
        started = time.perf_counter()
        try:
            yield
        finally:
            self.durations[name] = self.durations.get(name, 0.0) + time.perf_counter() - started

    def result(
        self,
        outcome: Outcome,
        reason: str,
        message: str,
        phase: Phase | None,
        active_slot: SlotName | None,
    ) -> InstallResult:
        a = self.assignment
        if outcome != "succeeded" and phase is None:
            phase = self.current  # the gateway requires a phase for every failure
        return InstallResult(
            revision=a.revision,
            model_namespace=a.model_namespace,
            model_name=a.model_name,
            from_version=self.from_version,
            to_version=a.version,
            outcome=outcome,
            reason=reason,
            message=message,
            failed_phase=phase,
            durations={**self.durations, "total": time.perf_counter() - self.started},
            active_slot=active_slot,
            finished_at=_now(),
        )


def _verification_failure(exc: VerificationError, phase: Phase) -> InstallFailed:
    """Transport failures are retryable ``failed``; anything TUF refused is ``refused_verification``.

    Told apart by the python-tuf exception :class:`VerificationError` was raised from: a
    ``DownloadError`` is the transport (except a length overrun, which is the data being wrong),
    a ``RepositoryError`` is the repository's data refused — except expired metadata, ``failed``
    with reason ``MetadataExpired`` (retried: fresh metadata fixes it). Without one, our own code
    refused it (a target not in the signed metadata).
    """
    cause = exc.__cause__
    if cause is None:
        return InstallFailed("refused_verification", "NotPublished", str(exc), phase)
    if isinstance(cause, ExpiredMetadataError):
        # Nothing is wrong with the bundle: the repository's signatures are out of date (a control
        # plane that stopped renewing them, or a frozen mirror). Refused now, retried later: fresh
        # metadata, once published, lets the same revision through.
        return InstallFailed("failed", "MetadataExpired", str(exc), "verify")
    if isinstance(cause, DownloadError) and not isinstance(cause, DownloadLengthMismatchError):
        return InstallFailed("failed", "DownloadFailed", str(exc), "download")
    return InstallFailed("refused_verification", type(cause).__name__, str(exc), phase)


class Updater:
    """Applies assignments to this device's models (one at a time) and keeps the runtime in step."""

    def __init__(
        self, state_dir: Path, device_class: str, runtime: ModelRuntime, tuf_client: Callable[[], TufClient]
    ) -> None:
        self.state_dir = state_dir
        self.device_class = device_class
        self.runtime = runtime
        self._tuf_client = tuf_client
        self._slots = SlotStore(state_dir / "models")
        self._attempts = _Attempts(state_dir / ATTEMPTS_FILE)
        self._lock = threading.Lock()

    # --- start-up ------------------------------------------------------------------------------

    def recover(self) -> list[InstallResult]:
        """Roll back uncommitted trials, verify and load committed versions; CrashLoop results to report."""
        results: list[InstallResult] = []
        with self._lock:
            for slots in self._slots.models():
                leftovers = slots.clear_leftovers()
                if leftovers:
                    log.info("[%s/%s] removed leftovers of an interrupted write: %s", *self._id(slots), leftovers)
                try:
                    crash_loop = self._recover_model(slots)
                except (SlotError, OSError) as exc:
                    log.error("[%s/%s] cannot be served: %s", *self._id(slots), exc)
                    self.runtime.mark_unavailable(slots.namespace, slots.name)
                    continue
                if crash_loop is not None:
                    self.runtime.metrics.update(crash_loop)
                    results.append(crash_loop)
        return results

    @staticmethod
    def _id(slots: ModelSlots) -> tuple[str, str]:
        return slots.namespace, slots.name

    def _recover_model(self, slots: ModelSlots) -> InstallResult | None:
        pointer = slots.pointer()
        crash_loop = None
        if pointer.trial is not None:
            trial = pointer.trial
            pointer = slots.abort_trial()
            log.warning("[%s/%s] rolled back trial of %s: the agent stopped during it", *self._id(slots), trial.version)
            tries = self._attempts.get(slots.namespace, slots.name, trial.revision)
            if tries >= CRASH_LOOP_ATTEMPTS:
                crash_loop = self._crash_loop_result(slots, trial.revision, trial.version, pointer)
        if pointer.active_slot is None or pointer.active_version is None:
            self.runtime.mark_unavailable(slots.namespace, slots.name)
            return crash_loop
        active = self._verified_or_none(slots, pointer.active_slot, pointer.active_version)
        if active is None and pointer.previous_slot is not None and pointer.previous_version is not None:
            active = self._verified_or_none(slots, pointer.previous_slot, pointer.previous_version)
            if active is not None:
                log.warning("[%s/%s] falling back to %s", *self._id(slots), pointer.previous_version)
                pointer = slots.fall_back()
        if active is None:
            slots.write_pointer(SlotPointer())
            self.runtime.mark_unavailable(slots.namespace, slots.name)
            return crash_loop
        try:
            self.runtime.activate(self._load(slots, active))
        except ModelLoadError as exc:
            log.error("[%s/%s] cannot load %s: %s", *self._id(slots), active.manifest.version, exc)
            self.runtime.mark_unavailable(slots.namespace, slots.name)
            return crash_loop
        self._load_previous(slots, pointer)
        return crash_loop

    def _verified_or_none(self, slots: ModelSlots, slot: SlotName, version: str) -> VerifiedSlot | None:
        try:
            return slots.verify(slot, version)
        except SlotCorrupt as exc:
            log.error("[%s/%s] slot %s is not served: %s", *self._id(slots), slot, exc.problem)
            return None

    def _load(self, slots: ModelSlots, verified: VerifiedSlot) -> LoadedModel:
        return self.runtime.load(
            slots.namespace,
            slots.name,
            verified.manifest.version,
            verified.files,
            slot=verified.slot,
            manifest=verified.manifest,
        )

    def _load_previous(self, slots: ModelSlots, pointer: SlotPointer) -> None:
        """Keep the rollback version loaded so requests that pin it keep working (best effort)."""
        if pointer.previous_slot is None or pointer.previous_version is None:
            return
        verified = self._verified_or_none(slots, pointer.previous_slot, pointer.previous_version)
        if verified is None:
            return
        try:
            self.runtime.set_previous(slots.namespace, slots.name, self._load(slots, verified))
        except ModelLoadError as exc:
            log.warning("[%s/%s] previous version %s not loaded: %s", *self._id(slots), pointer.previous_version, exc)

    def _crash_loop_result(self, slots: ModelSlots, revision: int, version: str, pointer: SlotPointer) -> InstallResult:
        return InstallResult(
            revision=revision,
            model_namespace=slots.namespace,
            model_name=slots.name,
            from_version=pointer.active_version or "",
            to_version=version,
            outcome="failed",
            reason="CrashLoop",
            message=f"the agent stopped during the self-test of {version} {CRASH_LOOP_ATTEMPTS} times",
            failed_phase="self_test",
            durations={"total": 0.0},
            active_slot=pointer.active_slot,
            finished_at=_now(),
        )

    # --- assignments ---------------------------------------------------------------------------

    def installed(self) -> list[tuple[str, str, str]]:
        """(namespace, name, active version) of every model with a committed version on disk.

        Does not wait for an apply in progress: pointers are replaced atomically, so each read is
        a committed state, and a trial is reported as the version it started from.
        """
        found: list[tuple[str, str, str]] = []
        try:
            models = self._slots.models()
        except OSError as exc:
            log.warning("cannot list the installed models: %s", exc)
            return found
        for slots in models:
            try:
                pointer = slots.pointer()
            except SlotError:
                continue
            version = pointer.previous_version if pointer.trial is not None else pointer.active_version
            if version is not None:
                found.append((slots.namespace, slots.name, version))
        return found

    def apply(self, assignment: AssignmentSpec, cancelled: Callable[[], bool] = _never) -> InstallResult:
        """Bring one model to the assignment's state; never raises for an install failure.

        Every outcome is recorded in the runtime's metrics (``edgefleet_agent_updates_total``).
        """
        result = self._apply(assignment, cancelled)
        self.runtime.metrics.update(result)
        return result

    def _apply(self, assignment: AssignmentSpec, cancelled: Callable[[], bool]) -> InstallResult:
        run = _Run(assignment)
        with self._lock:
            try:
                slots = self._slots.model(assignment.model_namespace, assignment.model_name)
            except SlotError as exc:
                return run.result("failed", "InvalidAssignment", str(exc), "download", None)
            try:
                pointer = slots.abort_trial()  # a trial only survives here if recover() was not called
                run.from_version = pointer.active_version or ""
                if assignment.action == "remove":
                    return self._remove(slots, run)
                if assignment.action == "rollback":
                    return self._rollback(slots, pointer, run, cancelled)
                return self._install(slots, pointer, run, cancelled)
            except InstallFailed as failure:
                active = self._committed_slot(slots)
                log.warning(
                    "[%s/%s] revision %d (%s) %s: %s",
                    *self._id(slots),
                    assignment.revision,
                    assignment.version,
                    failure.outcome,
                    failure,
                )
                return run.result(failure.outcome, failure.reason, failure.message, failure.phase, active)
            except (SlotError, OSError) as exc:
                full = getattr(exc, "errno", None) in _OUT_OF_SPACE
                reason = "OutOfSpace" if full else "StateWriteFailed"
                message = f"the state folder {self.state_dir} is full: {exc}" if full else str(exc)
                phase: Phase = "decode" if run.current == "download" else run.current
                return run.result("failed", reason, message, phase, self._committed_slot(slots))

    @staticmethod
    def _committed_slot(slots: ModelSlots) -> SlotName | None:
        try:
            return slots.pointer().active_slot
        except SlotError:
            return None

    def _serving(self, slots: ModelSlots, version: str) -> bool:
        active = self.runtime.active(slots.namespace, slots.name)
        return active is not None and active.version == version

    def _remove(self, slots: ModelSlots, run: _Run) -> InstallResult:
        self.runtime.unload(slots.namespace, slots.name)
        slots.remove()
        self._attempts.clear(slots.namespace, slots.name)
        log.info("[%s/%s] removed", *self._id(slots))
        return run.result("succeeded", "Removed", "model removed from this device", None, None)

    def _rollback(
        self, slots: ModelSlots, pointer: SlotPointer, run: _Run, cancelled: Callable[[], bool]
    ) -> InstallResult:
        version = run.assignment.version
        if pointer.active_version == version and self._serving(slots, version):
            return run.result("succeeded", "AlreadyActive", f"{version} is already active", None, pointer.active_slot)
        if pointer.active_slot is not None:
            other = other_slot(pointer.active_slot)
            held = slots.manifest(other)
            if held is not None and held.version == version:
                with run.phase("verify"):
                    verified = self._verified_or_none(slots, other, version)
                if verified is not None:
                    return self._trial(slots, verified, run, "SwitchedToPrevious")
        # The version is not held (or its slot is damaged): install it like any other.
        return self._install(slots, pointer, run, cancelled)

    def _install(
        self, slots: ModelSlots, pointer: SlotPointer, run: _Run, cancelled: Callable[[], bool]
    ) -> InstallResult:
        a = run.assignment
        if pointer.active_version == a.version and self._serving(slots, a.version):
            return run.result("succeeded", "AlreadyActive", f"{a.version} is already active", None, pointer.active_slot)
        manifest_path = f"{self.device_class}/{a.model_namespace}/{a.model_name}/{a.version}/{MANIFEST}"
        if not a.target_paths or a.target_paths[0] != manifest_path:
            first = a.target_paths[0] if a.target_paths else None
            raise InstallFailed(
                "refused_verification", "WrongTargetPath", f"expected {manifest_path}, got {first}", "verify"
            )
        if self._attempts.get(a.model_namespace, a.model_name, a.revision) >= CRASH_LOOP_ATTEMPTS:
            message = f"the agent stopped during the self-test of {a.version} {CRASH_LOOP_ATTEMPTS} times"
            raise InstallFailed("failed", "CrashLoop", message, "self_test")
        free = shutil.disk_usage(self.state_dir if self.state_dir.exists() else self.state_dir.parent).free
        if free < a.bundle_length:
            message = f"{free} bytes free in the state folder {self.state_dir}, the bundle needs {a.bundle_length}"
            raise InstallFailed("failed", "OutOfSpace", message, "download")
        self._check(cancelled)
        client = self._tuf_client()
        with run.phase("verify"):
            full_manifest = self._verified_manifest(client, manifest_path, a.bundle_sha256)
        self._check(cancelled)
        base = self._delta_base(slots, pointer)
        try:
            with run.phase("download"):
                fetched = fetch_bundle(
                    client,
                    BundleRef(a.model_namespace, a.model_name, self.device_class, a.version),
                    base=base,
                    refresh=False,  # refreshed once above: the manifest and payloads come from one snapshot
                    full_manifest=full_manifest,
                )
        except VerificationError as exc:
            raise _verification_failure(exc, "download") from None
        except BundleVerificationError as exc:
            raise InstallFailed("refused_verification", "DigestMismatch", str(exc), "verify") from None
        except BundleError as exc:
            raise InstallFailed("failed", "BundleInvalid", str(exc), "decode") from None
        self.runtime.metrics.downloaded(fetched.transferred_bytes, delta=fetched.delta)
        self._check(cancelled)
        target = slots.inactive_slot()
        with run.phase("decode"):
            failpoint("agent.update.decode")  # decoded and checked in memory; the slot not yet written
            self.runtime.forget_slot(a.model_namespace, a.model_name, target)  # its version is overwritten now
            slots.write_slot(target, fetched.manifest, dict(fetched.files))
            try:
                verified = slots.verify(target, a.version)
            except SlotCorrupt as exc:
                raise InstallFailed("failed", "SlotCorrupt", str(exc), "decode") from None
        self._check(cancelled)
        how = "a delta" if fetched.delta else "in full"
        log.info("[%s/%s] %s fetched %s into slot %s", *self._id(slots), a.version, how, target)
        return self._trial(slots, verified, run, "Installed")

    @staticmethod
    def _check(cancelled: Callable[[], bool]) -> None:
        if cancelled():
            raise InstallFailed("failed", "Superseded", "a newer assignment revision replaced this one", "download")

    @classmethod
    def _verified_manifest(cls, client: TufClient, path: str, bundle_sha256: str) -> BundleManifest:
        """Refresh metadata once, then fetch the full manifest whose bytes must hash to ``bundle_sha256``."""
        try:
            client.refresh()
        except VerificationError as exc:
            raise _verification_failure(exc, "verify") from None
        cls._verify_target(client, path, bundle_sha256)
        try:
            data = client.download(path, max_length=MAX_MANIFEST_BYTES)
        except VerificationError as exc:
            raise _verification_failure(exc, "verify") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != bundle_sha256:
            message = f"{path}: the manifest's bytes hash to {actual}, not the assignment's {bundle_sha256}"
            raise InstallFailed("refused_verification", "BundleDigestMismatch", message, "verify")
        try:
            return parse_manifest(data)
        except BundleError as exc:
            raise InstallFailed("refused_verification", "BundleInvalid", str(exc), "verify") from None

    @staticmethod
    def _verify_target(client: TufClient, path: str, bundle_sha256: str) -> None:
        try:
            info = client.target_info(path)
        except VerificationError as exc:
            raise _verification_failure(exc, "verify") from None
        if info is None:
            raise InstallFailed(
                "refused_verification", "NotPublished", f"{path} is not in the signed targets", "verify"
            )
        signed = info.hashes.get("sha256")
        if signed != bundle_sha256:
            message = f"{path}: signed sha256 {signed} is not the assignment's {bundle_sha256}"
            raise InstallFailed("refused_verification", "BundleDigestMismatch", message, "verify")

    def _delta_base(self, slots: ModelSlots, pointer: SlotPointer) -> tuple[str, dict[str, bytes]] | None:
        """The active version's verified files: what a delta bundle is decoded against."""
        if pointer.active_slot is None or pointer.active_version is None:
            return None
        verified = self._verified_or_none(slots, pointer.active_slot, pointer.active_version)
        return None if verified is None else (verified.manifest.version, verified.files)

    def _trial(self, slots: ModelSlots, verified: VerifiedSlot, run: _Run, success: str) -> InstallResult:
        """Activate ``verified`` as a trial, self-test it, then commit and swap, or roll back."""
        a = run.assignment
        version = verified.manifest.version
        with run.phase("activate"):
            failpoint("agent.update.switch")  # the slot is written and verified; the pointer not yet flipped
            # Counted before the trial starts: if the self-test takes the process down, recover() sees it.
            self._attempts.bump(a.model_namespace, a.model_name, a.revision)
            slots.begin_trial(verified.slot, version, a.revision)
            failpoint("agent.update.switched")  # the pointer names the new slot, as an uncommitted trial
        unexpected = False
        try:
            with run.phase("self_test"):
                try:
                    loaded = self._load(slots, verified)
                    failpoint("agent.update.selftest")  # sessions created, golden inputs not yet run
                    failure = self.runtime.self_test(loaded, verified.manifest.self_test)
                except ModelLoadError as exc:
                    raise InstallFailed("rolled_back", "SelfTestLoad", str(exc), "self_test") from None
                except Exception as exc:
                    # Whatever a model makes ONNX Runtime or our checks raise must not take the agent
                    # down; the version is refused like any other that fails its self-test.
                    unexpected = True
                    log.exception("[%s/%s] self-test of %s raised", *self._id(slots), version)
                    message = f"{type(exc).__name__}: {exc}"
                    raise InstallFailed("rolled_back", "SelfTestError", message, "self_test") from exc
                if failure is not None:
                    raise InstallFailed("rolled_back", failure.reason, failure.message, "self_test")
            with run.phase("activate"):
                failpoint("agent.update.commit")  # the self-test passed; the trial not yet committed
                slots.commit()
                failpoint("agent.update.committed")  # committed on disk; the runtime still serves the old version
        except Exception as exc:
            # Not for BaseException (SystemExit, KeyboardInterrupt): the process is going down, and
            # recover() at the next start rolls the trial back exactly as after a kill.
            restored = slots.abort_trial()
            if not unexpected and isinstance(exc, InstallFailed):
                # A clean verdict: the version ran and failed. After anything unexpected the counter
                # stays, so a version that keeps killing or breaking the process ends in CrashLoop.
                self._attempts.clear(a.model_namespace, a.model_name)
            log.warning("[%s/%s] rolled back to %s", *self._id(slots), restored.active_version or "nothing")
            raise
        self._attempts.clear(a.model_namespace, a.model_name)
        self.runtime.activate(loaded)
        log.info("[%s/%s] %s committed in slot %s", *self._id(slots), version, verified.slot)
        return run.result("succeeded", success, f"{version} active in slot {verified.slot}", None, verified.slot)
