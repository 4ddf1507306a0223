"""``edgefleet optimize``: the best variant of a model for one device class, with a report."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgefleet_core.errors import EdgeFleetError, FieldProblem, ResourceError
from edgefleet_core.resources.crds import field_path
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.loading import parse_resource, read_documents
from edgefleet_core.resources.recipe import Recipe

if TYPE_CHECKING:
    from edgefleet_core.optimize.evaluate import Evaluation
    from edgefleet_core.optimize.pipeline import ClassOptimization

MAX_RECIPE_BYTES = 1024 * 1024


class Objective(StrEnum):
    """What the best accepted candidate minimises."""

    latency = "latency"
    size = "size"
    balanced = "balanced"


def load_device_class(path: Path) -> DeviceClass:
    """The single DeviceClass resource in ``path``."""
    documents = read_documents(path)
    classes = [parse_resource(d.body, d.source) for d in documents]
    found = [c for c in classes if isinstance(c, DeviceClass)]
    if len(found) != 1 or len(classes) != 1:
        problem = FieldProblem("kind", f"expected exactly one DeviceClass, found {len(classes)} resources", "schema")
        raise ResourceError(str(path), [problem])
    return found[0]


def load_recipe(path: Path) -> Recipe:
    """A recipe file: ``passes:`` with the same entries as a DeviceClass's ``defaultRecipe``."""
    source = str(path)
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise ResourceError(source, [FieldProblem("(document)", "recipe file is over 1 MiB", "model")])
        body = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ResourceError(source, [FieldProblem("(document)", f"cannot read recipe: {exc}", "model")]) from None
    try:
        return Recipe.model_validate(body)
    except ValidationError as exc:
        problems = [FieldProblem(field_path(list(e["loc"])), e["msg"], "model") for e in exc.errors()]
        raise ResourceError(source, problems) from None


class _Bars:
    """Progress bars for the pipeline's stages."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, object] = {}

    def begin(self, label: str, total: int) -> None:
        self.tasks[label] = self.progress.add_task(label, total=total)

    def step(self, label: str, detail: str) -> None:
        task = self.tasks.get(label)
        if task is not None:
            self.progress.update(task, advance=1, description=f"{label}: {detail}")  # type: ignore[arg-type]


def optimize(
    model: Annotated[Path, typer.Argument(help="The FP32 ONNX model.")],
    device_class: Annotated[Path, typer.Option("--device-class", help="A DeviceClass resource (YAML).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: model.onnx, report.json, report.png.")],
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="A recipe (YAML with `passes:`); default: the class's, else auto.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help=".npz with arrays named after the model inputs and optional `labels`."),
    ] = None,
    max_accuracy_drop: Annotated[
        float,
        typer.Option("--max-accuracy-drop", min=0.0, max=100.0, help="Accuracy budget in percentage points."),
    ] = 1.0,
    objective: Annotated[
        Objective, typer.Option(help="What the best accepted candidate minimises.")
    ] = Objective.balanced,
    seed: Annotated[int, typer.Option(help="Seed for calibration order and training.")] = 0,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse variants built before.")] = True,
) -> None:
    """Optimize MODEL for a device class: build candidates, measure them against FP32, keep the best."""
    # Heavy imports (ONNX Runtime, the passes, matplotlib) only when the command runs.
    from edgefleet_core.optimize.data import load_dataset
    from edgefleet_core.optimize.lineage import VariantCache, default_cache_dir
    from edgefleet_core.optimize.model_io import load_model, serialize, sha256_hex, write_dir_atomic
    from edgefleet_core.optimize.pipeline import optimize_for_class, require_chosen
    from edgefleet_core.optimize.report import report_json, report_png
    from edgefleet_core.training import load_trainer

    console = Console(stderr=True)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
        # The output folder is replaced whole: never a folder that is not an earlier output of ours.
        console.print(f"[red]error:[/red] {out} exists and is not an edgefleet optimize output; choose a new folder")
        raise typer.Exit(code=1)
    try:
        target = load_device_class(device_class)
        chosen_recipe = load_recipe(recipe) if recipe is not None else None
        source = load_model(model)
        dataset = load_dataset(data, source.model) if data is not None else None
        data_digest = sha256_hex(data.read_bytes()) if data is not None else None
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            result = optimize_for_class(
                source,
                target,
                recipe=chosen_recipe,
                recipe_origin=f"--recipe {recipe}" if recipe else "given",
                data=dataset,
                data_digest=data_digest,
                max_accuracy_drop=max_accuracy_drop / 100.0,
                objective=objective.value,
                trainer=load_trainer(),
                cache=VariantCache(default_cache_dir()) if cache else None,
                progress=_Bars(progress),
                seed=seed,
            )
        _print_summary(console, result)
        chosen = require_chosen(result)
        write_dir_atomic(
            out,
            {
                "model.onnx": serialize(chosen.model),
                "report.json": report_json(source, result),
                "report.png": report_png(result),
            },
        )
    except EdgeFleetError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from None
    except OSError as exc:
        console.print(f"[red]error:[/red] cannot write {out}: {exc.strerror or exc}")
        raise typer.Exit(code=1) from None
    console.print(f"[green]wrote[/green] {out}/model.onnx ({chosen.name}, variant {chosen.variant_id})")


def _print_summary(console: Console, result: ClassOptimization) -> None:
    base = result.baseline
    table = Table(title=f"{result.device_class} on {result.execution_provider} — {result.plan.description}")
    for column in ("candidate", "size KiB", base.metric, "Δ", "p50 ms", "p95 ms", "verdict"):
        table.add_column(column)

    def row(name: str, e: Evaluation, verdict: str) -> None:
        p50 = f"{e.latency.p50_ms:.3f}" if e.latency.p50_ms is not None else "unmeasured"
        p95 = f"{e.latency.p95_ms:.3f}" if e.latency.p95_ms is not None else "-"
        table.add_row(name, f"{e.size_bytes / 1024:.1f}", f"{e.metric_value:.4f}", f"{e.score - base.score:+.4f}",
                      p50, p95, verdict)  # fmt: skip

    row("FP32", base, "baseline")
    for c in result.candidates:
        if c.evaluation is not None:
            verdict = "chosen" if c is result.chosen else ("accepted" if c.accepted else f"rejected: {c.rejection}")
            row(c.name, c.evaluation, verdict)
    console.print(table)
