"""``edgefleet bench gateway``, registered through the ``edgefleet.bench`` entry point."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from edgefleet_core.cli.bench_cmd import report

SOAK_HELP = (
    "Soak instead of the benchmark: hold health load for SECONDS (600 for the issue's ten minutes) while agents"
    " disconnect and reconnect, closing channels, cancelling watch streams mid-stream and resetting TCP"
    " connections; sample the gateway's RSS, descriptors and threads. Fails unless it holds: RSS growth after"
    " the warm-up at most max(32 MiB, 10 %), slope over the second half at most 1 MiB/min (a leak under 1 KiB"
    " per reconnection at the default churn), descriptors and threads back to their count before the churn,"
    " zero error responses and failed connections. Defaults with it: 1,000 agents, 500 reports/s."
)


def command(
    out: Annotated[
        Path | None,
        typer.Option(
            "--json", help="Results JSON (default bench/results/gateway.json; gateway-soak.json with --soak)."
        ),
    ] = None,
    markdown: Annotated[
        Path | None,
        typer.Option(help="Markdown file whose bench:gateway (or bench:gateway-soak) section gets the table."),
    ] = Path("BENCHMARKS.md"),
    quick: Annotated[
        bool, typer.Option(help="500 agents, 8 s of health load, an 8 MB bundle: a CI smoke run, not the figures.")
    ] = False,
    agents: Annotated[
        int | None, typer.Option(min=1, help="Simulated agents (default 5,000; 500 with --quick; 1,000 with --soak).")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=1.0, help="Seconds of health-report load (default 30; 8 with --quick).")
    ] = None,
    health_rate: Annotated[
        float | None,
        typer.Option(
            min=1.0, help="Health reports/s offered, open loop (default 2,100: 5 % over the target; 500 with --soak)."
        ),
    ] = None,
    soak: Annotated[float | None, typer.Option(min=1.0, metavar="SECONDS", help=SOAK_HELP)] = None,
    churn: Annotated[
        float,
        typer.Option(
            min=0.0,
            metavar="PER_S",
            help="With --soak: agents disconnected and reconnected per second, each on a new channel.",
        ),
    ] = 20.0,
    warmup: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            metavar="SECONDS",
            help="With --soak: first part excluded from the memory bound (default a fifth of it, at most 60).",
        ),
    ] = None,
) -> None:
    """One gateway process under simulated mTLS agents: connections, health intake, artifact streaming, push.

    With --soak: the same gateway held under load for a long time while agents churn, checked for leaks and errors.
    """
    if soak is not None:
        if quick or duration is not None:
            raise typer.BadParameter("--soak sets its own duration; it does not go with --quick or --duration")
        _soak(out, markdown, soak, agents, health_rate, churn, warmup)
        return
    # The benchmark pulls in gRPC, ONNX and the fleet state: loaded only when it runs.
    from edgefleet_operator.bench import gateway as bench

    config = (bench.GatewayBenchConfig.quick_run if quick else bench.GatewayBenchConfig.full)(agents, duration)
    if health_rate is not None:
        # Below saturation the p99 is service time; above it, queueing (the default offers 2,100/s).
        config = dataclasses.replace(config, health_rate=health_rate)
    out = out or Path("bench/results/gateway.json")
    report(
        "gateway",
        lambda: bench.benchmark(config, out, markdown, progress=typer.echo),
        error=bench.GatewayBenchError,
        table=bench.markdown,
        out=out,
        missed=bench.missed,
    )


def _soak(
    out: Path | None,
    markdown: Path | None,
    seconds: float,
    agents: int | None,
    health_rate: float | None,
    churn: float,
    warmup: float | None,
) -> None:
    from edgefleet_operator.bench import soak as bench
    from edgefleet_operator.bench.gateway import GatewayBenchError

    out = out or Path("bench/results/gateway-soak.json")
    defaults = bench.SoakConfig(duration_s=seconds)
    try:
        config = bench.SoakConfig(
            duration_s=seconds,
            agents=agents or defaults.agents,
            health_rate=health_rate or defaults.health_rate,
            churn_rate=churn,
            warmup_s=warmup,
        )
    except GatewayBenchError as e:
        raise typer.BadParameter(str(e)) from e
    report(
        "gateway --soak",
        lambda: bench.benchmark(config, out, markdown, progress=typer.echo),
        error=GatewayBenchError,
        table=bench.markdown,
        out=out,
        missed=bench.missed,
    )
