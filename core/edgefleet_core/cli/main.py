"""The ``edgefleet`` command: core commands plus groups contributed by the operator and agent."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from edgefleet_core import __version__, failpoints
from edgefleet_core.cli import bench_cmd, bundle_cmd, keys_cmd, optimize_cmd, partition_cmd, plugins, resources_cmd

PLANNED_GROUPS = ""
"""Command groups announced but not in this release (comma-separated); the help says so while any are left."""


def build_app() -> typer.Typer:
    """The CLI with every command group that is installed."""
    app = typer.Typer(
        name="edgefleet",
        help=(
            "EdgeFleet: optimize ML models per device class, sign them, roll them out in "
            "health-gated waves, and run them partitioned across CPU and accelerator."
        ),
        epilog=f"Not yet available in this release: {PLANNED_GROUPS}." if PLANNED_GROUPS else None,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def main(
        verbose: Annotated[
            int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")
        ] = 0,
    ) -> None:
        logging.basicConfig(
            level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        try:
            failpoints.configured()
        except failpoints.FailpointSyntaxError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    @app.command()
    def version() -> None:
        """Print the EdgeFleet version."""
        typer.echo(__version__)

    app.command(name="optimize")(optimize_cmd.optimize)
    app.command(name="publish")(bundle_cmd.publish)
    app.command(name="fetch")(bundle_cmd.fetch)
    app.add_typer(keys_cmd.app, name="keys")
    app.add_typer(resources_cmd.app, name="resources")
    app.add_typer(partition_cmd.app, name="partition")
    benches = [(b.name, b.command or plugins.unavailable_bench(b)) for b in plugins.discover_bench()]
    app.add_typer(bench_cmd.build_app(benches), name="bench")
    for group in plugins.discover():
        app.add_typer(group.app or plugins.unavailable_group(group), name=group.name)
    return app


def run() -> None:
    """Console-script entry point."""
    build_app()()
