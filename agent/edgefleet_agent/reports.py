"""Install reports that must reach the gateway, and the agent's translations to and from the wire.

An install report is written to ``STATE/reports/<revision>-<namespace>.<model>.json`` (atomically)
before the assignment counts as applied and is deleted only when the gateway acknowledges it, so a
report survives a lost connection and a restart (on a full disk it is kept in memory instead). The
gateway drops duplicates, so sending one twice is harmless.

The conversions are the only place the agent touches these protobuf messages: the Updater and the
runtime see plain values (:mod:`edgefleet_agent.assignments`). A malformed assignment is logged and
skipped, never allowed to crash the agent.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, timedelta
from pathlib import Path

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import TypeAdapter, ValidationError

from edgefleet_agent.assignments import Action, AssignmentSpec, InstallResult, Outcome, Phase, SlotName
from edgefleet_agent.runtime import ModelWindowStats
from edgefleet_core.atomic import write_file_atomic
from edgefleet_core.signing.layout import is_safe_path
from edgefleet_proto.v1 import fleet_pb2

logger = logging.getLogger(__name__)

REPORTS_DIR = "reports"
MAX_REASON = 64
MAX_MESSAGE = 1024
MAX_TARGET_PATH = 1024
MAX_TARGETS = 4096
MAX_REPORT_BYTES = 64 * 1024

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Model names are Kubernetes object names: DNS subdomains (labels joined by dots, 253 characters at most).
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")

_OUTCOMES: dict[Outcome, fleet_pb2.InstallOutcome.ValueType] = {
    "succeeded": fleet_pb2.INSTALL_OUTCOME_SUCCEEDED,
    "failed": fleet_pb2.INSTALL_OUTCOME_FAILED,
    "rolled_back": fleet_pb2.INSTALL_OUTCOME_ROLLED_BACK,
    "refused_verification": fleet_pb2.INSTALL_OUTCOME_REFUSED_VERIFICATION,
}
_PHASES: dict[Phase, fleet_pb2.InstallPhase.ValueType] = {
    "download": fleet_pb2.INSTALL_PHASE_DOWNLOAD,
    "verify": fleet_pb2.INSTALL_PHASE_VERIFY,
    "decode": fleet_pb2.INSTALL_PHASE_DECODE,
    "activate": fleet_pb2.INSTALL_PHASE_ACTIVATE,
    "self_test": fleet_pb2.INSTALL_PHASE_SELF_TEST,
}
_SLOTS: dict[SlotName, fleet_pb2.Slot.ValueType] = {"a": fleet_pb2.SLOT_A, "b": fleet_pb2.SLOT_B}
_ACTIONS: dict[fleet_pb2.AssignmentAction.ValueType, Action] = {
    fleet_pb2.ASSIGNMENT_ACTION_INSTALL: "install",
    fleet_pb2.ASSIGNMENT_ACTION_ROLLBACK: "rollback",
    fleet_pb2.ASSIGNMENT_ACTION_REMOVE: "remove",
}
_DURATION_FIELDS = ("download", "verify", "decode", "activate", "self_test", "total")

_RESULT = TypeAdapter(InstallResult)


# ------------------------------------------------------------------------------------------------
# The persistent queue


class ReportQueue:
    """Install reports not yet acknowledged by the gateway, one JSON file each.

    A report that cannot be written (a full disk) is kept in memory instead, until acknowledged: the
    device keeps serving and the gateway still learns what happened; only a restart before the
    acknowledgement loses it.
    """

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / REPORTS_DIR
        self._unsaved: dict[str, InstallResult] = {}

    @staticmethod
    def file_name(result: InstallResult) -> str:
        return f"{result.revision}-{result.model_namespace}.{result.model_name}.json"

    def put(self, result: InstallResult) -> Path:
        """Persist ``result`` (replacing an older report for the same revision and model)."""
        path = self.directory / self.file_name(result)
        if not is_safe_path(path.name):
            raise ValueError(f"install report for an unsafe model name: {path.name!r}")
        try:
            write_file_atomic(path, _RESULT.dump_json(result, indent=2) + b"\n")
        except OSError as e:
            logger.error("cannot write install report %s (%s); keeping it in memory until acknowledged", path, e)
            self._unsaved[path.name] = result
            return path
        self._unsaved.pop(path.name, None)
        return path

    def pending(self) -> list[InstallResult]:
        """Every unacknowledged report, oldest revision first. Unreadable files are set aside, not fatal."""
        found: dict[str, InstallResult] = {}
        paths = sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []
        for path in paths:
            try:
                if path.stat().st_size > MAX_REPORT_BYTES:
                    raise ValueError(f"over {MAX_REPORT_BYTES} bytes")
                found[path.name] = _RESULT.validate_json(path.read_bytes())
            except (OSError, ValueError, ValidationError) as e:
                # Keep it for a human to look at, out of the way of the sender.
                logger.warning("install report %s is unreadable (%s); moving it aside", path, e)
                path.replace(path.with_suffix(".bad"))
        found.update(self._unsaved)  # newer than a file of the same name: that one could not be replaced
        return sorted(found.values(), key=lambda r: (r.revision, r.model_namespace, r.model_name))

    def ack(self, result: InstallResult) -> None:
        """The gateway has it: forget it, unless a newer attempt's report took its place meanwhile."""
        path = self.directory / self.file_name(result)
        unsaved = self._unsaved.get(path.name)
        if unsaved is not None:
            if unsaved != result:
                return
            del self._unsaved[path.name]
            path.unlink(missing_ok=True)  # an older attempt's file, superseded by the one just acknowledged
            return
        try:
            stored = _RESULT.validate_json(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValidationError):
            stored = result  # unreadable: the sender has what it needs; do not keep a broken file
        if stored == result:
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# Plain values → wire


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=max(0.0, seconds)))
    return duration


