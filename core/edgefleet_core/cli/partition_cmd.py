"""``edgefleet partition``: plan where to cut a model between the node CPU and its accelerator."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import typer
from rich.console import Console
from rich.table import Table

from edgefleet_core.errors import EdgeFleetError

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from edgefleet_core.partition.plan import PartitionPlan

    Stage = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    """One segment run: the values it reads by name in, the values it computes by name out."""

app = typer.Typer(help="Partition a model between the node CPU and an accelerator.", no_args_is_help=True)

PLAN_FILES = ("head.onnx", "tail.onnx", "plan.json")
PIPELINE_DEPTH: Final = 2
"""Requests the head may be ahead of the tail in `partition run --pipelined`."""


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
            c.label,
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
        chosen = c.key == plan.chosen.key
        table.add_row(*row, style="bold green" if chosen else None)
    console.print(table)
    best = plan.chosen
    where = (
        "no split, the whole model on the node CPU"
        if best.cut_index is None
        else f"{best.label}: {', '.join(best.tensors)}"
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
    fission: Annotated[
        bool,
        typer.Option(
            help="Also try the heaviest Conv/Gemm/MatMul split in two along its output channels, "
            "so a cut can fall inside it (offered only when exact)."
        ),
    ] = True,
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
            fission=fission,
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


def _stream(path: Path, names: Sequence[str], requests: int) -> list[dict[str, np.ndarray]]:
    """``requests`` inputs cycling over the NPZ's samples: axis 0 of every array indexes them."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise EdgeFleetError(f"{path}: not an NPZ of input arrays ({exc})") from None
    missing = [n for n in names if n not in arrays]
    if missing:
        raise EdgeFleetError(f"{path} has arrays {sorted(arrays)}; the model needs {missing} too")
    counts = {n: arrays[n].shape[0] if arrays[n].ndim else 0 for n in names}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise EdgeFleetError(f"{path}: every input needs the same number of samples along axis 0; got {counts}")
    samples = next(iter(counts.values()))
    return [{n: arrays[n][i % samples : i % samples + 1] for n in names} for i in range(requests)]


def _stage_runner(sess: ort.InferenceSession) -> Stage:
    from edgefleet_core.optimize.runtime import run as run_session

    inputs = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]

    def stage(values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, run_session(sess, outputs, {n: values[n] for n in inputs}), strict=True))

    return stage


def _sequential(
    head: Stage, tail: Stage, feeds: list[dict[str, np.ndarray]]
) -> tuple[list[float], list[dict[str, np.ndarray]]]:
    latencies, results = [], []
    for feed in feeds:
        started = time.perf_counter()
        values = {**feed, **head(feed)}
        values.update(tail(values))
        latencies.append(time.perf_counter() - started)
        results.append(values)
    return latencies, results


def _pipelined(
    head: Stage, tail: Stage, feeds: list[dict[str, np.ndarray]]
) -> tuple[list[float], list[dict[str, np.ndarray]]]:
    """Head of request i+1 in this thread while the tail of request i runs in a second one.

    A plain two-thread pipeline on purpose: core may not import the agent's PipelinedExecutor
    (bounded queues, async API); ONNX Runtime releases the GIL while a session runs, so the two
    stages overlap. The queue is bounded, so the head never runs far ahead of the tail.
    """
    handover: queue.Queue[tuple[int, float, dict[str, np.ndarray]] | None] = queue.Queue(maxsize=PIPELINE_DEPTH)
    latencies = [0.0] * len(feeds)
    results: list[dict[str, np.ndarray]] = [{} for _ in feeds]
    failures: list[Exception] = []

    def tail_worker() -> None:
        while (item := handover.get()) is not None:
            index, started, values = item
            if failures:
                continue  # keep draining so the head never blocks on a full queue
            try:
                values.update(tail(values))
            except Exception as exc:  # noqa: BLE001 - not handled here: re-raised in the caller's thread
                failures.append(exc)
                continue
            latencies[index] = time.perf_counter() - started
            results[index] = values

    worker = threading.Thread(target=tail_worker, name="partition-tail", daemon=True)
    worker.start()
    try:
        for index, feed in enumerate(feeds):
            if failures:
                break
            started = time.perf_counter()
            handover.put((index, started, {**feed, **head(feed)}))
    finally:
        handover.put(None)
        worker.join()
    if failures:
        raise failures[0]
    return latencies, results


def _check_against_whole(
    model_path: Path,
    plan: PartitionPlan,
    head: onnx.ModelProto,
    tail: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
) -> int:
    """Compare head then tail with the whole model bit for bit (fusions off on both sides); inputs checked."""
    from edgefleet_core.optimize.model_io import load_model, model_digest
    from edgefleet_core.optimize.runtime import session
    from edgefleet_core.partition.cuts import VERIFY_OPTIMIZATION, PartitionError

    whole = load_model(model_path).model
    if model_digest(whole) != plan.model_digest:
        raise PartitionError(f"{model_path} is not the model the plan was made for (its digest differs)")
    run_whole = _stage_runner(session(whole, optimization=VERIFY_OPTIMIZATION))
    run_head = _stage_runner(session(head, optimization=VERIFY_OPTIMIZATION))
    run_tail = _stage_runner(session(tail, optimization=VERIFY_OPTIMIZATION))
    distinct = {tuple(v.tobytes() for v in feed.values()): feed for feed in feeds}
    for feed in distinct.values():
        expected = run_whole(feed)
        (_, [got]) = _sequential(run_head, run_tail, [feed])
        for name, want in expected.items():
            have = got[name]
            if have.dtype != want.dtype or have.shape != want.shape or have.tobytes() != want.tobytes():
                raise PartitionError(f"output {name!r} of head then tail differs from the whole model's", [name])
    return len(distinct)


