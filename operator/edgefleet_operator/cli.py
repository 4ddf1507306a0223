"""``edgefleet gateway``: the fleet PKI, bootstrap tokens, assignments, and the gateway server itself.

Commands import their machinery when they run, so ``edgefleet --help`` stays fast. Every failure
we expect prints ``error: ...`` on stderr and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgefleet_core.errors import EdgeFleetError

if TYPE_CHECKING:
    from edgefleet_core.store.base import ArtifactStore
    from edgefleet_operator.fleet.state import FleetState
    from edgefleet_operator.gateway.server import GatewayServer

app = typer.Typer(help="The fleet gateway: device enrollment (PKI, tokens), assignments, health, and the server.")
pki_app = typer.Typer(help="The fleet CA and the gateway's server certificate.")
token_app = typer.Typer(help="Bootstrap tokens devices enroll with.")
app.add_typer(pki_app, name="pki")
app.add_typer(token_app, name="token")

StoreOption = Annotated[
    str, typer.Option("--store", help="file:///absolute/path or s3://bucket or s3://bucket/prefix.")
]
NamespaceOption = Annotated[str, typer.Option("--namespace", help="Kubernetes namespace of the devices.")]
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90``, ``45s``, ``30m``, ``1h``, ``7d`` as a time span."""
    found = _DURATION.fullmatch(text.strip())
    if found is None:
        raise typer.BadParameter(f"{text!r} is not a duration like 30s, 15m, 1h or 7d")
    return timedelta(seconds=float(found.group(1)) * _UNITS[found.group(2) or "s"])


@contextmanager
def _errors() -> Iterator[None]:
    """Our errors (and file-system ones) as ``error: ...`` and exit code 1."""
    try:
        yield
    except EdgeFleetError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    except OSError as e:
        typer.echo(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
        raise typer.Exit(code=1) from None


def _open(store_url: str) -> tuple[ArtifactStore, FleetState]:
    from edgefleet_core.store.url import open_store
    from edgefleet_operator.fleet.state import FleetState

    store = open_store(store_url)
    return store, FleetState(store)


# ------------------------------------------------------------------------------------------ pki


@pki_app.command("init")
def pki_init(
    directory: Annotated[Path, typer.Argument(help="Folder for ca.pem, ca-key.pem, server.pem, server-key.pem.")],
    host: Annotated[
        list[str] | None, typer.Option("--host", help="DNS name or IP the gateway is reached at (repeatable).")
    ] = None,
) -> None:
    """Create the fleet CA and a server certificate for the gateway."""
    from edgefleet_operator.gateway.pki import init_pki

    hosts = host or ["localhost", "127.0.0.1"]
    with _errors():
        init_pki(directory, hosts)
    typer.echo(f"created the fleet CA and a server certificate for {', '.join(hosts)} in {directory}")


@pki_app.command("renew-server")
def pki_renew_server(
    directory: Annotated[Path, typer.Argument(help="Folder made by `gateway pki init` (the CA stays).")],
    host: Annotated[
        list[str] | None, typer.Option("--host", help="DNS name or IP the gateway is reached at (repeatable).")
    ] = None,
    days: Annotated[int, typer.Option(min=1, max=825, help="Days the new certificate is valid.")] = 365,
) -> None:
    """Issue the gateway a new server certificate from the fleet CA (before the old one expires, or for new hosts)."""
    from edgefleet_operator.gateway.pki import renew_server_certificate

    hosts = host or ["localhost", "127.0.0.1"]
    with _errors():
        renew_server_certificate(directory, hosts, validity=timedelta(days=days))
    typer.echo(f"renewed the server certificate for {', '.join(hosts)} in {directory} ({days} days)")


@pki_app.command("secret")
def pki_secret(
    directory: Annotated[Path, typer.Argument(help="Folder made by `gateway pki init`.")],
    name: Annotated[str, typer.Option(help="Secret name.")] = "edgefleet-gateway-pki",
    namespace: Annotated[str, typer.Option(help="Secret namespace.")] = "edgefleet-system",
) -> None:
    """Print the PKI folder as a Kubernetes Secret manifest for the gateway (the Helm chart mounts it)."""
    import base64

    import yaml

    from edgefleet_operator.gateway.pki import pki_secret_files

    with _errors():
        files = pki_secret_files(directory)
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "edgefleet"}},
        "type": "Opaque",
        "data": {file: base64.b64encode(data).decode("ascii") for file, data in files.items()},
    }
    typer.echo(yaml.safe_dump(manifest, sort_keys=False), nl=False)


# ---------------------------------------------------------------------------------------- token


