"""What the Updater is asked to do and what it reports back: plain, transport-free values.

The daemon converts the gateway's assignment messages into :class:`AssignmentSpec` and
:class:`InstallResult` into install reports; the Updater never sees a protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Action = Literal["install", "rollback", "remove"]
Outcome = Literal["succeeded", "failed", "rolled_back", "refused_verification"]
Phase = Literal["download", "verify", "decode", "activate", "self_test"]
SlotName = Literal["a", "b"]


@dataclass(frozen=True)
class AssignmentSpec:
    """The desired state of one model on this device, at one assignment revision."""

    revision: int
    model_namespace: str
    model_name: str
    version: str
    action: Action
    target_paths: tuple[str, ...]
    """TUF target paths of the bundle; the first is ``<class>/<ns>/<model>/<version>/manifest.json``."""
    bundle_sha256: str
    """sha256 of that manifest target, as the control plane resolved it from signed metadata."""
    bundle_length: int
    """Bytes the bundle's targets take (the disk-space check before a download)."""
    delta_from_version: str | None = None

    @property
    def model_key(self) -> str:
        """``namespace/name``: how assignments and slots are keyed."""
        return f"{self.model_namespace}/{self.model_name}"


@dataclass(frozen=True)
class InstallResult:
    """How applying one assignment ended."""

    revision: int
    model_namespace: str
    model_name: str
    from_version: str
    """The version that was active before (empty if none)."""
    to_version: str
    outcome: Outcome
    reason: str
    """A short CamelCase code, e.g. ``Installed``, ``SelfTestOutputs``, ``DigestMismatch``, ``CrashLoop``."""
    message: str
    failed_phase: Phase | None
    durations: dict[str, float]
    """Seconds per phase that ran, plus ``total``."""
    active_slot: SlotName | None
    """The slot serving after the assignment (``None`` when nothing is active)."""
    finished_at: datetime
