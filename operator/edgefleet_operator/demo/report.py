"""The demo's closing summary table and its HTML report (``index.html`` with PNG plots beside it).

The report is one static page: no JavaScript, nothing fetched from elsewhere, every string from
the record HTML-escaped (device names come from whoever enrolled them). It is written as a whole
folder at once, so an interrupted demo leaves the previous report or the complete new one.
Partial records (a run stopped early, a fault that kept devices from serving) render with
"not measured" cells and a note where a plot has nothing to show.
"""

from __future__ import annotations

import html
import io
import math
import os
import platform
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from edgefleet_core.atomic import write_dir_atomic
from edgefleet_operator.demo.live import accuracy_so_far
from edgefleet_operator.demo.record import Candidate, ClassSummary, DemoRecord, DeviceRow, TimelineEvent

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

NOT_MEASURED = "not measured"
INDEX = "index.html"
TRADE_OFFS_PNG = "trade-offs.png"
TIMELINE_PNG = "timeline.png"
LATENCY_PNG = "latency.png"
REPORT_FILES = frozenset({INDEX, TRADE_OFFS_PNG, TIMELINE_PNG, LATENCY_PNG})
"""Every name the report folder may hold; :func:`write_report` refuses to replace a folder with others."""

_LABEL_MAX = 40  # characters of a device or class name on a plot axis


# ---------------------------------------------------------------- cell texts (terminal and HTML)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _size(n_bytes: int) -> str:
    if n_bytes <= 0:
        return NOT_MEASURED
    if n_bytes >= 1024 * 1024:
        return f"{n_bytes / (1024 * 1024):.2f} MiB"
    return f"{n_bytes / 1024:.1f} KiB"


def _ratio(value: float | None) -> str:
    value = _finite(value)
    return NOT_MEASURED if value is None else f"{value:.2f}x"


def _pct(value: float | None) -> str:
    value = _finite(value)
    return NOT_MEASURED if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    value = _finite(value)
    return NOT_MEASURED if value is None else f"{value:.2f} ms"


def _accuracy(summary: ClassSummary) -> str:
    ours, base = _finite(summary.accuracy), _finite(summary.baseline_accuracy)
    if ours is None:
        return NOT_MEASURED if base is None else f"{NOT_MEASURED} (baseline {base:.1%})"
    if base is None:
        return f"{ours:.1%} (no baseline)"
    return f"{ours:.1%} (baseline {base:.1%}, {100 * (ours - base):+.1f} pt)"


def _variant(summary: ClassSummary) -> str:
    return _size(summary.variant_bytes) if summary.variant_bytes > 0 else NOT_MEASURED


def _partition(summary: ClassSummary) -> str:
    if summary.partition_cut is not None:
        return summary.partition_cut
    # No cut means the variant runs whole, but only once there is a variant at all.
    return "whole model" if summary.variant_bytes > 0 else NOT_MEASURED


def _healthy(summary: ClassSummary) -> str:
    return f"{summary.devices_healthy}/{summary.devices_total}"


def _all_healthy(summary: ClassSummary) -> bool:
    return summary.devices_total > 0 and summary.devices_healthy == summary.devices_total


def _fault(record: DemoRecord) -> str:
    return "none (a normal rollout)" if record.fault is None else record.fault


# ---------------------------------------------------------------- terminal


def summary_table(record: DemoRecord) -> Table:
    """The closing summary: one row per device class."""
    table = Table(title="Summary per device class", title_justify="left")
    table.add_column("class")
    table.add_column("version")
    table.add_column("variant", justify="right")
    table.add_column("compression", justify="right")
    table.add_column("accuracy")
    table.add_column("p50", justify="right")
    table.add_column("p95", justify="right")
    table.add_column("partition")
    table.add_column("healthy", justify="right")
    for summary in sorted(record.classes, key=lambda s: s.device_class):
        table.add_row(
            Text(summary.device_class),
            Text(summary.version),
            Text(_variant(summary)),
            Text(_ratio(summary.compression)),
            Text(_accuracy(summary)),
            Text(_ms(summary.p50_ms)),
            Text(_ms(summary.p95_ms)),
            Text(_partition(summary)),
            Text(_healthy(summary), style="green" if _all_healthy(summary) else "red"),
        )
    if not record.classes:
        table.caption = "no device classes were recorded"
    return table


