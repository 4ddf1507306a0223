"""Errors the agent raises on purpose, grouped by where the failure came from.

One base class (:class:`AgentError`, itself an :class:`EdgeFleetError`) so the edges — the
inference servicer, the daemon, the CLI — map every domain failure with one narrow ``except``.
Install failures are not exceptions at the Updater's boundary: :meth:`Updater.apply` turns them
into an :class:`~edgefleet_agent.assignments.InstallResult` with a reason code.
"""

from __future__ import annotations

from edgefleet_agent.assignments import Outcome, Phase
from edgefleet_core.errors import EdgeFleetError


class AgentError(EdgeFleetError):
    """Base of every error the agent raises on purpose."""


# --- the slot store on the device's disk -------------------------------------------------------


class SlotError(AgentError):
    """A model's A/B slots or their pointer cannot be read or written."""


class SlotCorrupt(SlotError):
    """A slot's files do not match its manifest (missing, truncated, tampered): never served."""

    def __init__(self, slot_dir: str, problem: str) -> None:
        self.slot_dir = slot_dir
        """The slot folder."""
        self.problem = problem
        """What does not match."""
        super().__init__(f"{slot_dir}: {problem}")


# --- ONNX Runtime: creating sessions for a model version ---------------------------------------


class ModelLoadError(AgentError):
    """ONNX Runtime cannot create sessions for a model version (corrupt graph, unsupported op, no provider)."""


# --- inference requests: what the local API maps to a status code -----------------------------


class InferenceError(AgentError):
    """A prediction request cannot be served."""


class UnknownModel(InferenceError):
    """No model of that name is held on this device (NOT_FOUND)."""


class ModelNotReady(InferenceError):
    """The model is held but not serving, or the version asked for is not loaded (FAILED_PRECONDITION)."""


class InvalidTensors(InferenceError):
    """Inputs or requested outputs do not match the graph: names, dtypes, shapes, sizes (INVALID_ARGUMENT)."""


class InferenceFailed(InferenceError):
    """ONNX Runtime failed while running valid inputs (INTERNAL)."""


# --- applying an assignment: raised inside the Updater, returned as an InstallResult -----------


class InstallFailed(AgentError):
    """An install step failed; the Updater turns this into an InstallResult (never raised past apply())."""

    def __init__(self, outcome: Outcome, reason: str, message: str, phase: Phase | None) -> None:
        self.outcome = outcome
        """``failed``, ``rolled_back`` or ``refused_verification``."""
        self.reason = reason
        """A short CamelCase code, e.g. ``DigestMismatch``."""
        self.message = message
        self.phase = phase
        """The phase that failed, if one did."""
        super().__init__(f"{reason}: {message}")
