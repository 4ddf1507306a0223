"""Errors of the Job machinery, grouped by where they come from: the API server or the staged output."""

from __future__ import annotations

from edgefleet_core.errors import EdgeFleetError


class JobError(EdgeFleetError):
    """Base of every error the jobs package raises on purpose."""


class KubeApiUnavailable(JobError):
    """The API server could not be reached or answered 5xx / 429: a later attempt may succeed."""


class KubeApiRefused(JobError):
    """The API server refused a request (403 forbidden, 422 invalid, ...): a person must fix RBAC or settings."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        """The HTTP status."""
        self.reason = reason
        """The Status body's ``reason`` (``Forbidden``, ``Invalid``, ...)."""
        super().__init__(f"the API server answered {status} {reason}: {message}")


class StagingError(JobError):
    """A staged build in the store is unreadable or does not match its report (damaged or tampered with)."""