# ---------------------------------------------------------------- plots


def _label(text: str) -> str:
    # Matplotlib reads text between two "$" as math (and raises on bad math): show names as typed.
    text = "".join(c if c.isprintable() else "?" for c in text)
    short = text if len(text) <= _LABEL_MAX else text[: _LABEL_MAX - 1] + "…"
    return short.replace("$", r"\$")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # A name in a script the font lacks draws as boxes, and a crowded figure keeps its layout:
        # both only warn, and a report must never fail (nor, under `-W error`, raise) over a label.
        warnings.simplefilter("ignore", UserWarning)
        figure.tight_layout()
        figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _new_figure(width: float, height: float) -> Figure:
    # A bare Figure (no pyplot): no global backend state, no window, safe beside other threads.
    from matplotlib.figure import Figure  # noqa: PLC0415  # matplotlib is heavy; only the report needs it

    return Figure(figsize=(width, height), dpi=100)


def _plotted(candidates: Iterable[Candidate]) -> list[Candidate]:
    return [c for c in candidates if _finite(c.accuracy) is not None and c.size_bytes > 0]


def _style(candidate: Candidate) -> tuple[str, int, str]:
    """(marker, size, colour) as in the optimizer's report.png: green * chosen, blue o accepted, red x rejected."""
    if candidate.chosen:
        return "*", 220, "tab:green"
    if candidate.accepted:
        return "o", 60, "tab:blue"
    return "x", 60, "tab:red"


def _trade_off_axes(axes: Axes, summary: ClassSummary, points: list[tuple[float, Candidate]], xlabel: str) -> None:
    for x, candidate in points:
        accuracy = _finite(candidate.accuracy)
        if accuracy is None:  # _plotted keeps only evaluated candidates; this narrows the type
            continue
        marker, size, colour = _style(candidate)
        axes.scatter([x], [accuracy], marker=marker, s=size, color=colour)
        axes.annotate(
            _label(candidate.name),
            (x, accuracy),
            fontsize=7,
            xytext=(5, 4),
            textcoords="offset points",
        )
    baseline = _finite(summary.baseline_accuracy)
    if baseline is not None:
        axes.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="baseline")
        axes.legend(loc="lower right", fontsize=7)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("accuracy")
    axes.grid(alpha=0.3)


def trade_offs_png(classes: Sequence[ClassSummary]) -> bytes | None:
    """Accuracy against size and against p50 latency, one row of panels per class (``None``: no candidates)."""
    rows = [(s, _plotted(s.candidates)) for s in sorted(classes, key=lambda s: s.device_class)]
    rows = [(s, points) for s, points in rows if points]
    if not rows:
        return None
    figure = _new_figure(11, 3.6 * len(rows))
    grid = figure.subplots(len(rows), 2, squeeze=False)
    for (summary, candidates), (by_size, by_latency) in zip(rows, grid, strict=True):
        _trade_off_axes(by_size, summary, [(c.size_bytes / 1024, c) for c in candidates], "size (KiB)")
        timed = [(latency, c) for c in candidates if (latency := _finite(c.latency_ms)) is not None]
        _trade_off_axes(by_latency, summary, timed, "p50 latency, one sample (ms)")
        untimed = [_label(c.name) for c in candidates if _finite(c.latency_ms) is None]
        by_size.set_title(
            f"{_label(summary.device_class)}: green * chosen, blue o accepted, red x rejected", fontsize=9
        )
        by_latency.set_title(
            f"latency not measured: {', '.join(untimed)}" if untimed else _label(summary.device_class), fontsize=9
        )
    return _png(figure)


