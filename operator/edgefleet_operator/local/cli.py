"""``edgefleet up -f DIR``: the operator's reconcilers over resource files, without a cluster.

A Typer app whose callback is the command, so that the ``edgefleet.cli`` entry point ``up`` mounts
it as ``edgefleet up [OPTIONS]`` (a group with no sub-commands). Machinery is imported when the
command runs, so ``edgefleet --help`` stays fast.

Exit codes: 0 every model settled and none stalled; 1 invalid files (nothing stored changed), an
unusable state folder, or a stalled model (the user must change something); 3 timed out before
every model settled; 130 interrupted before settling (watching, Ctrl-C is the normal end: 0).
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer

from edgefleet_core.errors import EdgeFleetError

if TYPE_CHECKING:
    from edgefleet_core.resources.edge_model import EdgeModelStatus
    from edgefleet_operator.local.api import ApplyOutcome
    from edgefleet_operator.local.errors import InputError
    from edgefleet_operator.local.loop import ControlPlane, ModelEvent, ModelReport, RunReport

EXIT_STALLED: Final = 1
EXIT_TIMED_OUT: Final = 3
EXIT_INTERRUPTED: Final = 130
DEFAULT_STATE: Final = Path(".edgefleet")
DEFAULT_TIMEOUT_S: Final = 600.0

app = typer.Typer(
    help=(
        "Run the operator's reconcilers over resource files, without a cluster: optimize, sign, publish and "
        "roll out every EdgeModel in the files, keeping state (keys, signed repository, objects) in --state."
    ),
    invoke_without_command=True,
    subcommand_metavar="",
    pretty_exceptions_enable=False,
)


@app.callback()
def up(
    filename: Annotated[
        list[Path],
        typer.Option(
            "--filename",
            "-f",
            help="A resource file, or a folder whose resource files (.yaml, .yml, .json; not its subfolders) "
            "are applied; repeatable. Objects no longer in the files are deleted (EdgeModels are finalized).",
        ),
    ],
    state: Annotated[
        Path, typer.Option("--state", help="State folder: signing keys, artifact store, cache, stored objects.")
    ] = DEFAULT_STATE,
    watch: Annotated[
        bool, typer.Option("--watch", help="Keep running: re-read the files and reconcile changes until Ctrl-C.")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0.0,
            help=f"Seconds to wait for every model to settle (default {DEFAULT_TIMEOUT_S:.0f}); "
            "with --watch: seconds to run (default: until stopped).",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON (with --watch: one line per settled state).")
    ] = False,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="Artifact store: file:///absolute/path, s3://bucket or s3://bucket/prefix; default: STATE/store.",
        ),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="Builds that may run at once.")] = 2,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, help="With --watch: seconds between reads of the files.")
    ] = 1.0,
    resync: Annotated[
        float,
        typer.Option("--resync", min=0.1, help="With --watch: seconds between reconciles of a settled model."),
    ] = 30.0,
) -> None:
    """Apply resource files and reconcile them without a cluster; print each model's status."""
    from edgefleet_operator.local.errors import InputError  # noqa: PLC0415 - heavy imports when run
    from edgefleet_operator.local.loop import ControlPlane, LocalSettings  # noqa: PLC0415
    from edgefleet_operator.local.state import StateDir  # noqa: PLC0415

    settings = LocalSettings(
        paths=tuple(filename),
        state=StateDir.at(state),
        store_url=store,
        watch=watch,
        timeout_s=timeout if timeout is not None or watch else DEFAULT_TIMEOUT_S,
        poll_interval_s=interval,
        resync_s=resync,
        workers=workers,
    )
    control = ControlPlane(
        settings,
        on_start=None if as_json else _print_start,
        on_apply=None if as_json else _print_applied,
        on_event=None if as_json else _print_event,
        on_settled=(_print_json_line if as_json else _print_report) if watch else None,
        on_input_problem=_print_input_problem,
    )
    try:
        with _stop_on_signals(control):
            report = control.run()
    except InputError as exc:
        _print_input_problem(exc)
        typer.echo("nothing was applied", err=True)
        raise typer.Exit(code=1) from None
    except EdgeFleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    if not watch:
        if as_json:
            typer.echo(json.dumps(report_document(report), indent=2))
        else:
            _print_report(report)
    raise typer.Exit(code=_exit_code(report, watch=watch))


def _exit_code(report: RunReport, *, watch: bool) -> int:
    if report.stalled:
        return EXIT_STALLED
    if report.timed_out and not watch:
        return EXIT_TIMED_OUT
    if report.stopped and not watch and not report.settled:
        return EXIT_INTERRUPTED
    return 0


