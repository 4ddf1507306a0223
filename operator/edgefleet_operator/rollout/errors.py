"""Errors the rollout controller raises on purpose.

Fleet-state and bundle failures (:class:`~edgefleet_operator.fleet.FleetError`,
:class:`~edgefleet_operator.fleet.BundleNotPublished`, store errors) pass through unchanged: the
caller (a kopf handler, the embedded control plane) decides whether a retry helps.
"""

from __future__ import annotations

from edgefleet_core.errors import EdgeFleetError


class RolloutError(EdgeFleetError):
    """Base of every error the rollout controller raises on purpose."""


class RolloutInputError(RolloutError):
    """The caller passed something a rollout cannot be planned from (a naive clock, a status of another class)."""


class RolloutDidNotSettle(RolloutError):
    """A step kept finding more to do than a rollout can have: a bug in the planner, never an input problem."""
