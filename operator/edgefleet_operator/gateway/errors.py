"""Errors the gateway's service raises on purpose, one class per gRPC status a device can be given.

The service is transport-free: it raises these, and only the interceptor
(:mod:`edgefleet_operator.gateway.interceptor`) turns them into status codes. The messages go to
the device, so they name the field or the object at fault and never carry a secret.
"""

from __future__ import annotations

from edgefleet_core.errors import EdgeFleetError


class GatewayError(EdgeFleetError):
    """Base of every refusal the gateway sends to a device."""


class Unauthenticated(GatewayError):
    """No, an unknown or a superseded client certificate; a bad, used or expired bootstrap token."""


class PermissionDenied(GatewayError):
    """The caller is who it says, but may not do this: a revoked device, another class's target."""


class InvalidArgument(GatewayError):
    """A request field breaks a bound documented in fleet.proto."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        """The request field at fault, dotted (``hardware.cpu_cores``, ``models[2].version``)."""
        self.problem = problem
        """What is wrong with it."""
        super().__init__(f"{field}: {problem}")


class NotFound(GatewayError):
    """No such metadata role version or target file."""


class ResourceExhausted(GatewayError):
    """A file is larger than the cap the client asked for."""


class OutOfRange(GatewayError):
    """A fetch offset lies beyond the end of the file."""


class Unavailable(GatewayError):
    """Transient: the artifact store failed or a file changed while it was read; retry with backoff."""
