"""Command groups contributed by other EdgeFleet packages through entry points.

Each entry point in the group ``edgefleet.cli`` names a ``typer.Typer``; its entry-point name is
the command group's name (``edgefleet <name> …``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

import typer

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgefleet.cli"
BENCH_ENTRY_POINT_GROUP = "edgefleet.bench"
"""Benchmarks of other packages (``edgefleet bench <name>``): each names a plain command function."""


@dataclass(frozen=True)
class CommandGroup:
    """A command group found through an entry point, or why it could not be loaded."""

    name: str
    app: typer.Typer | None
    problem: str | None = None


def discover(points: Iterable[EntryPoint] | None = None) -> list[CommandGroup]:
    """Load every command group registered under :data:`ENTRY_POINT_GROUP`.

    A group whose package cannot be imported (an optional extra not installed) is reported, not
    fatal: the rest of the CLI must keep working.
    """
    found = entry_points(group=ENTRY_POINT_GROUP) if points is None else points
    groups: list[CommandGroup] = []
    for point in sorted(found, key=lambda p: p.name):
        try:
            app = point.load()
        except ImportError as exc:
            logger.debug("command group %s unavailable: %s", point.name, exc)
            groups.append(CommandGroup(point.name, None, f"cannot import {point.value}: {exc}"))
            continue
        if not isinstance(app, typer.Typer):
            groups.append(CommandGroup(point.name, None, f"{point.value} is not a typer.Typer"))
            continue
        groups.append(CommandGroup(point.name, app))
    return groups


def unavailable_group(group: CommandGroup) -> typer.Typer:
    """A stand-in group that explains why the real one is missing and exits non-zero."""
    app = typer.Typer(help=f"(unavailable: {group.problem})", invoke_without_command=True)

    @app.callback()
    def explain() -> None:
        typer.echo(f"edgefleet {group.name} is unavailable: {group.problem}", err=True)
        raise typer.Exit(code=3)

    return app


@dataclass(frozen=True)
class BenchCommand:
    """A benchmark command found through an entry point, or why it could not be loaded."""

    name: str
    command: Callable[..., None] | None
    problem: str | None = None


def discover_bench(points: Iterable[EntryPoint] | None = None) -> list[BenchCommand]:
    """Load every benchmark command registered under :data:`BENCH_ENTRY_POINT_GROUP`."""
    found = entry_points(group=BENCH_ENTRY_POINT_GROUP) if points is None else points
    commands: list[BenchCommand] = []
    for point in sorted(found, key=lambda p: p.name):
        try:
            command = point.load()
        except ImportError as exc:
            logger.debug("benchmark %s unavailable: %s", point.name, exc)
            commands.append(BenchCommand(point.name, None, f"cannot import {point.value}: {exc}"))
            continue
        if not callable(command):
            commands.append(BenchCommand(point.name, None, f"{point.value} is not callable"))
            continue
        commands.append(BenchCommand(point.name, command))
    return commands


def unavailable_bench(command: BenchCommand) -> Callable[[], None]:
    """A stand-in benchmark that explains why the real one is missing and exits non-zero."""

    def explain() -> None:
        typer.echo(f"edgefleet bench {command.name} is unavailable: {command.problem}", err=True)
        raise typer.Exit(code=3)

    explain.__doc__ = f"(unavailable: {command.problem})"
    return explain
