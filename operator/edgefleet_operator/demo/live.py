"""The demo's live device table: a redrawn rich table on a terminal, plain log lines in a pipe.

``make demo | tee`` and CI logs are not terminals: a redrawn table there would be ANSI cursor
codes and the same table printed over and over, so :class:`LiveView` falls back to at most one
short line per device (and only for devices whose line changed) every ``plain_interval_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edgefleet_operator.demo.record import DeviceRow

NOT_MEASURED = "—"
"""Shown in a cell with nothing measured yet (no requests, no latency)."""

STATE_STYLES: dict[str, str] = {
    "serving": "green",
    "rolled back": "yellow",
    "rolled-back": "yellow",
    "refused": "red",
    "failed": "bold red",
    "enrolling": "dim",
    "waiting": "dim",
    "installing": "dim",
    "stopped": "dim",
}
"""Colour of a device state; states not listed are shown unstyled."""


def _ms(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{value:.1f}"


def accuracy_so_far(device: DeviceRow) -> float | None:
    """Share of the device's answered requests whose argmax matched the label (``None``: none yet)."""
    return device.correct / device.requests if device.requests > 0 else None


def _percent(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{value:.1%}"


def _sorted(devices: Sequence[DeviceRow]) -> list[DeviceRow]:
    return sorted(devices, key=lambda d: (d.device_class, d.name))


def device_table(devices: Sequence[DeviceRow], *, title: str = "Devices") -> Table:
    """One row per device, sorted by class then name.

    Every cell is a :class:`~rich.text.Text`, never markup, so a name like ``[bold]x`` shows as typed.
    """
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("device", no_wrap=True)
    table.add_column("class", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("requests", justify="right")
    table.add_column("errors", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p95 ms", justify="right")
    for device in _sorted(devices):
        table.add_row(
            Text(device.name),
            Text(device.device_class),
            Text(device.version if device.version is not None else NOT_MEASURED),
            Text(device.state, style=STATE_STYLES.get(device.state, "")),
            Text(str(device.requests)),
            Text(str(device.errors), style="red" if device.errors else ""),
            Text(_percent(accuracy_so_far(device))),
            Text(_ms(device.percentile(0.5))),
            Text(_ms(device.percentile(0.95))),
        )
    if not devices:
        table.caption = "no devices yet"
    return table


def _one_line(text: str) -> str:
    # A name with a newline or a control character would break the one-line-per-device log format.
    return "".join(c if c.isprintable() else "?" for c in text)


def plain_line(device: DeviceRow) -> str:
    """The device as one log line (for pipes and CI logs)."""
    version = device.version if device.version is not None else NOT_MEASURED
    return _one_line(
        f"{device.name} [{device.device_class}] version={version} state={device.state} "
        f"requests={device.requests} errors={device.errors} "
        f"accuracy={_percent(accuracy_so_far(device))} "
        f"p50={_ms(device.percentile(0.5))}ms p95={_ms(device.percentile(0.95))}ms"
    )


class LiveView:
    """The live device table for the length of a ``with`` block.

    On a terminal, a :class:`rich.live.Live` redraws the table in place. Anywhere else (a pipe, a
    file, a dumb terminal) each :meth:`update` prints plain lines, rate-limited to one batch per
    ``plain_interval_s`` and holding only what changed; leaving the block prints the final state.
    Not thread-safe: call :meth:`update` from one thread (the demo's event loop).
    """

    def __init__(
        self,
        console: Console,
        *,
        title: str = "EdgeFleet devices",
        plain_interval_s: float = 5.0,
        refresh_per_second: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if plain_interval_s < 0:
            raise ValueError(f"plain_interval_s must not be negative, got {plain_interval_s}")
        self._console = console
        self._title = title
        self._interval = plain_interval_s
        self._clock = clock
        self._interactive = console.is_terminal and not console.is_dumb_terminal
        self._live: Live | None = (
            Live(console=console, refresh_per_second=refresh_per_second, transient=False) if self._interactive else None
        )
        self._last_flush: float | None = None
        self._printed: dict[tuple[str, str], str] = {}  # (class, name) -> the line last printed
        self._printed_status = ""
        self._pending: tuple[tuple[DeviceRow, ...], str] | None = None

    @property
    def interactive(self) -> bool:
        """Whether the table is redrawn in place (a terminal) rather than logged as lines."""
        return self._interactive

    def __enter__(self) -> LiveView:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
        elif self._pending is not None:
            self._flush(*self._pending)  # the log ends with the final state, whatever the rate limit held back

    def update(self, devices: Sequence[DeviceRow], status_line: str = "") -> None:
        """Show the devices' current state and one line of status (e.g. "rolling out wave 2 of 3")."""
        if self._live is not None:
            parts: list[RenderableType] = [device_table(devices, title=self._title)]
            if status_line:
                parts.append(Text(status_line))
            self._live.update(Group(*parts), refresh=True)
            return
        self._pending = (tuple(devices), status_line)
        now = self._clock()
        if self._last_flush is None or now - self._last_flush >= self._interval:
            self._last_flush = now
            self._flush(*self._pending)

    def _flush(self, devices: tuple[DeviceRow, ...], status_line: str) -> None:
        self._pending = None
        lines: list[str] = []
        if status_line and status_line != self._printed_status:
            self._printed_status = status_line
            lines.append(_one_line(status_line))
        for device in _sorted(devices):
            key = (device.device_class, device.name)
            line = plain_line(device)
            if self._printed.get(key) != line:
                self._printed[key] = line
                lines.append(f"  {line}")
        for line in lines:
            # No markup, highlighting or wrapping: the line lands in the log exactly as built.
            self._console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
