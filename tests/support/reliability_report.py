"""Write RELIABILITY.md's tables from the campaign's figures (bench/results/reliability.json).

``python -m tests.support.reliability_report [JSON] [MARKDOWN]`` replaces what lies between the
``<!-- reliability:SECTION:begin -->`` and ``<!-- reliability:SECTION:end -->`` markers, one per
section (scenarios, fuzz, matrix, load), and leaves the prose around them alone. ``make
reliability`` runs it after the campaign; a unit test checks the committed file matches the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SECTIONS = ("machine", "scenarios", "fuzz", "matrix", "load")


class ReportError(Exception):
    """The markdown lacks a section's markers, or the JSON is not the campaign's."""


def _recovery(spread: dict[str, float] | None) -> str:
    if not spread:
        return "—"
    return f"{spread['median']:.2f} s / {spread['max']:.2f} s"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_machine(data: dict[str, Any]) -> str:
    machine = data.get("machine", {})
    return (
        f"Figures from `{machine.get('platform', '?')}`, {machine.get('cpus', '?')} CPUs "
        f"({machine.get('processor', '?')}), Python {machine.get('python', '?')}; "
        f"last updated {data.get('updated', '?')}."
    )


def render_scenarios(data: dict[str, Any]) -> str:
    rows = [
        '| scenario | trials | failures | lost | what "lost" counts | recovery (median / max) | run |',
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in sorted(data.get("scenarios", {}).items()):
        rows.append(
            f"| {_cell(name)} | {s['trials']} | {s['failures']} | {s['lost']} | {_cell(s['guards'])} "
            f"| {_recovery(s.get('recovery_s'))} | {s['mode']} |"
        )
    return "\n".join(rows)


def render_fuzz(data: dict[str, Any]) -> str:
    rows = ["| target | inputs run | crashes found (all fixed) | run |", "|---|---|---|---|"]
    for name, f in sorted(data.get("fuzz", {}).items()):
        crashes = "; ".join(f["crashes_fixed"]) or "none"
        rows.append(f"| {_cell(name)} | {f['executions']:,} | {_cell(crashes)} | {f['mode']} |")
    return "\n".join(rows)


def render_matrix(data: dict[str, Any]) -> str:
    """One table per matrix, split by the callers its rows have (Enroll's callers are not the others')."""
    parts: list[str] = []
    for name, matrix in sorted(data.get("matrix", {}).items()):
        cells: dict[str, dict[str, str]] = matrix["cells"]
        groups: dict[tuple[str, ...], list[str]] = {}
        for method, row in cells.items():
            groups.setdefault(tuple(row), []).append(method)
        parts.append(f"**{name}**\n")
        for callers, methods in groups.items():
            parts.append("| method | " + " | ".join(_cell(c) for c in callers) + " |")
            parts.append("|---|" + "---|" * len(callers))
            for method in methods:
                parts.append(f"| {_cell(method)} | " + " | ".join(_cell(cells[method][c]) for c in callers) + " |")
            parts.append("")
    return "\n".join(parts).rstrip()


def render_load(data: dict[str, Any]) -> str:
    rows = ["| run | figure | value |", "|---|---|---|"]
    for name, figures in sorted(data.get("load", {}).items()):
        for key, value in figures.items():
            shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
            rows.append(f"| {_cell(name)} | {_cell(key)} | {_cell(shown)} |")
    return "\n".join(rows)


RENDERERS = {
    "machine": render_machine,
    "scenarios": render_scenarios,
    "fuzz": render_fuzz,
    "matrix": render_matrix,
    "load": render_load,
}


def render(markdown: str, data: dict[str, Any]) -> str:
    """``markdown`` with every section's tables replaced by the figures in ``data``."""
    for section in SECTIONS:
        begin, end = f"<!-- reliability:{section}:begin -->", f"<!-- reliability:{section}:end -->"
        if begin not in markdown or end not in markdown:
            raise ReportError(f"RELIABILITY.md lacks the {begin} … {end} markers")
        head, rest = markdown.split(begin, 1)
        _, tail = rest.split(end, 1)
        markdown = f"{head}{begin}\n{RENDERERS[section](data)}\n{end}{tail}"
    return markdown


def main(argv: list[str]) -> int:
    source = Path(argv[0] if argv else "bench/results/reliability.json")
    target = Path(argv[1] if len(argv) > 1 else "RELIABILITY.md")
    try:
        data = json.loads(source.read_text())
        target.write_text(render(target.read_text(), data))
    except (OSError, ValueError, KeyError, ReportError) as exc:
        print(f"error: cannot write {target} from {source}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {target} from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
