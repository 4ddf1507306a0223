"""Errors of the shared fleet state, grouped by where the failure came from.

Store failures themselves (:class:`~edgefleet_core.errors.StoreUnavailable` and friends) pass through
unchanged: the gateway's interceptor maps them, and a retry may help where it does not here.
"""

from __future__ import annotations

from typing import Literal

from edgefleet_core.errors import EdgeFleetError

TokenRefusal = Literal["unknown", "expired", "used", "malformed", "name-mismatch"]


class FleetError(EdgeFleetError):
    """Base of every error the fleet state raises on purpose."""


class FleetInputError(FleetError):
    """A caller passed something the fleet state cannot hold (a bad name, a negative TTL, no devices)."""


class FleetRecordError(FleetError):
    """A record in the store is malformed or over its size cap; ``key`` names it so an operator can look."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        """The store key of the record."""
        self.problem = problem
        """What is wrong with it."""
        super().__init__(f"fleet record {key}: {problem}")


class TokenRefused(FleetError):
    """A bootstrap token cannot be redeemed. The message never contains the token's secret."""

    def __init__(self, reason: TokenRefusal, message: str) -> None:
        self.reason: TokenRefusal = reason
        """Why, as one of a fixed set of words (for metrics and tests; the message is for people)."""
        super().__init__(message)


class UnknownDevice(FleetError):
    """No device record under that namespace and name."""

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace = namespace
        self.name = name
        super().__init__(f"no enrolled device {namespace}/{name}")


class BundleNotPublished(FleetError):
    """The signed TUF repository in the store has no bundle for that model, version and device class."""
