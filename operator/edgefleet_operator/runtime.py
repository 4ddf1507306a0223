"""The composition root: one place that turns settings into a ready :class:`EdgeModelReconciler`.

Shared by the kopf operator (``edgefleet operator run``) and the embedded control plane
(``edgefleet up``), so both run the very same reconciler over the same kinds of stores and keys.
Nothing here knows kopf: the edges decide what a failure to start means for them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.errors import EdgeFleetError, SigningError, StoreUnavailable
from edgefleet_core.optimize.lineage import VariantCache
from edgefleet_core.signing.keys import INDEX_FILE, KeySet
from edgefleet_core.store.base import ArtifactStore
from edgefleet_core.store.url import open_store
from edgefleet_core.training import load_trainer
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.jobs.dispatcher import KubeJobDispatcher
from edgefleet_operator.jobs.kube import ApiEndpoint, KubeApi
from edgefleet_operator.jobs.manifest import JobSettings, StoreAccess
from edgefleet_operator.metrics import OperatorMetrics
from edgefleet_operator.reconcile.edge_model import (
    DEFAULT_DISPATCH_POLL_S,
    DEFAULT_POLL_S,
    DEFAULT_RESYNC_S,
    EdgeModelReconciler,
)
from edgefleet_operator.reconcile.sources import SourceResolver
from edgefleet_operator.rollout.controller import PublishedBundles

logger = logging.getLogger(__name__)

BuildMode = Literal["pool", "jobs"]
DEFAULT_WORKERS: Final = 2
"""Pipelines that may run at once: each is CPU-bound (ONNX Runtime, quantization), so about the cores."""


class RuntimeSetupError(EdgeFleetError):
    """The operator cannot start with these settings (keys, store, repository); a person must act."""


@dataclass(frozen=True)
class S3Options:
    """How to reach S3 or MinIO, for the artifact store and for ``s3://`` sources alike.

    Anything left ``None`` comes from the standard environment variables (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ...), as for every other EdgeFleet command.
    """

    endpoint: str | None = None
    """``host:port`` or ``http(s)://host:port``."""
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None
    secure: bool | None = None
    """TLS to the endpoint; ``None``: as the endpoint's scheme says."""

    def as_source_options(self) -> dict[str, str]:
        """The same options in the string form :class:`~.reconcile.sources.SourceResolver` takes."""
        options = {
            "endpoint": self.endpoint,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "region": self.region,
            "secure": None if self.secure is None else str(self.secure).lower(),
        }
        return {key: value for key, value in options.items() if value is not None}


@dataclass(frozen=True)
class OperatorSettings:
    """What the reconciler is built from; built once at start-up and passed explicitly."""

    store_url: str
    """The artifact store holding the TUF repository and the fleet state: ``file:///abs`` or ``s3://bucket``."""
    keys_dir: Path
    """The signing keys (a folder from ``edgefleet keys init``, or the operator's mounted keys Secret).
    The online keys (targets, snapshot, timestamp) are enough once the repository exists."""
    cache_dir: Path | None = None
    """Where optimized variants are cached by variant id; ``None``: no cache (every build runs the passes)."""
    workers: int = DEFAULT_WORKERS
    """Reconciles (and so pipelines) that may run at once."""
    base_dir: Path | None = None
    """The folder relative ``spec.source.uri`` paths resolve against (local mode); ``None`` refuses them."""
    s3: S3Options = field(default_factory=S3Options)
    """How to reach S3 for the store and for ``s3://`` sources."""
    initialize_repository: bool = True
    """Create the TUF repository when the store has none and the keys include the root private keys."""
    rollout_poll_seconds: float = DEFAULT_POLL_S
    """How soon a rollout under way is stepped again when only device reports can move it on."""
    resync_seconds: float | None = DEFAULT_RESYNC_S
    """How soon a settled model is looked at again (devices enrolled since get its version); ``None``: never."""
    build_mode: BuildMode = "pool"
    """``pool``: class builds run in the operator's worker threads; ``jobs``: one Kubernetes Job per
    (model, class) runs ``edgefleet pipeline-job`` and the operator publishes what it built."""
    jobs: JobSettings | None = None
    """How pipeline Jobs are made; required with ``build_mode="jobs"``."""

    def __post_init__(self) -> None:
        if self.build_mode == "jobs" and self.jobs is None:
            raise RuntimeSetupError("building in Jobs needs the Job settings (at least the image)")
        if self.workers < 1:
            raise RuntimeSetupError(f"workers must be at least 1, not {self.workers}")
        if self.rollout_poll_seconds <= 0 or (self.resync_seconds is not None and self.resync_seconds <= 0):
            raise RuntimeSetupError("the rollout poll and resync intervals must be positive")


def load_keys(directory: Path) -> KeySet:
    """The key set in ``directory``: a full one, or the online-only one ``edgefleet keys secret`` puts in
    a Secret (mounted as a folder)."""
    if not (directory / INDEX_FILE).is_file():
        raise RuntimeSetupError(
            f"{directory}: no signing keys here ({INDEX_FILE} is missing); see `edgefleet keys init`"
        )
    try:
        return KeySet.load(directory)
    except SigningError as exc:
        raise RuntimeSetupError(str(exc)) from None


