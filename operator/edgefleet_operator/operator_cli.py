"""``edgefleet operator``: run the Kubernetes operator, and print the CRDs it serves.

Commands import kopf and the reconciler only when they run, so ``edgefleet --help`` stays fast.
Every failure we expect prints ``error: ...`` on stderr and exits 1.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import typer

from edgefleet_core.cli.bundle_cmd import CacheDir, Endpoint, Region
from edgefleet_core.errors import EdgeFleetError

# ruff: noqa: PLC0415  (a CLI module: kopf and the reconciler are imported when a command runs)

if TYPE_CHECKING:
    from edgefleet_operator.kopf_app import KopfSettings
    from edgefleet_operator.runtime import OperatorSettings

app = typer.Typer(help="The EdgeFleet Kubernetes operator: reconciles EdgeModels against DeviceClasses.")

READY_LINE: Final = "operator ready"
"""Printed (with the replica's identity) once kopf has started and serves its resources."""
_LOG_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


@app.command()
def run(
    store: Annotated[
        str, typer.Option("--store", help="Artifact store: file:///absolute/path, s3://bucket or s3://bucket/prefix.")
    ],
    keys: Annotated[
        Path,
        typer.Option(
            "--keys", help="Signing key folder (the mounted keys Secret; the online keys suffice once published)."
        ),
    ],
    server: Annotated[
        str | None,
        typer.Option(
            "--server", help="Kubernetes API server URL; default: the in-cluster service account, else kubeconfig."
        ),
    ] = None,
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Serve EdgeModels in this namespace (repeatable).")
    ] = None,
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="Serve EdgeModels in every namespace.")
    ] = False,
    peering: Annotated[
        str | None,
        typer.Option(
            "--peering", help="Peering object shared by the replicas (it must exist): only one replica acts at a time."
        ),
    ] = None,
    standalone: Annotated[
        bool, typer.Option("--standalone", help="Run without peering (a single replica, or a test).")
    ] = False,
    priority: Annotated[
        int | None,
        typer.Option(
            "--priority",
            help="Peering priority: the highest live replica acts. Default: one derived from --identity, so "
            "replicas of one Deployment differ (equal priorities would all pause).",
        ),
    ] = None,
    identity: Annotated[
        str | None, typer.Option("--identity", help="This replica's name among its peers; default host@pid.")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="EdgeModels reconciled at once.")] = 2,
    resync_seconds: Annotated[
        float, typer.Option("--resync-seconds", min=1.0, help="Reconcile every EdgeModel at least this often.")
    ] = 300.0,
    rollout_poll_seconds: Annotated[
        float,
        typer.Option(
            "--rollout-poll-seconds", min=0.1, help="Step a rollout under way at least this often (device reports)."
        ),
    ] = 30.0,
    cache_dir: CacheDir = None,
    endpoint: Endpoint = None,
    region: Region = None,
    liveness: Annotated[
        str | None, typer.Option("--liveness", help="Serve a liveness probe here, e.g. http://0.0.0.0:8080/healthz.")
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen",
            help="HOST:PORT to serve Prometheus metrics on (/metrics), e.g. 0.0.0.0:9090; off by default.",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info or warning.")] = "info",
    build_mode: Annotated[
        str,
        typer.Option(
            "--build-mode",
            help="pool: build variants in the operator's worker threads; jobs: one Kubernetes Job per model and "
            "class runs edgefleet pipeline-job, and the operator signs and publishes what it built.",
        ),
    ] = "pool",
    job_image: Annotated[
        str | None,
        typer.Option("--job-image", help="Container image of the pipeline Jobs (with the edgefleet command)."),
    ] = None,
    job_namespace: Annotated[
        str | None,
        typer.Option("--job-namespace", help="Run the pipeline Jobs in this namespace; default: each EdgeModel's own."),
    ] = None,
    job_service_account: Annotated[
        str | None, typer.Option("--job-service-account", help="ServiceAccount the pipeline Jobs' pods run as.")
    ] = None,
    job_s3_secret: Annotated[
        str | None,
        typer.Option(
            "--job-s3-secret",
            help="Secret whose keys become the pipeline Jobs' environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).",
        ),
    ] = None,
    job_deadline_seconds: Annotated[
        int,
        typer.Option("--job-deadline-seconds", min=60, help="A pipeline Job running longer fails and is restarted."),
    ] = 3600,
    job_poll_seconds: Annotated[
        float,
        typer.Option("--job-poll-seconds", min=0.1, help="How often a model with a running pipeline Job is checked."),
    ] = 10.0,
    job_cpu: Annotated[
        str, typer.Option("--job-cpu", help="CPU each pipeline Job's pod requests (500m, 2); empty: no request.")
    ] = "1",
    job_memory: Annotated[
        str,
        typer.Option("--job-memory", help="Memory each pipeline Job's pod requests and is limited to; empty: none."),
    ] = "2Gi",
) -> None:
    """Run the operator until SIGTERM or SIGINT. S3 credentials come from AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY (or MINIO_ACCESS_KEY and MINIO_SECRET_KEY)."""
    from edgefleet_operator.jobs.manifest import JobSettings
    from edgefleet_operator.kopf_app import KopfSettings, default_identity, identity_priority
    from edgefleet_operator.runtime import OperatorSettings, S3Options

    if bool(namespace) == all_namespaces:
        raise typer.BadParameter("give either --namespace (one or more) or --all-namespaces", param_hint="--namespace")
    if (peering is None) == (not standalone):
        raise typer.BadParameter("give either --peering NAME or --standalone", param_hint="--peering")
    if build_mode not in ("pool", "jobs"):
        raise typer.BadParameter(f"{build_mode!r} is not pool or jobs", param_hint="--build-mode")
    if (build_mode == "jobs") != (job_image is not None):
        raise typer.BadParameter("--build-mode jobs needs --job-image (and only it)", param_hint="--job-image")
    if log_level not in _LOG_LEVELS:
        raise typer.BadParameter(f"{log_level!r} is not debug, info or warning", param_hint="--log-level")
    try:
        jobs = (
            JobSettings(
                image=job_image,
                namespace=job_namespace,
                service_account=job_service_account,
                s3_secret=job_s3_secret,
                active_deadline_seconds=job_deadline_seconds,
                poll_seconds=job_poll_seconds,
                cpu=job_cpu or None,
                memory=job_memory or None,
            )
            if job_image is not None
            else None
        )
        settings = OperatorSettings(
            store_url=store,
            keys_dir=keys,
            cache_dir=cache_dir,
            workers=workers,
            s3=S3Options(endpoint=endpoint, region=region),
            rollout_poll_seconds=rollout_poll_seconds,
            resync_seconds=resync_seconds,
            build_mode="jobs" if build_mode == "jobs" else "pool",
            jobs=jobs,
        )
        name = identity or default_identity()
        kopf_settings = KopfSettings(
            server=server,
            namespaces=tuple(namespace or ()),
            peering=peering,
            priority=identity_priority(name) if priority is None else priority,
            resync_seconds=resync_seconds,
            liveness=liveness,
            metrics_listen=metrics_listen,
            identity=name,
        )
    except (EdgeFleetError, ValueError) as exc:
        raise _fail(str(exc)) from None
    _configure_logging(_LOG_LEVELS[log_level])
    import kopf

    try:
        asyncio.run(_serve(settings, kopf_settings))
    except (EdgeFleetError, kopf.LoginError) as exc:
        raise _fail(str(exc)) from None