@token_app.command("create")
def token_create(
    store: StoreOption,
    namespace: NamespaceOption,
    device_class: Annotated[str, typer.Option("--device-class", help="Class the enrolled device is placed in.")],
    ttl: Annotated[str, typer.Option("--ttl", help="How long the token is valid (30m, 1h, 7d).")] = "1h",
    device_name: Annotated[
        str | None, typer.Option("--device-name", help="Pin the device name (the device's own is ignored).")
    ] = None,
    uses: Annotated[int, typer.Option("--uses", min=1, help="How many devices may enroll with it.")] = 1,
) -> None:
    """Create a bootstrap token; prints only the token."""
    lifetime = parse_duration(ttl)
    with _errors():
        _, fleet = _open(store)
        token = fleet.create_token(namespace, device_class, ttl=lifetime, device_name=device_name, uses=uses)
    typer.echo(token)


# ----------------------------------------------------------------------------------- assignments


@app.command()
def assign(
    store: StoreOption,
    namespace: NamespaceOption,
    model: Annotated[str, typer.Option("--model", help="Model name (as published).")],
    version: Annotated[str, typer.Option("--version", help="Bundle version to act on.")],
    device: Annotated[list[str] | None, typer.Option("--device", help="Device name (repeatable).")] = None,
    device_class: Annotated[
        str | None, typer.Option("--device-class", help="Every device of this class in the namespace.")
    ] = None,
    action: Annotated[str, typer.Option("--action", help="install, rollback or remove.")] = "install",
) -> None:
    """Assign a model version to devices; prints the new revision."""
    from edgefleet_operator.fleet.bundles import resolve_bundle

    if action not in ("install", "rollback", "remove"):
        raise typer.BadParameter(f"{action!r} is not install, rollback or remove", param_hint="--action")

    if bool(device) == (device_class is not None):
        raise typer.BadParameter("give either --device (one or more) or --device-class", param_hint="--device")
    with _errors():
        artifacts, fleet = _open(store)
        records = fleet.list_devices(namespace)
        if device_class is not None:
            groups = {device_class: [r.name for r in records if r.device_class == device_class and not r.revoked]}
            if not groups[device_class]:
                raise EdgeFleetError(f"no enrolled devices of class {device_class} in namespace {namespace}")
        else:
            classes = {r.name: r.device_class for r in records}
            unknown = [name for name in device or [] if name not in classes]
            if unknown:
                raise EdgeFleetError(f"not enrolled in namespace {namespace}: {', '.join(unknown)}")
            revoked = sorted(r.name for r in records if r.revoked and r.name in (device or []))
            if revoked:
                raise EdgeFleetError(f"revoked in namespace {namespace}, not assigned: {', '.join(revoked)}")
            groups = {}
            for name in device or []:
                groups.setdefault(classes[name], []).append(name)
        revision = 0
        for cls, names in sorted(groups.items()):
            # A bundle is built per device class, so each class gets its own paths (and revision).
            if action == "remove":  # nothing to fetch: the model may be long unpublished
                paths, digest, length = [], "", 0
            else:
                bundle = resolve_bundle(artifacts, device_class=cls, namespace=namespace, model=model, version=version)
                paths, digest, length = bundle.target_paths, bundle.bundle_sha256, bundle.bundle_length
            revision = fleet.assign(
                namespace,
                names,
                model_namespace=namespace,
                model_name=model,
                version=version,
                action=action,  # type: ignore[arg-type]  # checked above
                target_paths=paths,
                bundle_sha256=digest,
                bundle_length=length,
            )
    typer.echo(revision)


@app.command()
def revoke(
    store: StoreOption,
    namespace: NamespaceOption,
    device: Annotated[str, typer.Option("--device", help="Device name.")],
) -> None:
    """Revoke a device: its certificate is refused from now on (within the gateways' cache time)."""
    with _errors():
        _, fleet = _open(store)
        record = fleet.revoke_device(namespace, device)
    typer.echo(f"revoked {record.device_id} (certificate serial {record.cert_serial})")


