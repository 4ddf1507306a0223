"""Errors the EdgeModel reconciler raises on purpose, grouped by who can fix them.

- :class:`SpecError`: the user must change a resource (an unknown DeviceClass, a source whose
  sha256 differs, an accuracy budget no candidate meets). The model goes ``Stalled`` with a message
  naming the field; retrying the same spec cannot help.
- :class:`TransientError`: the store or the network failed. Retrying with backoff can help, so
  ``Reconciling`` stays true.

Only the edges (kopf handlers, the embedded control plane) turn these into ``kopf.PermanentError``
or ``kopf.TemporaryError``; nothing here knows kopf.
"""

from __future__ import annotations

from edgefleet_core.errors import EdgeFleetError


class ReconcileError(EdgeFleetError):
    """Base of every error the reconciler raises on purpose."""


class SpecError(ReconcileError):
    """A resource asks for something that cannot be done; the user must fix ``field``."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        """Path of the field to fix, e.g. ``spec.targets.deviceClasses[1]`` or ``spec.source.sha256``."""
        self.message = message
        """What is wrong, in words the user can act on."""
        super().__init__(f"{field}: {message}")


class TransientError(ReconcileError):
    """The store or the network failed in a way a later attempt may not (connection refused, 5xx, timeouts)."""

    def __init__(self, message: str) -> None:
        self.message = message
        """What failed, for the status message and the log."""
        super().__init__(message)
