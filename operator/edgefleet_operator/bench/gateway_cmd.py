"""``edgefleet bench gateway``, registered through the ``edgefleet.bench`` entry point."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from edgefleet_core.cli.bench_cmd import report


def command(
    out: Annotated[Path, typer.Option("--json", help="Results JSON.")] = Path("bench/results/gateway.json"),
    markdown: Annotated[
        Path | None, typer.Option(help="Markdown file whose bench:gateway section gets the table.")
    ] = Path("BENCHMARKS.md"),
    quick: Annotated[
        bool, typer.Option(help="500 agents, 8 s of health load, an 8 MB bundle: a CI smoke run, not the figures.")
    ] = False,
    agents: Annotated[
        int | None, typer.Option(min=1, help="Simulated agents (default 5,000; 500 with --quick).")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=1.0, help="Seconds of health-report load (default 30; 8 with --quick).")
    ] = None,
    health_rate: Annotated[
        float | None,
        typer.Option(min=1.0, help="Health reports/s offered, open loop (default 2,100: 5 % over the target)."),
    ] = None,
) -> None:
    """One gateway process under simulated mTLS agents: connections, health intake, artifact streaming, push."""
    # The benchmark pulls in gRPC, ONNX and the fleet state: loaded only when it runs.
    from edgefleet_operator.bench import gateway as bench

    config = (bench.GatewayBenchConfig.quick_run if quick else bench.GatewayBenchConfig.full)(agents, duration)
    if health_rate is not None:
        # Below saturation the p99 is service time; above it, queueing (the default offers 2,100/s).
        config = dataclasses.replace(config, health_rate=health_rate)
    report(
        "gateway",
        lambda: bench.benchmark(config, out, markdown, progress=typer.echo),
        error=bench.GatewayBenchError,
        table=bench.markdown,
        out=out,
        missed=bench.missed,
    )
