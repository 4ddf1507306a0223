"""The sample models: trained from code on the digits set, emitted as ONNX, measured with ONNX Runtime.

Each builder trains its architecture reproducibly (same seed, same machine and library versions →
byte-identical ONNX), emits the graph from the trained weights and measures top-1 accuracy on the
held-out split with ONNX Runtime. :func:`build_all` writes ``<name>.onnx``, the test split as
``<name>-data.npz`` (arrays ``input`` and ``labels``, the pipeline's ``DATA.npz`` format) and an
``index.json`` with what was measured.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import onnx
from torch import nn

from edgefleet_core.optimize.model_io import serialize, write_file_atomic
from edgefleet_core.samples.architectures import (
    MLP,
    PlainCNN,
    TinyTransformer,
    mlp_onnx,
    parameter_count,
    plain_cnn_onnx,
    transformer_onnx,
)
from edgefleet_core.samples.digits import (
    DEFAULT_SEED,
    DigitsSplit,
    DigitsSubset,
    Images,
    Labels,
    load_digits_split,
    npz_bytes,
)
from edgefleet_core.samples.training import TrainingSettings, deterministic, fit, onnx_accuracy

INDEX_FILE = "index.json"


@dataclass(frozen=True)
class SampleModel:
    """One trained sample model and what was measured on it."""

    name: str
    model: onnx.ModelProto
    """Opset 17; input ``input`` with a dynamic batch dimension ``N``; output ``logits`` ``[N, 10]``."""
    accuracy: float
    """Top-1 accuracy (0..1) on the held-out test split, measured with ONNX Runtime."""
    parameters: int
    """Trainable parameters of the architecture."""
    train_seconds: float
    description: str
    test_inputs: Images
    """The test split in the layout the model's ``input`` takes."""
    test_labels: Labels
    epochs: int
    seed: int

    def fp32_bytes(self) -> int:
        """Size of the serialized ONNX file."""
        return len(serialize(self.model))


@dataclass(frozen=True)
class SampleSpec:
    """How to make one sample: its architecture, emitter, input layout and training settings."""

    name: str
    description: str
    make: Callable[[], nn.Module]
    """A freshly initialized module of the architecture (call it inside :func:`deterministic`)."""
    emit: Callable[[Any, str, str], onnx.ModelProto]
    """The architecture's emitter: ``emit(module, graph_name, doc)``; it takes the class ``make`` returns."""
    view: Callable[[DigitsSubset], Images]
    """The data layout the model's ``input`` takes."""
    epochs: int
    """Epochs of the full build."""
    quick_epochs: int
    """Epochs of a ``quick`` build: a usable but less accurate model for smoke runs."""
    learning_rate: float


def _digits_cnn() -> nn.Module:
    return PlainCNN((32, 64, 128), 128, batch_norm=True)


def _wide_cnn() -> nn.Module:
    return PlainCNN((64, 128, 256), 256, batch_norm=False)


def _mlp() -> nn.Module:
    return MLP((1024, 1024))


def _images(subset: DigitsSubset) -> Images:
    return subset.images


SAMPLES = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            SampleSpec(
                "digits-cnn",
                "CNN on 8x8 digits: 3x (Conv3x3+BatchNormalization+Relu) 32/64/128, MaxPool, Conv3x3 128+Relu, "
                "GlobalAveragePool, Gemm 128->10. BatchNormalization is left unfused.",
                _digits_cnn,
                plain_cnn_onnx,
                _images,
                epochs=12,
                quick_epochs=3,
                learning_rate=3e-3,
            ),
            SampleSpec(
                "overparameterized-mlp",
                "MLP on flattened digits [N,64]: Gemm 64->1024, Relu, Gemm 1024->1024, Relu, Gemm 1024->10; "
                "over-parameterized on purpose for pruning and clustering.",
                _mlp,
                mlp_onnx,
                DigitsSubset.flat,
                epochs=20,
                quick_epochs=4,
                learning_rate=1e-3,
            ),
            SampleSpec(
                "wide-cnn",
                "Plain wide CNN on 8x8 digits: Conv3x3+Relu 64/128/256, MaxPool, Conv3x3 256+Relu, "
                "GlobalAveragePool, Gemm 256->10; no residuals, so structured pruning can remove filters.",
                _wide_cnn,
                plain_cnn_onnx,
                _images,
                epochs=8,
                quick_epochs=2,
                learning_rate=3e-3,
            ),
            SampleSpec(
                "tiny-transformer",
                "Transformer encoder on image rows [N,8,8] (8 tokens x 8 features): Linear->64 + learned positions, "
                "2 post-norm layers (4-head self-attention as MatMul with 2-D weights, Relu feed-forward 64->256->64), "
                "ReduceMean over tokens, Gemm 64->10.",
                TinyTransformer,
                transformer_onnx,
                DigitsSubset.rows,
                epochs=60,
                quick_epochs=10,
                learning_rate=3e-3,
            ),
        )
    }
)
"""Every sample model by name, in build order."""


