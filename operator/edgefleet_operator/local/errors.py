"""Errors of the embedded control plane, grouped by who must act.

- :class:`InputError`: the resource files are not valid (every problem names its file and field);
  nothing in the state folder was changed.
- :class:`StateError`: the state folder cannot be used (another ``edgefleet up`` holds it, a
  stored object is unreadable, keys cannot be created).
"""

from __future__ import annotations

from collections.abc import Sequence

from edgefleet_core.errors import EdgeFleetError, ResourceError


class LocalError(EdgeFleetError):
    """Base of every error ``edgefleet up`` raises on purpose."""


class InputError(LocalError):
    """The resource files cannot be applied; ``problems`` names every file and field at fault."""

    def __init__(self, problems: Sequence[ResourceError]) -> None:
        self.problems = list(problems)
        """One entry per document (or file) at fault; never empty."""
        super().__init__("; ".join(str(p) for p in self.problems))


class StateError(LocalError):
    """The state folder cannot be used as it is; the message says what to do."""
