"""The live device table: its content, its order, and plain lines (no ANSI) when the console is a pipe."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from edgefleet_operator.demo.live import LiveView, device_table, plain_line
from edgefleet_operator.demo.record import DeviceRow

SERVING = DeviceRow(
    name="cam-b",
    device_class="cpu-small",
    version="2",
    state="serving",
    requests=40,
    errors=1,
    correct=30,
    latencies_ms=tuple(float(i) for i in range(1, 21)),
)
ENROLLING = DeviceRow(name="cam-a", device_class="cpu-small", version=None, state="enrolling")
REFUSED = DeviceRow(name="arm-1", device_class="arm-big", version="1", state="refused", requests=3, correct=3)


def _render(renderable: object, *, width: int = 140, color: bool = False) -> str:
    console = Console(record=True, width=width, force_terminal=color, color_system="truecolor" if color else None)
    console.print(renderable)
    return console.export_text(styles=color)


def test_table_shows_every_column_of_a_serving_device() -> None:
    text = _render(device_table([SERVING], title="Fleet"))
    row = next(line for line in text.splitlines() if "cam-b" in line)
    assert "Fleet" in text
    for cell in ("cpu-small", "2", "serving", "40", "1", "75.0%", "11.0", "20.0"):
        assert cell in row, (cell, row)


def test_table_is_sorted_by_class_then_name() -> None:
    text = _render(device_table([SERVING, ENROLLING, REFUSED]))
    order = [name for line in text.splitlines() for name in ("arm-1", "cam-a", "cam-b") if name in line]
    assert order == ["arm-1", "cam-a", "cam-b"]


def test_a_device_with_nothing_measured_shows_dashes_not_zeros() -> None:
    row = next(line for line in _render(device_table([ENROLLING])).splitlines() if "cam-a" in line)
    assert row.count("—") == 4  # version, accuracy, p50, p95
    assert "0.0%" not in row


def test_states_are_coloured() -> None:
    styled = _render(device_table([SERVING, REFUSED]), color=True)
    green, red = "\x1b[32m", "\x1b[31m"
    assert f"{green}serving" in styled
    assert f"{red}refused" in styled


def test_names_are_shown_as_typed_not_as_markup() -> None:
    odd = DeviceRow(name="[bold]x[/bold]", device_class="c", version=None, state="waiting")
    assert "[bold]x[/bold]" in _render(device_table([odd]))


def test_empty_fleet_says_so() -> None:
    assert "no devices yet" in _render(device_table([]))


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _pipe_view(clock: _Clock) -> tuple[LiveView, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=60)  # a StringIO is not a terminal: like `make demo | tee`
    return LiveView(console, plain_interval_s=5.0, clock=clock), out


def test_in_a_pipe_updates_become_rate_limited_plain_lines() -> None:
    clock = _Clock()
    view, out = _pipe_view(clock)
    assert not view.interactive
    with view:
        view.update([ENROLLING, SERVING], "wave 1 of 2")
        first = out.getvalue()
        assert first.splitlines() == ["wave 1 of 2", f"  {plain_line(ENROLLING)}", f"  {plain_line(SERVING)}"]
        clock.now += 1.0  # inside the interval: held back
        installing = DeviceRow(name="cam-a", device_class="cpu-small", version="2", state="installing")
        view.update([installing, SERVING], "wave 1 of 2")
        assert out.getvalue() == first
        clock.now += 5.0  # the interval has passed: only what changed is printed
        view.update([installing, SERVING], "wave 1 of 2")
        assert out.getvalue()[len(first) :].splitlines() == [f"  {plain_line(installing)}"]
        clock.now += 1.0
        serving = DeviceRow(name="cam-a", device_class="cpu-small", version="2", state="serving")
        view.update([serving, SERVING], "done")
        held = out.getvalue()
    # Leaving prints the final state the rate limit held back.
    assert out.getvalue()[len(held) :].splitlines() == ["done", f"  {plain_line(serving)}"]
    text = out.getvalue()
    assert "\x1b" not in text
    assert all(len(line) > 0 for line in text.splitlines())


def test_plain_lines_are_not_wrapped_and_carry_one_device_each() -> None:
    clock = _Clock()
    view, out = _pipe_view(clock)
    weird = DeviceRow(name="a\nb [red]x[/red]", device_class="cpu-small", version="1", state="serving")
    with view:
        view.update([weird])
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # wider than the 60-column console, yet one line; the newline is replaced
    assert "a?b [red]x[/red]" in lines[0]
    assert len(lines[0]) > 60


def test_on_a_terminal_the_table_is_drawn_live() -> None:
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system="standard")
    view = LiveView(console)
    assert view.interactive
    with view:
        view.update([SERVING], "serving 1 of 1")
    text = out.getvalue()
    assert "cam-b" in text
    assert "serving 1 of 1" in text
    assert "\x1b[" in text


def test_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="plain_interval_s"):
        LiveView(Console(file=io.StringIO()), plain_interval_s=-1)