@app.command()
def devices(
    store: StoreOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List enrolled devices with their status: when a gateway last heard from them, what they serve."""
    with _errors():
        _, fleet = _open(store)
        records = fleet.list_devices()
        # The status is the device's health merged over every gateway replica's shard.
        status = {h.device_id: h for h in fleet.read_health()}
    rows = []
    for r in records:
        found = status.get(r.device_id)
        window = found.last_window if found is not None else None
        active = [f"{m.model_namespace}/{m.model_name}@{m.version}" for m in (window.models if window else [])]
        rows.append((r, found.updated_at if found is not None else None, active))
    if as_json:
        documents = [
            {**r.model_dump(mode="json"), "last_seen": seen.isoformat() if seen else None, "models": active}
            for r, seen, active in rows
        ]
        typer.echo(json.dumps(documents, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("device", "class", "serial", "expires", "revoked", "last seen", "models")
    for r, seen, active in rows:
        table.add_row(r.device_id, r.device_class, r.cert_serial, r.cert_not_after.date().isoformat(),
                      "yes" if r.revoked else "no", seen.isoformat(timespec="seconds") if seen else "-",
                      ", ".join(active) or "-")  # fmt: skip
    Console().print(table)


@app.command()
def health(
    store: StoreOption,
    namespace: NamespaceOption,
    model: Annotated[str, typer.Option("--model", help="Model name.")],
    device_class: Annotated[str | None, typer.Option("--device-class", help="Only this device class.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Health of a model per version and device class, aggregated over every reporting device."""
    with _errors():
        _, fleet = _open(store)
        aggregates = fleet.aggregate(namespace, model, device_class)
    if as_json:
        typer.echo(json.dumps([a.model_dump(mode="json") for a in aggregates], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("class", "version", "devices", "inferences", "error rate", "p95 max ms", "ok/failed/rolled back")
    for a in aggregates:
        table.add_row(a.device_class, a.version, str(a.devices_reporting), str(a.inference_count),
                      f"{a.error_rate:.4f}", f"{a.p95_ms_max:.2f}",
                      f"{a.installs_succeeded}/{a.installs_failed}/{a.installs_rolled_back}")  # fmt: skip
    Console().print(table)


# ----------------------------------------------------------------------------------------- serve


@app.command()
def serve(
    store: StoreOption,
    pki: Annotated[Path, typer.Option("--pki", help="Folder made by `gateway pki init`.")],
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT of the fleet (mTLS) port.")] = "0.0.0.0:7443",
    enroll_listen: Annotated[
        str, typer.Option("--enroll-listen", help="HOST:PORT of the enrollment (TLS) port.")
    ] = "0.0.0.0:7444",
    metrics_listen: Annotated[
        str | None, typer.Option("--metrics-listen", help="HOST:PORT for Prometheus metrics.")
    ] = None,
    poll_interval: Annotated[
        float, typer.Option("--poll-interval", min=0.01, help="Seconds between looks at new assignments.")
    ] = 0.2,
    status_interval: Annotated[
        float, typer.Option("--status-interval", min=0.01, help="Seconds between health writes per device.")
    ] = 10.0,
    heartbeat_interval: Annotated[
        float, typer.Option("--heartbeat-interval", min=1.0, help="Seconds between health reports agents send.")
    ] = 30.0,
    grace_period: Annotated[
        float, typer.Option("--grace-period", min=0.0, help="Seconds calls get to finish on shutdown.")
    ] = 5.0,
    identity_cache_ttl: Annotated[
        float,
        typer.Option(
            "--identity-cache-ttl",
            min=0.01,
            help="Seconds a device's record is trusted once read: a revocation (or a certificate superseded"
            " through another replica) bites within this time, open watch streams included.",
        ),
    ] = 30.0,
    replica_id: Annotated[
        str | None,
        typer.Option(
            "--replica-id",
            help="Names this replica's health shards (a-z, 0-9, '-'): a stable one (a StatefulSet pod name)"
            " resumes its counts after a restart; default: a random one per process.",
        ),
    ] = None,
    health_journal: Annotated[
        Path | None,
        typer.Option(
            "--health-journal",
            metavar="DIR",
            help="Folder where each health report is written before it is acknowledged, until it is in"
            " the store: a killed gateway restarted with the same --replica-id loses none (the chart uses"
            " an emptyDir). Needs --replica-id.",
        ),
    ] = None,
    gc_freeze_interval: Annotated[
        float,
        typer.Option(
            "--gc-freeze-interval",
            min=0.0,
            help="Seconds between moving long-lived objects out of the garbage collector's way (full"
            " collections otherwise pause thousands of connections); 0 leaves CPython's default.",
        ),
    ] = 10.0,
) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    from edgefleet_core.store.url import open_store
    from edgefleet_operator.gateway.server import GatewayConfig, GatewayServer

    with _errors():
        config = GatewayConfig(
            listen=listen,
            enroll_listen=enroll_listen,
            metrics_listen=metrics_listen,
            poll_interval=poll_interval,
            status_interval=status_interval,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            identity_cache_ttl=identity_cache_ttl,
            replica_id=replica_id,
            gc_freeze_interval=gc_freeze_interval or None,
            health_journal=health_journal,
        )
        server = GatewayServer(config, open_store(store), pki)
        asyncio.run(_serve(server))


async def _serve(server: GatewayServer) -> None:
    """Start, announce the bound addresses, and stop gracefully on SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    try:
        if server.metrics_address is not None:
            typer.echo(f"metrics on http://{server.metrics_address}/metrics", err=True)
        # The one line scripts and tests wait for (ports given as 0 show the real ones).
        sys.stdout.write(f"gateway listening fleet={server.fleet_address} enroll={server.enroll_address}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await server.stop()