async def _serve(settings: OperatorSettings, kopf_settings: KopfSettings) -> None:
    from edgefleet_operator.kopf_app import EdgeModelDriver, serve

    ready = asyncio.Event()
    driver = EdgeModelDriver(settings, kopf_settings)

    async def announce() -> None:
        await ready.wait()
        if driver.metrics_address is not None:
            typer.echo(f"metrics on http://{driver.metrics_address}/metrics", err=True)
        scope = ",".join(kopf_settings.namespaces) or "*"
        peering = kopf_settings.peering or "standalone"
        typer.echo(f"{READY_LINE} identity={kopf_settings.identity} namespaces={scope} peering={peering}")
        sys.stdout.flush()

    announcer = asyncio.create_task(announce())
    try:
        await serve(settings, kopf_settings, ready_flag=ready, driver=driver)
    finally:
        announcer.cancel()


def _configure_logging(level: int) -> None:
    """Our and kopf's log lines at ``level`` on stderr; other libraries stay as ``edgefleet -v`` set them."""
    if not logging.getLogger().handlers:  # run as `python -m`, without the edgefleet command's set-up
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("edgefleet_operator", "edgefleet_core", "kopf"):
        logging.getLogger(name).setLevel(level)


@app.command()
def crds(
    peering: Annotated[
        bool, typer.Option("--peering", help="Also print kopf's peering CRDs (needed for --peering replicas).")
    ] = False,
) -> None:
    """Print the CustomResourceDefinitions as YAML, for kubectl apply -f -."""
    import yaml

    from edgefleet_core.resources.crds import CRD_FILES, crd_text

    documents = [crd_text(name).strip() for name in CRD_FILES]
    if peering:
        from edgefleet_operator.devtools.kube_api.catalog import kopf_peering_crds

        documents += [yaml.safe_dump(crd, sort_keys=False).strip() for crd in kopf_peering_crds()]
    typer.echo("\n---\n".join(documents))


if __name__ == "__main__":
    app()
