"""``edgefleet agent …``: run the device agent, or show what its state folder holds.

A thin edge: options are parsed into :class:`~edgefleet_agent.daemon.AgentSettings` and handed to
the daemon. The agent's machinery (gRPC, ONNX Runtime, cryptography) is imported when a command
runs, so ``edgefleet --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from edgefleet_agent.accelerator import AcceleratorServer

app = typer.Typer(
    help="The device agent: enroll, follow assignments with verified A/B updates, serve inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

_CPU_EP = "CPUExecutionProvider"


def _labels(values: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for value in values:
        key, sep, label = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = label
    return labels


def _accelerator(server: str | None, models: Path | None, timeout: float) -> AcceleratorServer | None:
    """The accel-server to send tails to; both options or neither, checked before the agent starts."""
    if server is None and models is None:
        return None
    import tempfile

    from edgefleet_agent.accelerator import AcceleratorServer, parse_target

    if server is None:
        raise typer.BadParameter("--accel-models needs --accel-server HOST:PORT", param_hint="--accel-server")
    try:
        target = parse_target(server)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--accel-server") from e
    if models is None:
        raise typer.BadParameter(
            "name the accel-server's --models folder: stage models are placed there for it", param_hint="--accel-models"
        )
    if not models.is_dir():
        raise typer.BadParameter(f"{models} is not a folder", param_hint="--accel-models")
    try:
        with tempfile.NamedTemporaryFile(dir=models, prefix=".edgefleet-agent-probe-"):
            pass
    except OSError as e:
        raise typer.BadParameter(
            f"cannot write to {models} ({e.strerror}): the agent places tail models there for the accel-server",
            param_hint="--accel-models",
        ) from e
    return AcceleratorServer(target, models, timeout=timeout)


@app.command()
def run(
    state: Annotated[Path, typer.Option("--state", help="The agent's state folder (created if missing).")],
    gateway: Annotated[str, typer.Option("--gateway", help="HOST:PORT of the gateway's fleet (mTLS) port.")],
    enroll_gateway: Annotated[
        str, typer.Option("--enroll-gateway", help="HOST:PORT of the gateway's enrollment port.")
    ],
    gateway_ca: Annotated[
        Path, typer.Option("--gateway-ca", help="CA certificate (PEM) the gateway's certificate is checked against.")
    ],
    tuf_root: Annotated[
        Path, typer.Option("--tuf-root", help="Trusted TUF root metadata (root.json) the device was provisioned with.")
    ],
    name: Annotated[str, typer.Option("--name", help="Device name to enroll with (a DNS label).")],
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="EDGEFLEET_AGENT_TOKEN",
            help=(
                "Bootstrap token (first start only). Prefer --token-file or the environment: "
                "command-line arguments are visible to other users."
            ),
        ),
    ] = None,
    token_file: Annotated[Path | None, typer.Option("--token-file", help="File holding the bootstrap token.")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="Device label KEY=VALUE (repeatable).")] = None,
    inference_listen: Annotated[
        str, typer.Option("--inference-listen", help="HOST:PORT of the local inference API (port 0: any free one).")
    ] = "127.0.0.1:0",
    providers: Annotated[
        str, typer.Option("--providers", help="ONNX Runtime execution providers, comma-separated, preferred first.")
    ] = _CPU_EP,
    heartbeat_interval: Annotated[
        float | None,
        typer.Option("--heartbeat-interval", min=0.05, help="Seconds between health reports (default: the gateway's)."),
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen",
            help="HOST:PORT to serve Prometheus metrics on (/metrics), e.g. 0.0.0.0:9092; off by default.",
        ),
    ] = None,
    keepalive: Annotated[
        float,
        typer.Option(
            "--keepalive",
            min=10.0,
            help="Seconds between keepalive pings to the gateway: how soon a silent (stalled) connection "
            "is given up for a new one. At least 10 (the gateway refuses more frequent pings).",
        ),
    ] = 300.0,
    accel_server: Annotated[
        str | None,
        typer.Option(
            "--accel-server",
            help="HOST:PORT or unix:PATH of an 'edgefleet accel-server serve' next to the accelerator: "
            "partitioned models' tails run there (locally while it does not answer). Needs --accel-models.",
        ),
    ] = None,
    accel_models: Annotated[
        Path | None,
        typer.Option("--accel-models", help="The accel-server's --models folder, shared with it (the agent writes)."),
    ] = None,
    accel_timeout: Annotated[
        float,
        typer.Option(
            "--accel-timeout",
            min=0.1,
            help="Seconds the accel-server may take to load a tail or answer a request before the tail runs "
            "locally (a first run that builds kernels, e.g. TensorRT, may need more).",
        ),
    ] = 10.0,
) -> None:
    """Enroll once (the token is needed only the first time), then run until SIGTERM or SIGINT.

    Prints ``agent ready device=<id> inference=HOST:PORT`` when serving.
    """
    import asyncio

    from edgefleet_agent.daemon import Agent, AgentSettings
    from edgefleet_agent.errors import AgentError
    from edgefleet_agent.identity import IdentityStore, read_token
    from edgefleet_agent.metrics import parse_listen

    if metrics_listen is not None:
        try:
            parse_listen(metrics_listen)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--metrics-listen") from e
    try:
        secret = read_token(token, token_file, enrolled=IdentityStore(state).enrolled())
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--token/--token-file") from e
    chosen = tuple(p.strip() for p in providers.split(",") if p.strip())
    if not chosen:
        raise typer.BadParameter("name at least one execution provider", param_hint="--providers")
    accelerator = _accelerator(accel_server, accel_models, accel_timeout)
    settings = AgentSettings(
        state_dir=state,
        gateway=gateway,
        enroll_gateway=enroll_gateway,
        gateway_ca=gateway_ca,
        tuf_root=tuf_root,
        name=name,
        token=secret,
        labels=_labels(label or []),
        inference_listen=inference_listen,
        providers=chosen,
        heartbeat_interval=heartbeat_interval,
        metrics_listen=metrics_listen,
        keepalive=keepalive,
        accelerator=accelerator,
    )
    # A daemon's install outcomes belong in its log even without -v.
    agent_log = logging.getLogger("edgefleet_agent")
    if agent_log.getEffectiveLevel() > logging.INFO:
        agent_log.setLevel(logging.INFO)

    agent = Agent(settings)

    def ready(device_id: str, address: str) -> None:
        typer.echo(f"agent ready device={device_id} inference={address}")
        if agent.metrics_address is not None:
            typer.echo(f"metrics on http://{agent.metrics_address}/metrics", err=True)

    try:
        asyncio.run(agent.run(ready, handle_signals=True))
    except AgentError as e:
        typer.echo(f"edgefleet agent: {e}", err=True)
        raise typer.Exit(1) from e


@app.command()
def status(
    state: Annotated[Path, typer.Option("--state", help="The agent's state folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """What the state folder holds: identity, models and slots, pending install reports."""
    from edgefleet_agent.daemon import Progress
    from edgefleet_agent.errors import AgentError
    from edgefleet_agent.identity import IdentityStore, describe
    from edgefleet_agent.reports import ReportQueue
    from edgefleet_agent.slots import SlotStore

    if not state.is_dir():
        typer.echo(f"edgefleet agent: {state} is not a folder", err=True)
        raise typer.Exit(1)
    try:
        identity = IdentityStore(state).load()
    except AgentError as e:
        typer.echo(f"edgefleet agent: {e}", err=True)
        raise typer.Exit(1) from e
    models: list[dict[str, Any]] = []
    for slots in SlotStore(state / "models").models():
        entry: dict[str, Any] = {"namespace": slots.namespace, "name": slots.name}
        try:
            entry.update(slots.pointer().model_dump(mode="json"))
        except AgentError as e:
            entry["error"] = str(e)
        models.append(entry)
    pending = [
        {
            "revision": r.revision,
            "model": f"{r.model_namespace}/{r.model_name}",
            "to_version": r.to_version,
            "outcome": r.outcome,
            "reason": r.reason,
        }
        for r in ReportQueue(state).pending()
    ]
    summary: dict[str, Any] = {
        "identity": None if identity is None else describe(identity),
        "last_revision": Progress(state).last_revision,
        "models": models,
        "pending_reports": pending,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    _print_status(summary)


def _print_status(summary: dict[str, Any]) -> None:
    identity = summary["identity"]
    if identity is None:
        typer.echo("identity: not enrolled")
    else:
        expired = " (expired)" if identity["certificate_expired"] else ""
        typer.echo(
            f"identity: {identity['device_id']} class={identity['device_class']} "
            f"certificate until {identity['certificate_not_after']}{expired}"
        )
    typer.echo(f"last applied revision: {summary['last_revision']}")
    if not summary["models"]:
        typer.echo("models: none")
    for m in summary["models"]:
        if "error" in m:
            typer.echo(f"model {m['namespace']}/{m['name']}: {m['error']}")
            continue
        trial = " (trial, not committed)" if m["trial"] else ""
        previous = f", previous {m['previous_version']} in slot {m['previous_slot']}" if m["previous_version"] else ""
        typer.echo(
            f"model {m['namespace']}/{m['name']}: {m['active_version'] or '-'} in slot {m['active_slot'] or '-'}"
            f"{trial}{previous}"
        )
    typer.echo(f"pending install reports: {len(summary['pending_reports'])}")
    for r in summary["pending_reports"]:
        typer.echo(f"  revision {r['revision']} {r['model']} {r['to_version']}: {r['outcome']} ({r['reason']})")
