"""``edgefleet partition``: plan where to cut a model between the node CPU and its accelerator."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from edgefleet_core.errors import EdgeFleetError

if TYPE_CHECKING:
    from edgefleet_core.partition.plan import PartitionPlan

app = typer.Typer(help="Partition a model between the node CPU and an accelerator.", no_args_is_help=True)

PLAN_FILES = ("head.onnx", "tail.onnx", "plan.json")


class PlanPolicy(StrEnum):
    """What the chosen cut optimizes."""

    latency = "latency"
    throughput = "throughput"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_plan(console: Console, plan: PartitionPlan) -> None:
    measured = any(c.measured_latency_ms is not None for c in plan.candidates)
    table = Table(title=f"Partition candidates ({plan.policy}; tails timed on {plan.tail_measured_on})")
    for column in ("cut", "tensors", "bytes", "head ms", "transfer ms", "tail ms", "latency ms", "req/s"):
        table.add_column(column, justify="left" if column in ("cut", "tensors") else "right")
    if measured:
        table.add_column("measured latency ms", justify="right")
    for c in plan.candidates:
        row = [
            "no split" if c.cut_index is None else str(c.cut_index),
            ", ".join(c.tensors) or "-",
            str(c.bytes),
            _ms(c.head_ms),
            _ms(c.transfer_ms),
            _ms(c.tail_ms),
            _ms(c.latency_ms),
            f"{c.throughput_per_s:.1f}",
        ]
        if measured:
            row.append(_ms(c.measured_latency_ms))
        chosen = c.cut_index == plan.chosen_cut
        table.add_row(*row, style="bold green" if chosen else None)
    console.print(table)
    best = plan.chosen
    where = (
        "no split, the whole model on the node CPU"
        if best.cut_index is None
        else f"cut {best.cut_index} ({', '.join(best.tensors)})"
    )
    console.print(f"chosen: {where}; plan {plan.plan_id}")
    if measured:
        console.print("measured latency = head then tail run here, plus the link's modelled transfer")
    if plan.tail_measured_on != plan.tail_execution_provider:
        console.print(
            f"[yellow]note:[/yellow] {plan.tail_execution_provider} is not available here; "
            f"tails were timed on {plan.tail_measured_on}"
        )


@app.command()
def plan(
    model: Annotated[Path, typer.Argument(help="The ONNX model to partition.")],
    device_class: Annotated[
        Path, typer.Option("--device-class", help="A DeviceClass resource (YAML) with spec.accelerator.link.")
    ],
    policy: Annotated[PlanPolicy, typer.Option(help="Minimize latency, or maximize pipelined throughput.")] = (
        PlanPolicy.latency
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of a table.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write head.onnx, tail.onnx and plan.json to this folder.")
    ] = None,
    measure: Annotated[
        bool, typer.Option("--measure", help="Also run every candidate end to end and record its latency.")
    ] = False,
    runs: Annotated[int, typer.Option("--runs", min=1, max=10000, help="Timed runs per segment.")] = 20,
    cut: Annotated[
        list[str] | None, typer.Option("--cut", help="A manual cut: a tensor crossing it (repeat for each).")
    ] = None,
    max_tensors: Annotated[
        int, typer.Option("--max-tensors", min=1, max=32, help="Most tensors a candidate cut may cross.")
    ] = 4,
) -> None:
    """Profile the candidate cuts of MODEL for a device class and choose one."""
    # ONNX Runtime and the planner only when the command runs.
    from edgefleet_core.cli.optimize_cmd import load_device_class
    from edgefleet_core.optimize.model_io import load_model, serialize, write_dir_atomic
    from edgefleet_core.partition.cuts import verify_split
    from edgefleet_core.partition.plan import accelerator_link, plan_partition, split_for
    from edgefleet_core.partition.profile import example_inputs

    console = Console(stderr=True)
    if (
        out is not None
        and out.exists()
        and (not out.is_dir() or (any(out.iterdir()) and not (out / "plan.json").is_file()))
    ):
        # The output folder is replaced whole: never a folder that is not an earlier output of ours.
        console.print(f"[red]error:[/red] {out} exists and is not an edgefleet partition output; choose a new folder")
        raise typer.Exit(code=1)
    try:
        target = load_device_class(device_class)
        accelerator_link(target)
        source = load_model(model)
        inputs = example_inputs(source.model)
        result = plan_partition(
            source.model,
            target,
            policy=policy.value,
            inputs=inputs,
            runs=runs,
            max_tensors=max_tensors,
            manual_cut=cut or None,
            measure=measure,
        )
        if as_json:
            typer.echo(json.dumps({"planId": result.plan_id, "plan": json.loads(result.canonical_json())}, indent=2))
        else:
            _print_plan(console, result)
        if out is not None:
            files = {"plan.json": result.canonical_json()}
            if result.chosen.cut_index is not None:
                split = split_for(source.model, result)
                verify_split(source.model, split, inputs)  # never write a head and tail that disagree
                files = {"head.onnx": serialize(split.head), "tail.onnx": serialize(split.tail), **files}
            else:
                console.print("no split chosen: only plan.json is written")
            write_dir_atomic(out, files)
    except EdgeFleetError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from None