@dataclass(frozen=True)
class _Mark:
    color: str
    marker: str


_EVENT_MARKS: dict[str, _Mark] = {
    "built": _Mark("tab:grey", "s"),
    "published": _Mark("tab:blue", "D"),
    "wave": _Mark("tab:purple", ">"),
    "installed": _Mark("tab:cyan", "o"),
    "serving": _Mark("tab:green", "o"),
    "rolled-back": _Mark("tab:orange", "v"),
    "refused": _Mark("tab:red", "X"),
    "fault": _Mark("black", "*"),
}
_OTHER_MARK = _Mark("tab:brown", ".")
_VERSIONED = frozenset({"published", "rolled-back", "wave"})


def _lane(event: TimelineEvent, class_of: dict[str, str]) -> tuple[str, str]:
    """(class, lane label): fleet-wide events first, then each class's own events, then its devices."""
    if event.device is not None:
        device_class = event.device_class or class_of.get(event.device, "?")
        return device_class, f"{device_class} / {event.device}"
    if event.device_class is not None:
        return event.device_class, f"{event.device_class} (class)"
    return "", "fleet"


def timeline_png(timeline: Sequence[TimelineEvent], devices: Sequence[DeviceRow]) -> bytes | None:
    """Every event over time, one lane per class and per device (``None``: no events)."""
    events = [e for e in timeline if _finite(e.at_s) is not None]
    if not events:
        return None
    class_of = {d.name: d.device_class for d in devices}
    lanes = sorted({_lane(e, class_of) for e in events}, key=lambda lane: (lane[0], "/" in lane[1], lane[1]))
    row = {label: i for i, (_, label) in enumerate(lanes)}
    figure = _new_figure(11, 1.4 + 0.32 * len(lanes))
    axes = figure.subplots()
    start, end = min(e.at_s for e in events), max(e.at_s for e in events)
    for i in range(len(lanes)):
        axes.axhline(i, color="lightgrey", linewidth=0.8, zorder=0)
    by_kind: dict[str, list[tuple[float, int]]] = {}
    for event in events:
        by_kind.setdefault(event.kind, []).append((event.at_s, row[_lane(event, class_of)[1]]))
    for kind, points in sorted(by_kind.items()):
        mark = _EVENT_MARKS.get(kind, _OTHER_MARK)
        axes.scatter(
            [x for x, _ in points],
            [y for _, y in points],
            color=mark.color,
            marker=mark.marker,
            s=55,
            label=_label(kind),
            zorder=2,
        )
    for event in events:
        if event.version and event.kind in _VERSIONED:  # which version moved where, without the table
            y = row[_lane(event, class_of)[1]]
            axes.annotate(
                f"v{_label(event.version)}",
                (event.at_s, y),
                fontsize=7,
                xytext=(0, 7),
                textcoords="offset points",
                ha="center",
            )
    axes.set_yticks(range(len(lanes)))
    axes.set_yticklabels([_label(label) for _, label in lanes], fontsize=8)
    axes.set_ylim(len(lanes) - 0.5, -0.5)  # first lane on top, like the table below
    axes.set_xlim(left=min(0.0, start), right=max(end * 1.03, end + 0.5))
    axes.set_xlabel("seconds since the demo started")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes.set_title("Rollout timeline")
    return _png(figure)