def install_report(result: InstallResult) -> fleet_pb2.InstallReport:
    """The InstallReport message for ``result``, with reason and message cut to the wire's bounds."""
    durations = fleet_pb2.InstallDurations()
    for name in _DURATION_FIELDS:
        if name in result.durations:
            getattr(durations, name).CopyFrom(_duration(result.durations[name]))
    finished = Timestamp()
    finished.FromDatetime(result.finished_at.astimezone(UTC))
    return fleet_pb2.InstallReport(
        assignment_revision=result.revision,
        model_namespace=result.model_namespace,
        model_name=result.model_name,
        from_version=result.from_version,
        to_version=result.to_version,
        outcome=_OUTCOMES[result.outcome],
        reason=result.reason[:MAX_REASON],
        message=result.message[:MAX_MESSAGE],
        failed_phase=fleet_pb2.INSTALL_PHASE_UNSPECIFIED
        if result.failed_phase is None
        else _PHASES[result.failed_phase],
        durations=durations,
        active_slot=fleet_pb2.SLOT_UNSPECIFIED if result.active_slot is None else _SLOTS[result.active_slot],
        finished_at=finished,
    )


def model_health(stats: ModelWindowStats) -> fleet_pb2.ModelHealth:
    """The ModelHealth entry of a health report for one model's window."""
    return fleet_pb2.ModelHealth(
        model_namespace=stats.model_namespace,
        model_name=stats.model_name,
        version=stats.version,
        slot=fleet_pb2.SLOT_UNSPECIFIED if stats.slot is None else _SLOTS[stats.slot],
        inference_count=stats.inference_count,
        error_count=stats.error_count,
        latency_p50_ms=stats.latency_p50_ms,
        latency_p95_ms=stats.latency_p95_ms,
        latency_p99_ms=stats.latency_p99_ms,
        accelerator_fallback_count=stats.accelerator_fallback_count,
    )


# ------------------------------------------------------------------------------------------------
# Wire → plain values


class _Invalid(ValueError):
    """One assignment field breaks its documented bound."""


def _check_assignment(message: fleet_pb2.Assignment, action: Action) -> None:
    if message.revision < 1:
        raise _Invalid("revision must be at least 1")
    if not _DNS_LABEL.fullmatch(message.model_namespace):
        raise _Invalid(f"model_namespace {message.model_namespace!r} is not a DNS label")
    if not _DNS_SUBDOMAIN.fullmatch(message.model_name):
        raise _Invalid(f"model_name {message.model_name!r} is not a DNS subdomain")
    if action == "remove":
        return
    if not _VERSION.fullmatch(message.version):
        raise _Invalid(f"version {message.version!r} is not a version string")
    if message.delta_from_version and not _VERSION.fullmatch(message.delta_from_version):
        raise _Invalid(f"delta_from_version {message.delta_from_version!r} is not a version string")
    if len(message.target_paths) > MAX_TARGETS:
        raise _Invalid(f"{len(message.target_paths)} target paths, more than {MAX_TARGETS}")
    for path in message.target_paths:
        if len(path) > MAX_TARGET_PATH or not is_safe_path(path):
            raise _Invalid(f"target path {path[:80]!r} is not a safe relative path")
    # A rollback may come without targets (the other slot holds the version); an install may not.
    if action == "install" and not message.target_paths:
        raise _Invalid("an install needs target paths")
    if message.target_paths and not _SHA256.fullmatch(message.bundle_sha256):
        raise _Invalid("bundle_sha256 is not 64 lowercase hex digits")


def assignment_spec(message: fleet_pb2.Assignment) -> AssignmentSpec | None:
    """The assignment as the Updater takes it, or ``None`` (logged) when it is unusable."""
    action = _ACTIONS.get(message.action)
    what = f"assignment revision {message.revision} for {message.model_namespace[:64]}/{message.model_name[:64]}"
    if action is None:
        logger.warning("skipping %s: unknown action %d", what, message.action)
        return None
    try:
        _check_assignment(message, action)
    except _Invalid as e:
        logger.warning("skipping %s: %s", what, e)
        return None
    return AssignmentSpec(
        revision=message.revision,
        model_namespace=message.model_namespace,
        model_name=message.model_name,
        version=message.version,
        action=action,
        target_paths=tuple(message.target_paths),
        bundle_sha256=message.bundle_sha256,
        bundle_length=message.bundle_length,
        delta_from_version=message.delta_from_version or None,
    )
