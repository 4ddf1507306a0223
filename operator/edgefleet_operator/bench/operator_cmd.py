"""``edgefleet bench operator``, registered through the ``edgefleet.bench`` entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet_core.cli.bench_cmd import report


def command(
    out: Annotated[Path, typer.Option("--json", help="Results JSON.")] = Path("bench/results/operator.json"),
    markdown: Annotated[
        Path | None, typer.Option(help="Markdown file whose bench:operator section gets the table.")
    ] = Path("BENCHMARKS.md"),
    quick: Annotated[bool, typer.Option(help="12 EdgeModels: a CI smoke run, not the figures.")] = False,
    models: Annotated[
        int | None, typer.Option(min=1, max=5000, help="EdgeModels per timed pass (default 60; 12 with --quick).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, max=64, help="Reconciles at a time, baseline and operator alike (default 2).")
    ] = None,
) -> None:
    """EdgeModels reconciled per second by the kopf operator against the test API server vs the reconciler alone."""
    # The benchmark pulls in kopf, aiohttp, ONNX and the reconciler: loaded only when it runs.
    from edgefleet_operator.bench import operator as bench

    config = (bench.OperatorBenchConfig.quick_run if quick else bench.OperatorBenchConfig.full)(models, workers)
    report(
        "operator",
        lambda: bench.benchmark(config, out, markdown, progress=typer.echo),
        error=bench.OperatorBenchError,
        table=bench.markdown,
        out=out,
    )
