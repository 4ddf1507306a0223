"""What can stop ``edgefleet demo``, by where it came from."""

from __future__ import annotations

from edgefleet_core.errors import EdgeFleetError


class DemoError(EdgeFleetError):
    """The demo could not run to its end."""


class DemoSetupError(DemoError):
    """The demo's inputs are missing or unusable (resource files, state folder, report folder)."""


class ChildFailed(DemoError):
    """A gateway or agent process exited, or did not become ready."""


class DemoTimeout(DemoError):
    """Something the demo waits for did not happen in time (the message says what)."""


class Interrupted(DemoError):
    """Ctrl-C or SIGTERM: the demo stops every child and exits."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
