"""Where a pipeline Job leaves its outcome in the artifact store, and how the operator reads it back.

Layout, under the store the operator publishes to (the Job needs no signing keys, only the store)::

    builds/<namespace>/<model>/<class>/<build key>.json        the report, written last
    builds/<namespace>/<model>/<class>/<build key>/<sha256>    each built file, by content

The report says ``built`` (with everything the manifest records and the files by digest),
``refused`` (a spec error: the field and message) or ``error`` (anything else, for the status).
Every store write is atomic per key, and the report goes last, so a report that says ``built``
always finds its files; the operator still checks each file's size and sha256 against the report
before it signs anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from edgefleet_core.bundle.selftest import SelfTest
from edgefleet_core.errors import StoreLimitExceeded, StoreNotFound
from edgefleet_core.store.base import ArtifactStore
from edgefleet_operator.jobs.errors import StagingError
from edgefleet_operator.reconcile.variants import BuiltVariant

BUILDS_PREFIX: Final = "builds/"
MAX_REPORT_BYTES: Final = 64 << 20
"""A report holds the self-test tensors and the pipeline's summary: generous, but capped."""
MAX_FILE_BYTES: Final = 4 << 30
"""The largest built file read back (a model after optimization is no larger than its source)."""

Outcome = Literal["built", "refused", "error"]


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class StagedFile(_Wire):
    """One built file, stored under its sha256."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class StagedVariant(_Wire):
    """A :class:`~edgefleet_operator.reconcile.variants.BuiltVariant` without its bytes."""

    files: list[StagedFile] = Field(min_length=1)
    variant_id: str
    lineage: dict[str, Any]
    recipe: list[Any]
    metrics: dict[str, float]
    partition_plan: dict[str, Any] | None = None
    self_test: SelfTest | None = None
    summary: dict[str, Any] = Field(default_factory=dict)


class BuildReport(_Wire):
    """What a pipeline Job decided for one build key."""

    outcome: Outcome
    build_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    version: str
    """The version the build was dispatched for."""
    field: str | None = None
    """``refused``: the spec field to fix (``spec.accuracy.maxDrop``, ``spec.source.sha256``)."""
    message: str = ""
    variant: StagedVariant | None = None
    """``built``: the variant to publish."""


@dataclass(frozen=True)
class BuildLocation:
    """The build of one (EdgeModel, DeviceClass) for one build key."""

    namespace: str
    model: str
    device_class: str
    build_key: str

    @property
    def report_key(self) -> str:
        return f"{model_prefix(self.namespace, self.model)}{self.device_class}/{self.build_key}.json"

    def file_key(self, sha256: str) -> str:
        return f"{model_prefix(self.namespace, self.model)}{self.device_class}/{self.build_key}/{sha256}"


def model_prefix(namespace: str, model: str) -> str:
    """Every staged build of one model lives under this prefix."""
    return f"{BUILDS_PREFIX}{namespace}/{model}/"


def stage_variant(store: ArtifactStore, where: BuildLocation, version: str, built: BuiltVariant) -> BuildReport:
    """Store ``built``'s files, then its ``built`` report; the report."""
    files = []
    for name, data in sorted(built.files.items()):
        digest = hashlib.sha256(data).hexdigest()
        store.put(where.file_key(digest), data)
        files.append(StagedFile(name=name, sha256=digest, size=len(data)))
    variant = StagedVariant(
        files=files,
        variant_id=built.variant_id,
        lineage=built.lineage,
        recipe=built.recipe,
        metrics=built.metrics,
        partition_plan=built.partition_plan,
        self_test=built.self_test,
        summary=built.summary,
    )
    report = BuildReport(outcome="built", build_key=where.build_key, version=version, variant=variant)
    write_report(store, where, report)
    return report


def write_report(store: ArtifactStore, where: BuildLocation, report: BuildReport) -> None:
    store.put(where.report_key, report.model_dump_json(by_alias=True, exclude_none=True).encode())


def read_report(store: ArtifactStore, where: BuildLocation) -> BuildReport | None:
    """The build's report, or ``None`` when no Job has written one yet.

    Store outages propagate (:class:`~edgefleet_core.errors.StoreError`); a report that does not
    parse, or is for another build key, is a :class:`StagingError`.
    """
    try:
        data = store.get(where.report_key, max_bytes=MAX_REPORT_BYTES)
    except StoreNotFound:
        return None
    try:
        report = BuildReport.model_validate_json(data)
    except ValidationError as exc:
        raise StagingError(f"{where.report_key}: not a build report: {exc}") from None
    if report.build_key != where.build_key:
        raise StagingError(f"{where.report_key}: the report is for build key {report.build_key}")
    return report


def load_variant(store: ArtifactStore, where: BuildLocation, variant: StagedVariant) -> BuiltVariant:
    """The built variant a ``built`` report describes, each file checked against its size and sha256."""
    files: dict[str, bytes] = {}
    for staged in variant.files:
        key = where.file_key(staged.sha256)
        try:
            data = store.get(key, max_bytes=min(staged.size, MAX_FILE_BYTES))
        except StoreNotFound:
            raise StagingError(f"{key}: the staged file {staged.name} is missing") from None
        except StoreLimitExceeded:
            raise StagingError(f"{key}: the staged file {staged.name} does not match its report") from None
        if len(data) != staged.size or hashlib.sha256(data).hexdigest() != staged.sha256:
            raise StagingError(f"{key}: the staged file {staged.name} does not match its report")
        files[staged.name] = data
    return BuiltVariant(
        files=files,
        variant_id=variant.variant_id,
        lineage=variant.lineage,
        recipe=variant.recipe,
        metrics=variant.metrics,
        partition_plan=variant.partition_plan,
        self_test=variant.self_test,
        summary=variant.summary,
    )


def discard_build(store: ArtifactStore, where: BuildLocation) -> None:
    """Remove the build's files, then its report (absent ones are fine)."""
    for key in store.list(f"{model_prefix(where.namespace, where.model)}{where.device_class}/{where.build_key}/"):
        store.delete(key)
    store.delete(where.report_key)


def discard_model_builds(store: ArtifactStore, namespace: str, model: str) -> int:
    """Remove every staged build of the model; how many objects went."""
    keys = store.list(model_prefix(namespace, model))
    for key in keys:
        store.delete(key)
    return len(keys)
