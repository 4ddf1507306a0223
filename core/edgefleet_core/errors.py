"""Errors raised by EdgeFleet's core, grouped by where the failure came from.

One base class so callers at the edges (CLI, kopf handlers, gRPC interceptor) can map every domain
failure to an exit code, a ``kopf.PermanentError`` or a status code with one narrow ``except``.
Domain code raises these and nothing framework-specific.
"""

from __future__ import annotations

from dataclasses import dataclass


class EdgeFleetError(Exception):
    """Base of every error EdgeFleet raises on purpose."""


@dataclass(frozen=True)
class FieldProblem:
    """One thing wrong with one field of a resource."""

    field: str
    """Dotted path into the resource, with list indices, e.g. ``spec.rollout.waves[1].percent``."""
    message: str
    """What is wrong, in words a user can act on."""
    validator: str
    """Which check found it: ``schema`` (the CRD's OpenAPI schema and CEL rules) or ``model``."""

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ResourceError(EdgeFleetError):
    """A resource document (DeviceClass, EdgeModel, EdgeDevice) is not valid."""

    def __init__(self, source: str, problems: list[FieldProblem]) -> None:
        self.source = source
        """Where the document came from (file name and document index, or an object reference)."""
        self.problems = problems
        """Every problem found; never empty."""
        listing = "; ".join(str(p) for p in problems)
        super().__init__(f"{source}: {listing}")

    @property
    def fields(self) -> list[str]:
        """The field paths named by the problems, in order."""
        return [p.field for p in self.problems]


class ContractError(EdgeFleetError):
    """A contract file shipped with EdgeFleet (a CRD) is missing or malformed: a packaging bug."""


class ModelError(EdgeFleetError):
    """A model file cannot be used: not ONNX, corrupt or truncated, unsafe external data, unsupported opset."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        """The model file (or a description of an in-memory model)."""
        self.problem = problem
        """What is wrong with it."""
        super().__init__(f"{source}: {problem}")


class DataError(EdgeFleetError):
    """Evaluation, calibration or training data cannot be used with a model."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        """The data file."""
        self.problem = problem
        """What is wrong with it."""
        super().__init__(f"{source}: {problem}")


class PassNotApplicable(EdgeFleetError):
    """A pass cannot apply to this model (or here); the pipeline reports it and goes on without it."""

    def __init__(self, pass_type: str, reason: str) -> None:
        self.pass_type = pass_type
        """The pass that was skipped, e.g. ``ChannelPruning``."""
        self.reason = reason
        """Why, in words a user can act on."""
        super().__init__(f"{pass_type} skipped: {reason}")


class OptimizationError(EdgeFleetError):
    """The pipeline cannot produce a variant (e.g. no candidate meets the accuracy budget)."""


class TrainingUnsupported(EdgeFleetError):
    """The trainer cannot fine-tune this model (an op it cannot differentiate, nothing to learn from)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        """Why, e.g. ``op NonMaxSuppression is not supported for training``."""
        super().__init__(reason)


class BundleError(EdgeFleetError):
    """A bundle cannot be encoded or decoded: malformed, truncated, over a bound, or not matching its manifest."""


class BundleVerificationError(BundleError):
    """A decoded file does not match the sha256 or length its signed manifest pins: fatal for the bundle."""


class SigningError(EdgeFleetError):
    """Keys or signed metadata cannot be created, loaded or used (missing key file, wrong key type)."""


class VerificationError(EdgeFleetError):
    """Signed metadata or a target failed verification (tampering, rollback, freeze, wrong keys ...)."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        """What was being verified (a role, a target path)."""
        self.reason = reason
        """Why it was refused, e.g. the python-tuf error class and message."""
        super().__init__(f"{what}: {reason}")


class StoreError(EdgeFleetError):
    """The artifact store failed. Subclasses say whether retrying can help."""


class StoreNotFound(StoreError):
    """No object under that key (or the bucket itself does not exist)."""


class StoreAuthError(StoreError):
    """The store refused our credentials; retrying will not help."""


class StoreUnavailable(StoreError):
    """The store could not be reached or kept failing (5xx, connection errors) after retries."""


class StoreLimitExceeded(StoreError):
    """An object is larger than the size cap the caller set; nothing beyond the cap was read."""
