"""Reproducible training of the sample modules, and their accuracy as ONNX Runtime measures it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
import torch
from torch import nn
from torch.nn import functional

from edgefleet_core.optimize.runtime import session


@dataclass(frozen=True)
class TrainingSettings:
    """How one sample module is trained: AdamW with a one-cycle learning-rate schedule."""

    epochs: int
    """Passes over the training split; 0 leaves the module as initialized."""
    learning_rate: float = 2e-3
    """Peak learning rate of the one-cycle schedule."""
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0
    """Seeds the weight initialization and the shuffle of every epoch."""


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Run the body seeded, on one thread, with deterministic kernels; restore all three after.

    One thread because the order of floating-point reductions (and so the trained bytes) depends
    on how work is split between threads, and because the build machines are small and shared.
    The global random state is forked, so callers' own random streams are not disturbed.
    """
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)
            torch.set_num_threads(threads)


def fit(
    module: nn.Module, inputs: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], settings: TrainingSettings
) -> float:
    """Train ``module`` in place with cross-entropy; returns the seconds it took. Call inside :func:`deterministic`.

    The module is left in evaluation mode (BatchNorm uses its running statistics).
    """
    started = time.perf_counter()
    features = torch.from_numpy(inputs)
    targets = torch.from_numpy(labels)
    count = int(targets.shape[0])
    steps_per_epoch = -(-count // settings.batch_size)
    if settings.epochs > 0:
        optimizer = torch.optim.AdamW(
            module.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=settings.learning_rate, total_steps=settings.epochs * steps_per_epoch
        )
        shuffle = torch.Generator().manual_seed(settings.seed)
        module.train()
        for _ in range(settings.epochs):
            order = torch.randperm(count, generator=shuffle)
            for start in range(0, count, settings.batch_size):
                batch = order[start : start + settings.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = functional.cross_entropy(module(features[batch]), targets[batch])
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                schedule.step()
    module.eval()
    return time.perf_counter() - started


def torch_logits(module: nn.Module, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``module``'s outputs for ``inputs`` in evaluation mode, as a NumPy array."""
    module.eval()
    with torch.no_grad():
        result: npt.NDArray[np.float32] = module(torch.from_numpy(inputs)).numpy()
    return result


def onnx_logits(
    model: onnx.ModelProto, inputs: npt.NDArray[np.float32], batch_size: int = 256
) -> npt.NDArray[np.float32]:
    """The model's ``logits`` for ``inputs`` (fed to its ``input``) as ONNX Runtime computes them on the CPU."""
    runner = session(model)
    parts = [
        runner.run(["logits"], {"input": inputs[start : start + batch_size]})[0]
        for start in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(parts).astype(np.float32, copy=False)


def onnx_accuracy(model: onnx.ModelProto, inputs: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]) -> float:
    """Top-1 accuracy (a fraction, 0..1) of the model on ``inputs`` as ONNX Runtime computes it."""
    predicted = onnx_logits(model, inputs).argmax(axis=1)
    return float(np.mean(predicted == labels))