def latency_png(devices: Sequence[DeviceRow]) -> bytes | None:
    """A box per device of its inference latencies, grouped and coloured by class (``None``: none measured)."""
    measured = [
        (d, values)
        for d in sorted(devices, key=lambda d: (d.device_class, d.name))
        if (values := [v for v in d.latencies_ms if math.isfinite(v)])
    ]
    if not measured:
        return None
    classes = sorted({d.device_class for d, _ in measured})
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:cyan", "tab:olive", "tab:pink"]
    colour = {c: palette[i % len(palette)] for i, c in enumerate(classes)}
    figure = _new_figure(max(6.0, 1.2 + 0.75 * len(measured)), 4.6)
    axes = figure.subplots()
    boxes = axes.boxplot(
        [values for _, values in measured],
        patch_artist=True,
        widths=0.6,
        medianprops={"color": "black"},
        flierprops={"markersize": 3, "alpha": 0.5},
    )
    for patch, (device, _) in zip(boxes["boxes"], measured, strict=True):
        patch.set_facecolor(colour[device.device_class])
        patch.set_alpha(0.55)
    axes.set_xticks(range(1, len(measured) + 1))
    axes.set_xticklabels([_label(d.name) for d, _ in measured], rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("latency per inference (ms)")
    axes.grid(axis="y", alpha=0.3)
    from matplotlib.patches import Patch  # noqa: PLC0415  # lazy: see _new_figure

    axes.legend(
        handles=[Patch(color=colour[c], alpha=0.55, label=_label(c)) for c in classes],
        fontsize=8,
        title="class",
        title_fontsize=8,
    )
    axes.set_title("Latency per device")
    return _png(figure)


# ---------------------------------------------------------------- HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { padding: 0.8em 1em; border-radius: 6px; margin: 1em 0; font-size: 1.05em; }
.ok { background: #e6f4ea; border: 1px solid #34a853; }
.failed { background: #fce8e6; border: 1px solid #d93025; }
.note { color: #555; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; }
code { overflow-wrap: anywhere; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[tuple[str, bool]]]) -> str:
    """A table of already-formatted cells (text, numeric); every cell is escaped here."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_e(t)}</td>' if num else f"<td>{_e(t)}</td>" for t, num in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_html(record: DemoRecord) -> str:
    if not record.classes:
        return '<p class="note">No device classes were recorded.</p>'
    rows = [
        [
            (s.device_class, False),
            (s.version, False),
            (_variant(s), True),
            (_ratio(s.compression), True),
            (_accuracy(s), False),
            (_ms(s.p50_ms), True),
            (_ms(s.p95_ms), True),
            (_partition(s), False),
            (_healthy(s), True),
        ]
        for s in sorted(record.classes, key=lambda s: s.device_class)
    ]
    headers = ["class", "version", "variant", "compression", "accuracy", "p50", "p95", "partition", "healthy"]
    return _html_table(headers, rows)


def _devices_html(devices: Sequence[DeviceRow]) -> str:
    if not devices:
        return '<p class="note">No devices were recorded.</p>'
    rows = [
        [
            (d.name, False),
            (d.device_class, False),
            (d.version if d.version is not None else "none", False),
            (d.state, False),
            (str(d.requests), True),
            (str(d.errors), True),
            (_pct(accuracy_so_far(d)), True),
            (_ms(d.percentile(0.5)), True),
            (_ms(d.percentile(0.95)), True),
        ]
        for d in sorted(devices, key=lambda d: (d.device_class, d.name))
    ]
    headers = ["device", "class", "version", "state", "requests", "errors", "accuracy", "p50", "p95"]
    return _html_table(headers, rows)


def _timeline_html(timeline: Sequence[TimelineEvent]) -> str:
    if not timeline:
        return '<p class="note">No events were recorded.</p>'
    rows = [
        [
            (f"{e.at_s:.2f}", True),
            (e.kind, False),
            (e.device_class or "", False),
            (e.device or "", False),
            (e.version or "", False),
            (e.detail, False),
        ]
        for e in sorted(timeline, key=lambda e: e.at_s if math.isfinite(e.at_s) else math.inf)
    ]
    return _html_table(["t (s)", "event", "class", "device", "version", "detail"], rows)


def _figure_html(file_name: str, png: bytes | None, alt: str, missing: str) -> str:
    if png is None:
        return f'<p class="note">{_e(missing)}</p>'
    return f'<p><img src="{_e(file_name)}" alt="{_e(alt)}"></p>'


def machine_facts() -> list[tuple[str, str]]:
    """Where the demo ran (the report's numbers depend on it)."""
    try:
        import onnxruntime  # noqa: PLC0415  # heavy; only its version is wanted

        ort = str(onnxruntime.__version__)
    except ImportError:
        ort = "not installed"
    return [
        ("platform", platform.platform()),
        ("processor", platform.processor() or platform.machine() or "unknown"),
        ("CPU count", str(os.cpu_count() or "unknown")),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("ONNX Runtime", ort),
    ]


def _unmeasured_devices_html(devices: Sequence[DeviceRow]) -> str:
    names = sorted(d.name for d in devices if not any(math.isfinite(v) for v in d.latencies_ms))
    if not names or len(names) == len(devices):
        return ""  # all or nothing measured: the plot or its note already says it
    return f'<p class="note">No latency measured on: {_e(", ".join(names))}.</p>'


def report_html(record: DemoRecord, plots: dict[str, bytes | None]) -> str:
    """``index.html``; ``plots`` maps each PNG's file name to its bytes (``None``: nothing to plot)."""
    ok_class, outcome = ("ok", "behaved as expected") if record.ok else ("failed", "did NOT behave as expected")
    verdict = record.verdict or "no verdict was recorded"
    started = record.started_at.isoformat(timespec="seconds")
    notes = "".join(f"<li>{_e(n)}</li>" for n in record.notes)
    machine = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in machine_facts())
    trade_offs = _figure_html(
        TRADE_OFFS_PNG,
        plots.get(TRADE_OFFS_PNG),
        "accuracy against size and latency per candidate",
        "No optimization candidates with a measured accuracy were recorded.",
    )
    timeline = _figure_html(
        TIMELINE_PNG, plots.get(TIMELINE_PNG), "events over time per class and device", "No events were recorded."
    )
    latency = _figure_html(
        LATENCY_PNG,
        plots.get(LATENCY_PNG),
        "latency per device, coloured by class",
        "No inference latency was measured on any device.",
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>EdgeFleet demo report, {_e(started)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>EdgeFleet demo report</h1>
<p>Started {_e(started)}. Fault mode: <strong>{_e(_fault(record))}</strong>.</p>
<div class="verdict {ok_class}"><strong>The system {_e(outcome)}.</strong> {_e(verdict)}</div>
{f"<ul>{notes}</ul>" if notes else ""}
<h2>Summary per device class</h2>
{_summary_html(record)}
<h2>Optimization candidates</h2>
{trade_offs}
<h2>Rollout timeline</h2>
{timeline}
{_timeline_html(record.timeline)}
<h2>Devices</h2>
{latency}
{_unmeasured_devices_html(record.devices)}
{_devices_html(record.devices)}
<h2>Machine</h2>
<table>{machine}</table>
<p class="note">Written by edgefleet demo. Latencies are of this machine and its load at the time.</p>
</body>
</html>
"""


def write_report(record: DemoRecord, folder: Path) -> Path:
    """Write ``folder/index.html`` and its PNG plots all at once; returns the path of ``index.html``.

    ``folder`` is the report's own: it is replaced as a whole (a reader sees the previous report or
    the complete new one). A folder holding anything but report files is refused, not replaced.
    """
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"report folder {folder} exists and is not a folder")
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in REPORT_FILES)
        if foreign:
            raise ValueError(
                f"report folder {folder} holds files that are not part of a report ({', '.join(foreign[:5])}); "
                "choose an empty or new folder"
            )
    plots = {
        TRADE_OFFS_PNG: trade_offs_png(record.classes),
        TIMELINE_PNG: timeline_png(record.timeline, record.devices),
        LATENCY_PNG: latency_png(record.devices),
    }
    files = {name: png for name, png in plots.items() if png is not None}
    files[INDEX] = report_html(record, plots).encode("utf-8")
    write_dir_atomic(folder, files)
    return folder / INDEX


__all__ = [
    "INDEX",
    "NOT_MEASURED",
    "latency_png",
    "machine_facts",
    "report_html",
    "summary_table",
    "timeline_png",
    "trade_offs_png",
    "write_report",
]
