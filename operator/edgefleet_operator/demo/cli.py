"""``edgefleet demo``: the embedded control plane, a gateway and device agents, end to end on this machine.

A Typer app whose callback is the command (mounted by the ``edgefleet.cli`` entry point ``demo``).
Machinery is imported when the command runs, so ``edgefleet --help`` stays fast.

Exit codes: 0 the system behaved as it should (with ``--fault``: it caught the fault); 1 it did not,
or the demo could not run (the message says why); 130 Ctrl-C; 143 SIGTERM. Either signal stops
every child process before the demo exits.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Final

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from edgefleet_operator.demo.record import DemoRecord
    from edgefleet_operator.demo.session import DemoSession

EXIT_FAILED: Final = 1
EXIT_INTERRUPTED: Final = 130
EXIT_TERMINATED: Final = 143


class FaultChoice(StrEnum):
    BAD_MODEL = "bad-model"
    TAMPERED_ARTIFACT = "tampered-artifact"


app = typer.Typer(
    help=(
        "Run the whole chain on this machine: the embedded control plane optimizes the digits CNN per device class, "
        "signs and publishes it, rolls it out in waves to real agent processes through the gateway (mTLS on "
        "loopback), drives inference over the digits test set, and writes an HTML report."
    ),
    invoke_without_command=True,
    subcommand_metavar="",
    pretty_exceptions_enable=False,
)


@app.callback()
def demo(
    agents: Annotated[
        int, typer.Option("--agents", min=2, max=24, help="Agent processes, spread over the demo's device classes.")
    ] = 6,
    fault: Annotated[
        FaultChoice | None,
        typer.Option(
            "--fault",
            help="After version 1 serves: ship a version that fails its health gate (bad-model), or tamper with a "
            "published bundle (tampered-artifact). Exit 0 only when the system caught it.",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the HTML report; default STATE/report.")] = None,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state",
            help="A new or empty folder for the run (keys, store, agents, logs); default edgefleet-demo-TIMESTAMP.",
        ),
    ] = None,
    inferences: Annotated[
        int, typer.Option("--inferences", min=1, max=100000, help="Inferences each device serves before the summary.")
    ] = 200,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="Artifact store: s3://bucket/prefix (endpoint and credentials from AWS_ENDPOINT_URL and the "
            "other standard variables) or file:///absolute/path. Default: s3://edgefleet-demo/RUN when "
            "AWS_ENDPOINT_URL or MINIO_ENDPOINT is set (the bucket is created if missing), else STATE/store.",
        ),
    ] = None,
) -> None:
    """Run the demo; print the summary and where the report is."""
    from rich.console import Console  # noqa: PLC0415 - heavy imports when run

    from edgefleet_operator.demo.errors import DemoError, Interrupted  # noqa: PLC0415
    from edgefleet_operator.demo.session import DemoSession, DemoSettings  # noqa: PLC0415

    folder = state or Path(f"edgefleet-demo-{datetime.now().astimezone().strftime('%Y%m%d-%H%M%S')}")
    settings = DemoSettings(
        state=folder.absolute(),
        out=(out or folder / "report").absolute(),
        agents=agents,
        fault="bad-model" if fault is FaultChoice.BAD_MODEL else "tampered-artifact" if fault is not None else None,
        inferences=inferences,
        store_url=store,
    )
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # a log or a pipe: wide enough for the summary table on one line a row
    stop = threading.Event()
    session = DemoSession(settings, console, stop)
    with _stop_on_signals(session, stop):
        try:
            record = session.run()
        except Interrupted as exc:
            console.print(f"stopped by signal {exc.signum}: every child process was stopped", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED if exc.signum == signal.SIGINT else EXIT_TERMINATED) from None
        except DemoError as exc:
            console.print(f"[red]demo failed[/red]: {exc}", highlight=False)
            if (settings.state / "logs").is_dir():
                console.print(f"logs of every process: {settings.state / 'logs'}", highlight=False)
            raise typer.Exit(EXIT_FAILED) from None
    _finish(record, settings.out, console)


def _finish(record: DemoRecord, out: Path, console: Console) -> None:
    from edgefleet_operator.demo.report import summary_table, write_report  # noqa: PLC0415

    console.print(summary_table(record))
    for note in record.notes:
        console.print(f"  {note}", highlight=False)
    try:
        index = write_report(record, out)
    except (OSError, ValueError) as exc:
        console.print(f"[red]cannot write the report[/red]: {exc}", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    verdict = "[green]PASS[/green]" if record.ok else "[red]FAIL[/red]"
    console.print(f"{verdict} {record.verdict}", highlight=False)
    console.print(f"report: {index}", highlight=False)
    if not record.ok:
        raise typer.Exit(EXIT_FAILED)


@contextmanager
def _stop_on_signals(session: DemoSession, stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM become a stop request the session's loop sees at its next poll (within a quarter second).

    The handler only sets a flag: the session stops the children itself, from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; an embedding caller sets ``stop`` itself
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        del frame
        if not stop.is_set():
            session.stop_signal = signum
            stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
