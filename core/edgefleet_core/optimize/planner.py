"""Which recipes to try for a device class: the chosen one, and the fallbacks worth measuring.

The recipe comes from the user (``--recipe`` / the EdgeModel's per-class override or recipe), else
the DeviceClass's default recipe, else :func:`auto_recipe`. Around it the planner adds a few
alternatives the pipeline measures too, so that when the chosen recipe misses the accuracy budget or
runs slower than FP32 the next-best one is there: INT8 with quantization-aware fine-tuning, mixed
precision instead of plain INT8, and the exact graph-optimized FP32 model as the safe floor.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet_core.resources.device_class import DeviceClassSpec
from edgefleet_core.resources.recipe import PassSpec, Recipe

CPU_EP = "CPUExecutionProvider"
# Providers whose INT8 kernels pay off (QDQ models are fused into integer kernels).
INT8_PROVIDERS = frozenset(
    {CPU_EP, "OpenVINOExecutionProvider", "QNNExecutionProvider", "TensorrtExecutionProvider",
     "NnapiExecutionProvider", "XnnpackExecutionProvider", "ACLExecutionProvider", "ArmNNExecutionProvider"}
)  # fmt: skip
# Providers with fast FP16 kernels.
FP16_PROVIDERS = frozenset(
    {"CUDAExecutionProvider", "TensorrtExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider",
     "ROCMExecutionProvider", "MIGraphXExecutionProvider", "OpenVINOExecutionProvider", "QNNExecutionProvider"}
)  # fmt: skip
MAX_CANDIDATES = 5


@dataclass(frozen=True)
class CandidateRecipe:
    """A recipe to build and measure, and why it is on the list."""

    name: str
    passes: tuple[PassSpec, ...]
    origin: str


def target_provider(spec: DeviceClassSpec) -> str:
    """The execution provider a class's variants are built for."""
    return spec.accelerator.execution_provider if spec.accelerator is not None else CPU_EP


def _spec(pass_type: str, **options: object) -> PassSpec:
    member = {
        "GraphOptimization": "graphOptimization",
        "QuantizeInt8": "quantizeInt8",
        "MixedPrecision": "mixedPrecision",
        "QuantizationAwareTraining": "quantizationAwareTraining",
        "FP16": "fp16",
    }[pass_type]
    body: dict[str, object] = {"type": pass_type}
    if options:
        body[member] = options
    return PassSpec.model_validate(body)


def auto_recipe(spec: DeviceClassSpec) -> Recipe:
    """The recipe for a class that names none: what its EP and precisions run well.

    INT8 (with mixed precision, which keeps slow or harmful layers in FP32) where the class lists
    int8 and its provider has integer kernels; FP16 where it lists fp16 and the provider is a GPU-like
    one; otherwise graph optimization alone. Graph optimization stays at a level every device of the
    class can run (no hardware-specific layouts).
    """
    provider = target_provider(spec)
    precisions = set(spec.precisions)
    level = "extended" if provider == CPU_EP else "basic"
    passes = [_spec("GraphOptimization", level=level)]
    if "int8" in precisions and provider in INT8_PROVIDERS:
        passes.append(_spec("MixedPrecision"))
    elif "fp16" in precisions and provider in FP16_PROVIDERS:
        passes.append(_spec("FP16"))
    return Recipe(passes=passes)


def _replace(passes: tuple[PassSpec, ...], pass_type: str, by: list[PassSpec]) -> tuple[PassSpec, ...]:
    out: list[PassSpec] = []
    for spec in passes:
        out.extend(by if spec.type == pass_type else [spec])
    return tuple(out)


def candidate_recipes(
    primary: Recipe, origin: str, *, trainer_available: bool, has_data: bool
) -> list[CandidateRecipe]:
    """The primary recipe first, then fallbacks; duplicates removed, at most :data:`MAX_CANDIDATES`."""
    first = tuple(primary.passes)
    types = [p.type for p in first]
    candidates = [CandidateRecipe("recipe", first, origin)]
    if "QuantizeInt8" in types:
        if has_data:
            candidates.append(
                CandidateRecipe(
                    "mixed-precision",
                    _replace(first, "QuantizeInt8", [_spec("MixedPrecision")]),
                    "fallback: keep the layers that hurt accuracy or speed in FP32",
                )
            )
        if trainer_available and has_data and "QuantizationAwareTraining" not in types:
            quantize = next(p for p in first if p.type == "QuantizeInt8")
            candidates.append(
                CandidateRecipe(
                    "qat-int8",
                    _replace(first, "QuantizeInt8", [_spec("QuantizationAwareTraining"), quantize]),
                    "fallback: quantization-aware fine-tuning before INT8",
                )
            )
    exact = (_spec("GraphOptimization"),)
    candidates.append(CandidateRecipe("fp32-optimized", exact, "floor: exact graph optimization only"))
    unique: list[CandidateRecipe] = []
    seen: set[str] = set()
    for candidate in candidates:
        key = "|".join(p.model_dump_json(by_alias=True) for p in candidate.passes)
        if key not in seen:
            seen.add(key)
            unique.append(candidate)
    return unique[:MAX_CANDIDATES]
