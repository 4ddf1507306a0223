"""``edgefleet bench partition``, registered through the ``edgefleet.bench`` entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet_core.cli.bench_cmd import report


def command(
    out: Annotated[Path, typer.Option("--json", help="Results JSON.")] = Path("bench/results/partition.json"),
    markdown: Annotated[
        Path | None, typer.Option(help="Markdown file whose bench:partition section gets the tables.")
    ] = Path("BENCHMARKS.md"),
    quick: Annotated[
        bool, typer.Option(help="60 requests, one round, 10 profiling runs: a CI smoke run, not the figures.")
    ] = False,
    remote: Annotated[
        bool, typer.Option(help="Also pipeline with the tail in an accel-server subprocess on loopback.")
    ] = True,
    repeat: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Independent runs of every model, taking turns; ratios and targets are their medians. "
            "Default 5, or 1 with --quick.",
        ),
    ] = None,
) -> None:
    """Whole model on one and two cores vs partitioned sequential and pipelined (in-process and remote)."""
    # The benchmark pulls in ONNX Runtime, PyTorch (to build the models) and gRPC: loaded only when it runs.
    import dataclasses

    from edgefleet_agent.bench import partition as bench

    config = bench.PartitionBenchConfig.quick_run() if quick else bench.PartitionBenchConfig.full()
    config = dataclasses.replace(config, remote=remote, repeat=config.repeat if repeat is None else repeat)
    report(
        "partition",
        lambda: bench.benchmark(config, out, markdown, progress=typer.echo),
        error=bench.PartitionBenchError,
        table=bench.markdown,
        out=out,
        missed=bench.missed,
    )
