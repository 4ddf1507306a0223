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