@contextmanager
def _stop_on_signals(control: ControlPlane) -> Iterator[None]:
    """SIGINT/SIGTERM end the run after the reconcile under way; a second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are delivered to the main thread only; an embedding caller stops the run itself
        return
    stopping = False

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        del frame
        if stopping and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stopping = True
        typer.echo("stopping after the reconcile under way (Ctrl-C again to interrupt it)", err=True)
        # From a thread: the handler may have interrupted the loop inside the stop event's own lock.
        threading.Thread(target=control.stop, name="edgefleet-up-stop", daemon=True).start()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------------------------ output


def _print_input_problem(exc: InputError) -> None:
    # One line per field, never wrapped, so the file and field can be grepped.
    lines = [f"error: {p.source}: {f.field}: {f.message}" for p in exc.problems for f in p.problems]
    for line in dict.fromkeys(lines):  # the schema and the model may word one problem the same
        typer.echo(line, err=True)


def _print_start(report: RunReport) -> None:
    if report.keys_created:
        typer.echo(f"created signing keys in {report.state.keys_dir} (keep this folder private)", err=True)
    typer.echo(f"store {report.store_url}; devices trust {report.state.trusted_root}", err=True)


def _print_applied(outcome: ApplyOutcome) -> None:
    for verb, keys in (
        ("created", outcome.created),
        ("configured", outcome.configured),
        ("labels updated", outcome.relabeled),
        ("deleting", outcome.deleting),
        ("deleted", outcome.deleted),
    ):
        for key in keys:
            typer.echo(f"{key.kind.lower()}/{key.short} {verb}", err=True)


def _print_event(event: ModelEvent) -> None:
    typer.echo(f"{event.key.short}  {event.type}  {event.reason}: {event.message}", err=True)


def _rollouts(status: EdgeModelStatus | None) -> list[tuple[str, dict[str, str]]]:
    """One row per device class of a model: version, size, rollout."""
    variants = {v.device_class: v for v in (status.variants or [])} if status else {}
    rollouts = {r.device_class: r for r in (status.rollout or [])} if status else {}
    rows = []
    for name in sorted(set(variants) | set(rollouts)):
        variant, rollout = variants.get(name), rollouts.get(name)
        progress = ""
        if rollout is not None:
            progress = f" ({rollout.updated or 0}/{rollout.devices} updated)" if rollout.devices else " (no devices)"
        rows.append(
            (
                name,
                {
                    "version": (variant.version if variant else None) or (rollout.version if rollout else None) or "-",
                    "size": f"{variant.size_bytes / 1024:.1f} KiB" if variant else "-",
                    "rollout": f"{rollout.phase}{progress}" if rollout else "-",
                },
            )
        )
    return rows


def _true_conditions(status: EdgeModelStatus | None) -> str:
    conditions = status.conditions if status else None
    return ", ".join(c.type for c in conditions or [] if c.status == "True") or "-"


def _print_report(report: RunReport) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table("model", "class", "version", "size", "rollout", "conditions")
    for model in report.models:
        conditions = _true_conditions(model.status)
        rows = _rollouts(model.status) or [("-", {"version": "-", "size": "-", "rollout": "-"})]
        for index, (name, cells) in enumerate(rows):
            first = index == 0
            table.add_row(model.key.short if first else "", name, cells["version"], cells["size"], cells["rollout"],
                          conditions if first else "")  # fmt: skip
    Console(width=160).print(table)
    for model in report.models:
        typer.echo(_model_line(model))
    if report.timed_out:
        typer.echo("timed out before every model settled", err=True)


def _model_line(model: ModelReport) -> str:
    """Why a model is where it is, naming the file to change when it is stalled."""
    where = f"{model.key.short} ({model.file})" if model.file else model.key.short
    stalled = model.stalled
    if stalled is not None:
        return f"{where}: Stalled, {stalled.reason}: {stalled.message}"
    if model.error is not None:
        return f"{where}: retrying after an error: {model.error}"
    ready = next((c for c in (model.status.conditions or []) if c.type == "Ready"), None) if model.status else None
    if ready is None:
        return f"{where}: not reconciled yet"
    if ready.status == "True":
        return f"{where}: Ready"
    return f"{where}: not Ready, {ready.reason}: {ready.message}"


def _print_json_line(report: RunReport) -> None:
    typer.echo(json.dumps(report_document(report), separators=(",", ":")))


def report_document(report: RunReport) -> dict[str, Any]:
    """The run as JSON: where the state is, every object, every model's status, the events."""
    return {
        "state": str(report.state.root),
        "store": report.store_url,
        "trustedRoot": str(report.state.trusted_root),
        "keysCreated": report.keys_created,
        "settled": report.settled,
        "timedOut": report.timed_out,
        "applied": {
            "created": [str(k) for k in report.applied.created],
            "configured": [str(k) for k in report.applied.configured],
            "deleted": [str(k) for k in (*report.applied.deleting, *report.applied.deleted)],
        },
        "deviceClasses": [k.name for k in report.device_classes],
        "edgeDevices": [k.short for k in report.edge_devices],
        "edgeModels": [
            {
                "namespace": m.key.namespace,
                "name": m.key.name,
                "file": str(m.file) if m.file else None,
                "generation": m.generation,
                "settled": m.settled,
                "error": m.error,
                "status": m.status.model_dump(mode="json", by_alias=True, exclude_none=True) if m.status else None,
            }
            for m in report.models
        ],
        "events": [
            {"object": str(e.key), "type": e.type, "reason": e.reason, "message": e.message, "time": e.time.isoformat()}
            for e in report.events
        ],
    }
