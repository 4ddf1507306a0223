"""The closing summary and the HTML report: content, escaping, real PNGs, partial records, atomic folder."""

from __future__ import annotations

import html.parser
import math
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from edgefleet_operator.demo.record import Candidate, ClassSummary, DemoRecord, DeviceRow, TimelineEvent
from edgefleet_operator.demo.report import (
    INDEX,
    LATENCY_PNG,
    TIMELINE_PNG,
    TRADE_OFFS_PNG,
    summary_table,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"

SMALL = ClassSummary(
    device_class="cpu-small",
    version="2",
    source_bytes=400_000,
    variant_bytes=100_000,
    baseline_accuracy=0.98,
    accuracy=0.975,
    partition_cut=None,
    p50_ms=1.25,
    p95_ms=3.5,
    devices_total=3,
    devices_healthy=3,
    candidates=(
        Candidate("int8-dynamic", 100_000, 0.975, 0.8, accepted=True, chosen=True),
        Candidate("fp16", 200_000, 0.98, None, accepted=True, chosen=False),
        Candidate("prune-50%$x$", 90_000, 0.70, 0.7, accepted=False, chosen=False),
    ),
)
BIG = ClassSummary(
    device_class="arm-big",
    version="2",
    source_bytes=400_000,
    variant_bytes=400_000,
    baseline_accuracy=0.98,
    accuracy=0.98,
    partition_cut="/conv2/Relu_output_0",
    p50_ms=2.0,
    p95_ms=4.0,
    devices_total=2,
    devices_healthy=1,
    candidates=(Candidate("graph-opt", 400_000, 0.98, 1.5, accepted=True, chosen=True),),
)
DEVICES = (
    DeviceRow(EVIL, "cpu-small", "2", "serving", 20, 0, 19, tuple(1.0 + i / 10 for i in range(20))),
    DeviceRow("small-2", "cpu-small", "2", "serving", 20, 0, 20, tuple(1.5 + i / 10 for i in range(20))),
    DeviceRow("big-1", "arm-big", "2", "serving", 10, 1, 9, tuple(2.0 + i / 5 for i in range(10))),
    DeviceRow("big-2", "arm-big", None, "refused"),
)
TIMELINE = (
    TimelineEvent(0.5, "built", "cpu-small", version="2"),
    TimelineEvent(1.0, "published", "cpu-small", version="2"),
    TimelineEvent(1.2, "wave", "cpu-small", version="2", detail="wave 1 of 2"),
    TimelineEvent(2.0, "installed", "cpu-small", EVIL, "2"),
    TimelineEvent(2.5, "serving", "cpu-small", EVIL, "2"),
    TimelineEvent(3.0, "refused", None, "big-2", "2", detail="digest mismatch & <b>bold</b>"),
    TimelineEvent(3.5, "fault", detail="tampered-artifact injected"),
    TimelineEvent(4.0, "something-new", "arm-big"),
)
RECORD = DemoRecord(
    started_at=datetime(2026, 11, 22, 12, 0, tzinfo=UTC),
    fault="tampered-artifact",
    classes=(SMALL, BIG),
    devices=DEVICES,
    timeline=TIMELINE,
    ok=True,
    verdict="big-2 refused the modified bundle & kept version 1",
    notes=("note with <angle> brackets",),
)


def _text(record: DemoRecord) -> str:
    console = Console(record=True, width=200)
    console.print(summary_table(record))
    return console.export_text()


def _row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if name in line)


def test_summary_has_one_row_per_class_with_its_figures() -> None:
    text = _text(RECORD)
    small, big = _row(text, "cpu-small"), _row(text, "arm-big")
    for cell in ("97.7 KiB", "4.00x", "97.5% (baseline 98.0%, -0.5 pt)", "1.25 ms", "3.50 ms", "whole model", "3/3"):
        assert cell in small, (cell, small)
    for cell in ("1.00x", "/conv2/Relu_output_0", "1/2", "2.00 ms"):
        assert cell in big, (cell, big)
    assert text.index("arm-big") < text.index("cpu-small")  # sorted by class


def test_summary_of_unmeasured_class_says_not_measured() -> None:
    bare = ClassSummary("c", "1", 0, 0, None, None, None, None, None, 0, 0)
    row = _row(_text(DemoRecord(started_at=RECORD.started_at, fault=None, classes=(bare,))), " c ")
    assert row.count("not measured") == 6  # variant, compression, accuracy, p50, p95, partition
    assert "whole model" not in row  # no variant, so no claim about how it runs
    assert "0/0" in row
    assert "no device classes were recorded" in _text(DemoRecord(started_at=RECORD.started_at, fault=None))