def train_sample(
    spec: SampleSpec, epochs: int, *, seed: int = DEFAULT_SEED, split: DigitsSplit | None = None
) -> SampleModel:
    """Train ``spec``'s architecture for ``epochs`` epochs, emit its ONNX graph and measure it."""
    split = split if split is not None else load_digits_split(seed)
    settings = TrainingSettings(epochs=epochs, learning_rate=spec.learning_rate, seed=seed)
    with deterministic(seed):
        module = spec.make()
        seconds = fit(module, spec.view(split.train), split.train.labels, settings)
    model = spec.emit(module, spec.name, spec.description)
    test_inputs = spec.view(split.test)
    return SampleModel(
        name=spec.name,
        model=model,
        accuracy=onnx_accuracy(model, test_inputs, split.test.labels),
        parameters=parameter_count(module),
        train_seconds=seconds,
        description=spec.description,
        test_inputs=test_inputs,
        test_labels=split.test.labels,
        epochs=epochs,
        seed=seed,
    )


def _spec(name: str) -> SampleSpec:
    try:
        return SAMPLES[name]
    except KeyError:
        raise ValueError(f"no sample model named {name!r}; known: {', '.join(SAMPLES)}") from None


def _train_named(name: str, epochs: int | None, seed: int, split: DigitsSplit | None) -> SampleModel:
    spec = _spec(name)
    return train_sample(spec, spec.epochs if epochs is None else epochs, seed=seed, split=split)


def digits_cnn(epochs: int | None = None, *, seed: int = DEFAULT_SEED, split: DigitsSplit | None = None) -> SampleModel:
    """The main demo and benchmark CNN, input ``[N, 1, 8, 8]``; ``epochs`` defaults to the full build's."""
    return _train_named("digits-cnn", epochs, seed, split)


def overparameterized_mlp(
    epochs: int | None = None, *, seed: int = DEFAULT_SEED, split: DigitsSplit | None = None
) -> SampleModel:
    """The over-parameterized MLP for pruning and clustering, input ``[N, 64]``."""
    return _train_named("overparameterized-mlp", epochs, seed, split)


def wide_cnn(epochs: int | None = None, *, seed: int = DEFAULT_SEED, split: DigitsSplit | None = None) -> SampleModel:
    """The wide plain CNN for structured channel pruning, input ``[N, 1, 8, 8]``."""
    return _train_named("wide-cnn", epochs, seed, split)


def tiny_transformer(
    epochs: int | None = None, *, seed: int = DEFAULT_SEED, split: DigitsSplit | None = None
) -> SampleModel:
    """The transformer encoder for dynamic quantization and low-rank factorization, input ``[N, 8, 8]``."""
    return _train_named("tiny-transformer", epochs, seed, split)


def build(name: str, *, quick: bool = False, seed: int = DEFAULT_SEED, split: DigitsSplit | None = None) -> SampleModel:
    """Train the sample called ``name`` with its full (or ``quick``) settings."""
    spec = _spec(name)
    return train_sample(spec, spec.quick_epochs if quick else spec.epochs, seed=seed, split=split)


def index_entry(sample: SampleModel) -> dict[str, Any]:
    """What ``index.json`` records about one sample."""
    return {
        "name": sample.name,
        "model": f"{sample.name}.onnx",
        "data": f"{sample.name}-data.npz",
        "description": sample.description,
        "accuracy": sample.accuracy,
        "test_samples": len(sample.test_labels),
        "parameters": sample.parameters,
        "fp32_bytes": sample.fp32_bytes(),
        "train_seconds": round(sample.train_seconds, 3),
        "epochs": sample.epochs,
        "seed": sample.seed,
    }


def write_sample(out_dir: Path, sample: SampleModel) -> None:
    """Write ``<name>.onnx`` and ``<name>-data.npz`` (the test split) into ``out_dir``, each atomically."""
    write_file_atomic(out_dir / f"{sample.name}.onnx", serialize(sample.model))
    write_file_atomic(out_dir / f"{sample.name}-data.npz", npz_bytes(sample.test_inputs, sample.test_labels))


def _read_index(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["models"]
        return {str(entry["name"]): dict(entry) for entry in entries}
    except (ValueError, KeyError, TypeError):
        # An unreadable index is rebuilt from what this run writes.
        return {}


def build_all(
    out_dir: Path, *, quick: bool = False, names: Sequence[str] | None = None, seed: int = DEFAULT_SEED
) -> list[SampleModel]:
    """Build the named samples (all by default) into ``out_dir`` and update its ``index.json``.

    Entries of samples built earlier into the same folder are kept, so ``names`` can rebuild one.
    """
    chosen = list(SAMPLES) if names is None else [_spec(name).name for name in names]
    split = load_digits_split(seed)
    index = _read_index(out_dir / INDEX_FILE)
    built = []
    for name in chosen:
        sample = build(name, quick=quick, seed=seed, split=split)
        write_sample(out_dir, sample)
        index[name] = index_entry(sample)
        built.append(sample)
    ordered = [index[name] for name in SAMPLES if name in index]
    document = json.dumps({"models": ordered}, indent=2) + "\n"
    write_file_atomic(out_dir / INDEX_FILE, document.encode("utf-8"))
    return built