@app.command("run")
def run_plan(
    directory: Annotated[
        Path, typer.Argument(help="A `partition plan --out` folder: head.onnx, tail.onnx, plan.json.")
    ],
    inputs: Annotated[
        Path, typer.Option("--inputs", help="NPZ of input arrays by name; axis 0 indexes the samples, one per request.")
    ],
    requests: Annotated[int, typer.Option("--requests", min=1, max=1_000_000, help="Requests in the stream.")] = 100,
    pipelined: Annotated[
        bool, typer.Option("--pipelined/--sequential", help="Overlap head(i+1) with tail(i), or one request at a time.")
    ] = True,
    model: Annotated[
        Path | None, typer.Option("--model", help="The whole model: check head then tail against it bit for bit.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Run a stream of inputs through a plan's head (node CPU) and tail (accelerator); print throughput and latency."""
    import numpy as np
    from pydantic import ValidationError

    from edgefleet_core.optimize.model_io import load_model
    from edgefleet_core.optimize.runtime import CPU_EP, can_run, session
    from edgefleet_core.partition.cuts import PartitionError
    from edgefleet_core.partition.plan import PartitionPlan, check_head_tail

    console = Console(stderr=True)
    try:
        try:
            plan = PartitionPlan.model_validate_json((directory / "plan.json").read_bytes())
        except ValidationError as exc:
            raise PartitionError(
                f"{directory / 'plan.json'} is not an edgefleet partition plan ({exc.errors()[0]['msg']})"
            ) from None
        except OSError as exc:
            raise PartitionError(
                f"{directory} is not a `partition plan --out` folder ({exc.strerror or exc})"
            ) from None
        if plan.chosen.cut_index is None:
            raise PartitionError("the plan chooses no split: there is no head and tail to run")
        head, tail = (load_model(directory / f"{part}.onnx").model for part in ("head", "tail"))
        check_head_tail(plan, head, tail)
        # A provider this ONNX Runtime lacks falls back to the CPU, and the report says which ran.
        head_session = session(head, next(p for p in (plan.head_execution_provider, CPU_EP) if can_run(p)))
        tail_session = session(tail, next(p for p in (plan.tail_execution_provider, CPU_EP) if can_run(p)))
        run_head, run_tail = _stage_runner(head_session), _stage_runner(tail_session)
        forwarded = [i.name for i in tail_session.get_inputs() if i.name not in plan.chosen.tensors]
        head_inputs = [i.name for i in head_session.get_inputs()]
        feeds = _stream(inputs, [*head_inputs, *(n for n in forwarded if n not in head_inputs)], requests)
        _sequential(run_head, run_tail, feeds[:1])  # warm-up: first runs allocate and pick kernels
        started = time.perf_counter()
        latencies, _ = (_pipelined if pipelined else _sequential)(run_head, run_tail, feeds)
        seconds = time.perf_counter() - started
        checked = None if model is None else _check_against_whole(model, plan, head, tail, feeds)
    except EdgeFleetError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from None
    samples_ms = np.asarray(latencies) * 1000.0
    latency = {
        "p50": float(np.percentile(samples_ms, 50)),
        "p95": float(np.percentile(samples_ms, 95)),
        "mean": float(samples_ms.mean()),
    }
    result = {
        "planId": plan.plan_id,
        "mode": "pipelined" if pipelined else "sequential",
        "executor": "core: two ONNX Runtime sessions, head in the caller's thread, tail in a second one",
        "requests": requests,
        "seconds": seconds,
        "throughputPerS": requests / seconds,
        "latencyMs": latency,
        "headExecutionProvider": head_session.get_providers()[0],
        "tailExecutionProvider": tail_session.get_providers()[0],
        "planTailExecutionProvider": plan.tail_execution_provider,
        "checkedInputs": checked,
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console.print(
        f"{result['mode']}: {requests} requests in {seconds:.3f} s, {requests / seconds:.1f} req/s; "
        f"latency p50 {latency['p50']:.3f} ms, p95 {latency['p95']:.3f} ms"
    )
    console.print(f"head on {result['headExecutionProvider']}, tail on {result['tailExecutionProvider']}")
    if result["tailExecutionProvider"] != plan.tail_execution_provider:
        console.print(
            f"[yellow]note:[/yellow] {plan.tail_execution_provider} is not available here; the 'accelerator' is a "
            "second CPU session in this process"
        )
    if checked is not None:
        console.print(f"outputs equal the whole model's bit for bit on {checked} distinct inputs (fusions off)")
