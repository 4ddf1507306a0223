"""The reconciler's :class:`~edgefleet_operator.reconcile.dispatch.BuildDispatcher` over Kubernetes Jobs.

``dispatch`` is level-triggered: it reads the build's report in the store first (a Job that
finished may be gone already: TTL, a restart), then the Job, and creates the Job only when neither
exists. A ``built`` report becomes :class:`~.dispatch.Built` (the files read back and checked), a
``refused`` one a :class:`~.dispatch.Failed` spec error. A Job that failed for any other reason
(a crash, its deadline, an image that does not pull) is deleted with its report, and reported as a
transient failure: the next dispatch, after the reconciler's backoff, starts it afresh.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel
from edgefleet_core.store.base import ArtifactStore
from edgefleet_operator.jobs.errors import StagingError
from edgefleet_operator.jobs.manifest import (
    JobSettings,
    StoreAccess,
    job_name,
    job_namespace,
    model_selector,
    pipeline_job,
)
from edgefleet_operator.jobs.staging import (
    BuildLocation,
    BuildReport,
    discard_build,
    discard_model_builds,
    load_variant,
    read_report,
)
from edgefleet_operator.reconcile.dispatch import Built, DispatchState, Failed, Running
from edgefleet_operator.reconcile.errors import SpecError, TransientError

logger = logging.getLogger(__name__)


class JobApi(Protocol):
    """The Job calls the dispatcher makes (:class:`~.kube.KubeApi`, or a test's in-memory stand-in)."""

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def create_job(self, namespace: str, job: Mapping[str, Any]) -> dict[str, Any] | None: ...
    def delete_job(self, namespace: str, name: str) -> None: ...
    def list_jobs(self, namespace: str, label_selector: str) -> list[dict[str, Any]]: ...


class KubeJobDispatcher:
    """One batch/v1 Job per (EdgeModel, DeviceClass, build key); outcomes through the artifact store."""

    def __init__(self, settings: JobSettings, api: JobApi, store: ArtifactStore, access: StoreAccess) -> None:
        """``store`` is the operator's own view of the store the Jobs write to through ``access``."""
        self._settings = settings
        self._api = api
        self._store = store
        self._access = access

    def dispatch(self, model: EdgeModel, device_class: DeviceClass, *, build_key: str, version: str) -> DispatchState:
        where = _location(model, device_class, build_key)
        report = read_report(self._store, where)
        finished = self._finished(model, device_class, where, report)
        if finished is not None:
            return finished
        manifest = pipeline_job(self._settings, self._access, model, device_class, build_key=build_key, version=version)
        namespace, name = job_namespace(self._settings, model), manifest["metadata"]["name"]
        job = self._api.get_job(namespace, name)
        if job is None:
            self._api.create_job(namespace, manifest)  # None: another replica or attempt made it: the same Job
            logger.info(
                "[%s/%s] class %s: job %s/%s builds %s (version %s)",
                where.namespace,
                where.model,
                where.device_class,
                namespace,
                name,
                build_key,
                version,
            )
            return Running(f"job {namespace}/{name}")
        if job.get("metadata", {}).get("deletionTimestamp"):
            return Running(f"job {namespace}/{name}: the previous attempt is being deleted")
        ended = _ended(job)
        if ended is None:
            return Running(f"job {namespace}/{name}: {_counts(job)}")
        # Finished without a built or refused report: a crash, the deadline, a pod that never ran.
        why = _failure(job, ended, report)
        self._api.delete_job(namespace, name)
        if report is not None:
            discard_build(self._store, where)
        logger.warning(
            "[%s/%s] class %s: job %s/%s failed: %s",
            where.namespace,
            where.model,
            where.device_class,
            namespace,
            name,
            why,
        )
        return Failed(TransientError(f"job {namespace}/{name} failed: {why}"))

    def _finished(
        self, model: EdgeModel, device_class: DeviceClass, where: BuildLocation, report: BuildReport | None
    ) -> DispatchState | None:
        """What a final report says (``built`` or ``refused``); ``None`` while there is none."""
        if report is None or report.outcome == "error":
            return None
        if report.outcome == "refused" or report.variant is None:
            return Failed(SpecError(report.field or "spec", report.message))
        try:
            return Built(load_variant(self._store, where, report.variant), report.version)
        except StagingError as exc:
            # Nothing damaged is signed: drop the build and its Job, and build it again.
            self._api.delete_job(job_namespace(self._settings, model), self._name(model, device_class, where.build_key))
            discard_build(self._store, where)
            return Failed(TransientError(f"the staged build was damaged and is built again: {exc}"))

    @staticmethod
    def _name(model: EdgeModel, device_class: DeviceClass, build_key: str) -> str:
        return job_name(
            model.metadata.namespace or "default", model.metadata.name, device_class.metadata.name, build_key
        )

    def release(self, model: EdgeModel, device_class: DeviceClass, *, build_key: str) -> None:
        # The Job itself is left to its TTL (and to the model's deletion): its logs may be wanted.
        discard_build(self._store, _location(model, device_class, build_key))

    def discard_model(self, model: EdgeModel) -> None:
        namespace = job_namespace(self._settings, model)
        if namespace != model.metadata.namespace:
            # No owner reference across namespaces: nothing else deletes these Jobs.
            for job in self._api.list_jobs(namespace, model_selector(model)):
                self._api.delete_job(namespace, job["metadata"]["name"])
        discard_model_builds(self._store, model.metadata.namespace or "default", model.metadata.name)


def _location(model: EdgeModel, device_class: DeviceClass, build_key: str) -> BuildLocation:
    return BuildLocation(
        model.metadata.namespace or "default", model.metadata.name, device_class.metadata.name, build_key
    )


def _ended(job: Mapping[str, Any]) -> str | None:
    """``Complete`` or ``Failed`` once the Job has finished (its terminal condition), else ``None``."""
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return str(condition["type"])
    return None


def _counts(job: Mapping[str, Any]) -> str:
    status = job.get("status", {})
    return f"{status.get('active', 0)} active, {status.get('failed', 0)} failed pod(s)"


def _failure(job: Mapping[str, Any], ended: str, report: BuildReport | None) -> str:
    if report is not None and report.message:
        return report.message
    if ended == "Complete":
        return "it completed without writing a build report"
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Failed":
            return f"{condition.get('reason', 'Failed')}: {condition.get('message', '')}".rstrip(": ")
    return "it failed"
