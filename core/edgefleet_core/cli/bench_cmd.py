"""``edgefleet bench``: benchmarks that compare against a baseline in the same run."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

_Document = TypeVar("_Document", bound=Mapping[str, Any])

HELP = "Benchmarks: same-run ratios against a baseline, written to bench/results/."


def build_app(extra: Iterable[tuple[str, Callable[..., None]]] = ()) -> typer.Typer:
    """The ``bench`` group: core's benchmarks plus ``extra`` (name, command) from other packages."""
    app = typer.Typer(help=HELP)
    app.command()(pipeline)
    app.command()(bundles)
    for name, command in extra:
        app.command(name=name)(command)
    return app


def report(
    name: str,
    run: Callable[[], _Document],
    *,
    error: type[Exception],
    table: Callable[[_Document], str],
    out: Path,
    missed: Callable[[_Document], list[str]] | None = None,
) -> None:
    """Run one benchmark of another package and report it the way every ``edgefleet bench`` does.

    Exit 2 when the run fails (``error``, named), 1 when a target is missed, else 0.
    """
    try:
        document = run()
    except error as e:
        typer.echo(f"edgefleet bench {name}: {e}", err=True)
        raise typer.Exit(code=2) from e
    typer.echo(table(document))
    typer.echo(f"results written to {out}")
    failed = missed(document) if missed is not None else []
    if failed:
        typer.echo(f"targets missed: {', '.join(failed)}", err=True)
        raise typer.Exit(code=1)


def pipeline(
    out: Annotated[Path, typer.Option(help="Results JSON.")] = Path("bench/results/pipeline.json"),
    markdown: Annotated[
        Path | None, typer.Option(help="Markdown file whose bench:pipeline section gets the table.")
    ] = Path("BENCHMARKS.md"),
    quick: Annotated[bool, typer.Option(help="Fewer training epochs: a smoke run, not the figures.")] = False,
    only: Annotated[list[str] | None, typer.Option(help="Run only these scenarios.")] = None,
) -> None:
    """The optimization pipeline on the digits-trained sample models: INT8, pruning, clustering, low rank."""
    from edgefleet_core.bench import pipeline as bench

    unknown = sorted(set(only or []) - set(bench.SCENARIOS))
    if unknown:
        raise typer.BadParameter(f"unknown scenario(s) {unknown}; known: {', '.join(bench.SCENARIOS)}")
    document = bench.run(only, quick=quick, progress=typer.echo)
    table = bench.markdown(document)
    bench.write_results(document, out, markdown, mark="pipeline", table=table)
    typer.echo(table)
    missed = [t["name"] for s in document["scenarios"] for t in s["targets"] if not t["met"]]
    if missed:
        typer.echo(f"targets missed: {', '.join(missed)}", err=True)
        raise typer.Exit(code=1)


def bundles(
    out: Annotated[Path, typer.Option(help="Results JSON.")] = Path("bench/results/bundles.json"),
    markdown: Annotated[
        Path | None, typer.Option(help="Markdown file whose bench:bundles section gets the table.")
    ] = Path("BENCHMARKS.md"),
    quick: Annotated[bool, typer.Option(help="Fewer epochs and a 5 MB bundle: a smoke run, not the figures.")] = False,
) -> None:
    """Bundle sizes (Deep-Compression end to end, Huffman vs fixed width vs zstd, delta) and verify throughput."""
    from edgefleet_core.bench import bundles as bench
    from edgefleet_core.bench.pipeline import write_results

    document = bench.run(quick=quick, progress=typer.echo)
    table = bench.markdown(document)
    write_results(document, out, markdown, mark="bundles", table=table)
    typer.echo(table)
    missed = [t["name"] for s in document["scenarios"] for t in s["targets"] if not t["met"]]
    if missed:
        typer.echo(f"targets missed: {', '.join(missed)}", err=True)
        raise typer.Exit(code=1)