def is_store_outage(error: BaseException) -> bool:
    """Whether ``error`` is (or was caused by) a store that cannot be reached now: worth retrying.

    The TUF client reports a failed read as a verification error caused by the store's error.
    """
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, StoreUnavailable):
            return True
        current = current.__cause__
    return False


def open_artifact_store(settings: OperatorSettings) -> ArtifactStore:
    """The store ``settings.store_url`` names (nothing is contacted yet)."""
    s3 = settings.s3
    return open_store(
        settings.store_url,
        endpoint=s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        secure=s3.secure,
        region=s3.region,
    )


def prepare_repository(publisher: Publisher, keys: KeySet, *, initialize: bool) -> bytes:
    """The repository's trusted root, creating the repository first when allowed and possible.

    An operator usually holds only the online keys: it cannot sign a root, so it needs a repository
    someone initialized with the root keys (``edgefleet publish`` does so on first use).
    Store outages propagate as :class:`~edgefleet_core.errors.StoreError` (or a
    :class:`~edgefleet_core.errors.VerificationError` caused by one): the caller retries those.
    """
    if initialize and not keys.online_only:
        fresh = not publisher.is_initialized()
        root = publisher.ensure_initialized()
        if fresh:
            logger.info("initialized a new TUF repository (root version 1): devices must be given this root")
        return root
    if not publisher.is_initialized():
        why = "the keys hold only the online roles" if keys.online_only else "initializing is turned off"
        raise RuntimeSetupError(
            f"the store has no TUF repository yet and {why}: initialize it once with the root keys "
            "(`edgefleet keys root --store URL --keys DIR --out root.json`, DIR from `edgefleet keys init`)"
        )
    return publisher.trusted_root()


def build_reconciler(
    settings: OperatorSettings,
    *,
    executor: ThreadPoolExecutor | None = None,
    api: Callable[[], ApiEndpoint] | None = None,
    metrics: OperatorMetrics | None = None,
) -> EdgeModelReconciler:
    """The reconciler ``settings`` describe: store, keys, publisher (repository ready), fleet, sources, cache.

    ``executor`` runs the per-class builds; without one a pool of ``settings.workers`` threads is
    made (its idle threads end with the process). ``api``: the Kubernetes API credentials, asked
    for at each call (kopf's login); needed with ``build_mode="jobs"``. ``metrics``: where the
    reconciler records (``None``: a registry of its own, as ``reconciler.metrics``). Raises
    :class:`RuntimeSetupError` for settings a person must fix, and store errors as they come
    (:func:`is_store_outage` tells which to retry).
    """
    keys = load_keys(settings.keys_dir)
    store = open_artifact_store(settings)
    publisher = Publisher(store, keys)
    prepare_repository(publisher, keys, initialize=settings.initialize_repository)
    try:
        sources = SourceResolver(base_dir=settings.base_dir, store_options=settings.s3.as_source_options())
    except ValueError as exc:
        raise RuntimeSetupError(f"S3 options: {exc}") from None
    cache = VariantCache(settings.cache_dir) if settings.cache_dir is not None else None
    pool = executor or ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="edgefleet-build")
    dispatcher = _job_dispatcher(settings, store, api)
    logger.info(
        "reconciler ready: store %s, keys %s, builds in %s",
        settings.store_url,
        settings.keys_dir,
        f"{settings.workers} worker(s)" if dispatcher is None else "Kubernetes Jobs",
    )
    return EdgeModelReconciler(
        publisher=publisher,
        fleet=FleetState(store),
        sources=sources,
        bundles=PublishedBundles(store),
        cache=cache,
        trainer=load_trainer(deferred=True),
        executor=pool,
        poll_interval=settings.rollout_poll_seconds,
        resync_interval=settings.resync_seconds,
        dispatcher=dispatcher,
        dispatch_poll_interval=settings.jobs.poll_seconds if settings.jobs is not None else DEFAULT_DISPATCH_POLL_S,
        metrics=metrics,
    )


def _job_dispatcher(
    settings: OperatorSettings, store: ArtifactStore, api: Callable[[], ApiEndpoint] | None
) -> KubeJobDispatcher | None:
    if settings.build_mode != "jobs":
        return None
    if settings.jobs is None or api is None:
        raise RuntimeSetupError("building in Jobs needs a Kubernetes API server (it runs under the kopf operator)")
    access = StoreAccess(settings.store_url, endpoint=settings.s3.endpoint, region=settings.s3.region)
    return KubeJobDispatcher(settings.jobs, KubeApi(api), store, access)


@contextlib.contextmanager
def reconciler_pool(settings: OperatorSettings) -> Iterator[tuple[EdgeModelReconciler, ThreadPoolExecutor]]:
    """:func:`build_reconciler` with a pool of ``settings.workers`` threads that is shut down on exit."""
    pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="edgefleet-build")
    try:
        yield build_reconciler(settings, executor=pool), pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