class _Collector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Collector:
    parser = _Collector()
    parser.feed(page)
    parser.close()
    return parser


def test_report_writes_html_and_real_pngs(tmp_path: Path) -> None:
    index = write_report(RECORD, tmp_path / "report")
    assert index == tmp_path / "report" / INDEX
    page = index.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert sorted(parsed.images) == sorted([TRADE_OFFS_PNG, TIMELINE_PNG, LATENCY_PNG])
    for name in parsed.images:
        data = (index.parent / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 10_000, name  # a real plot, not an empty canvas
    assert "script" not in parsed.tags  # the device name did not become markup
    text = " ".join(parsed.text)
    assert EVIL in text  # ... it shows as typed
    assert "&lt;script&gt;" in page
    assert "digest mismatch &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "&lt;angle&gt;" in page
    assert "tampered-artifact" in text
    assert "big-2 refused the modified bundle & kept version 1" in text
    assert "behaved as expected" in text
    assert "/conv2/Relu_output_0" in text
    assert "whole model" in text
    assert "No latency measured on: big-2." in text
    assert text.index("tampered-artifact injected") < text.index("something-new")  # the timeline table
    for fact in ("ONNX Runtime", "CPU count", "Python", "platform"):
        assert fact in text
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched
    assert not [p for p in tmp_path.iterdir() if p.name != "report"]  # no staging folder left behind


def test_failed_run_says_so_at_the_top(tmp_path: Path) -> None:
    failed = DemoRecord(started_at=RECORD.started_at, fault="bad-model", ok=False, verdict="no rollback happened")
    text = " ".join(_parse(write_report(failed, tmp_path / "r").read_text()).text)
    assert "did NOT behave as expected" in text
    assert text.index("bad-model") < text.index("Summary per device class")
    assert text.index("no rollback happened") < text.index("Summary per device class")


@pytest.mark.parametrize(
    "record",
    [
        DemoRecord(started_at=RECORD.started_at, fault=None),
        DemoRecord(
            started_at=RECORD.started_at,
            fault="bad-model",
            classes=(ClassSummary("c", "1", 10, 0, None, None, None, None, None, 1, 0),),
            devices=(DeviceRow("d", "c", None, "enrolling"),),
            timeline=(TimelineEvent(float("nan"), "fault"),),
        ),
    ],
    ids=["empty", "nothing-measured"],
)
def test_partial_records_render_with_notes_instead_of_plots(tmp_path: Path, record: DemoRecord) -> None:
    index = write_report(record, tmp_path / "r")
    parsed = _parse(index.read_text())
    text = " ".join(parsed.text)
    assert parsed.images == []
    assert sorted(p.name for p in index.parent.iterdir()) == [INDEX]
    assert "No optimization candidates with a measured accuracy were recorded." in text
    assert "No inference latency was measured on any device." in text


def test_only_some_plots_when_only_some_data(tmp_path: Path) -> None:
    record = DemoRecord(started_at=RECORD.started_at, fault=None, devices=DEVICES[:1])
    index = write_report(record, tmp_path / "r")
    assert _parse(index.read_text()).images == [LATENCY_PNG]
    assert (index.parent / LATENCY_PNG).read_bytes().startswith(PNG_MAGIC)


def test_rewriting_replaces_the_previous_report_whole(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    write_report(RECORD, folder)
    write_report(DemoRecord(started_at=RECORD.started_at, fault=None), folder)
    assert sorted(p.name for p in folder.iterdir()) == [INDEX]  # no stale plots from the first run


def test_a_folder_with_other_files_is_refused_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"keep\.txt"):
        write_report(RECORD, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert not (tmp_path / INDEX).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        write_report(RECORD, tmp_path / "file")


def test_names_matplotlib_could_choke_on_still_plot(tmp_path: Path) -> None:
    # "$...$" is math to matplotlib (bad math raises); CJK and emoji are missing from its font (a
    # warning, an error under this suite's filterwarnings). Neither may cost the report its plots.
    odd = "摄像头 🚀 $\\frac{ $x$\n"
    record = DemoRecord(
        started_at=RECORD.started_at,
        fault=None,
        classes=(replace(SMALL, device_class=odd, candidates=(Candidate(odd, 10, 0.5, math.inf, True, True),)),),
        devices=(DeviceRow(odd, odd, "1", "serving", 1, 0, 1, (1.0, 2.0)),),
        timeline=(TimelineEvent(1.0, "wave", odd, odd, odd),),
    )
    index = write_report(record, tmp_path / "r")
    assert sorted(_parse(index.read_text()).images) == sorted([TRADE_OFFS_PNG, TIMELINE_PNG, LATENCY_PNG])
