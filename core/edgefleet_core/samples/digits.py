"""scikit-learn's bundled handwritten digits, split the same way every time.

1,797 real 8×8 grey-scale images of the digits 0–9 (16 intensity levels) ship inside scikit-learn,
so the sample models train on real data without a download. Images are scaled to [0, 1]; the split
is stratified, so train and test hold every class in the same proportion.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

# scikit-learn ships no type information.
from sklearn.datasets import load_digits  # type: ignore[import-untyped]
from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

from edgefleet_core.optimize.model_io import write_file_atomic

Images = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]

IMAGE_SIDE = 8
CLASSES = 10
PIXEL_LEVELS = 16.0
"""The data set's pixels are integers 0..16; dividing by this maps them to [0, 1]."""
DEFAULT_SEED = 0
DEFAULT_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsSubset:
    """Images and their true digits; the views give the layouts the sample models take."""

    images: Images
    """``[N, 1, 8, 8]`` float32 in [0, 1] (channels first, one channel)."""
    labels: Labels
    """``[N]`` int64, the digit 0..9 each image shows."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def flat(self) -> Images:
        """``[N, 64]``: each image as one feature vector, row by row (for the MLP)."""
        return self.images.reshape(len(self), IMAGE_SIDE * IMAGE_SIDE)

    def rows(self) -> Images:
        """``[N, 8, 8]``: each image as a sequence of 8 tokens (its rows) of 8 features (for the transformer)."""
        return self.images.reshape(len(self), IMAGE_SIDE, IMAGE_SIDE)


@dataclass(frozen=True)
class DigitsSplit:
    """A stratified train/test split of the digits set."""

    train: DigitsSubset
    test: DigitsSubset
    seed: int
    """The shuffle seed that produced the split."""


def load_digits_split(seed: int = DEFAULT_SEED, test_fraction: float = DEFAULT_TEST_FRACTION) -> DigitsSplit:
    """The digits set split into train and test, stratified by class, reproducible from ``seed``."""
    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / np.float32(PIXEL_LEVELS)).reshape(
        -1, 1, IMAGE_SIDE, IMAGE_SIDE
    )
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return DigitsSplit(
        train=DigitsSubset(np.ascontiguousarray(train_images), np.ascontiguousarray(train_labels)),
        test=DigitsSubset(np.ascontiguousarray(test_images), np.ascontiguousarray(test_labels)),
        seed=seed,
    )


def npz_bytes(inputs: npt.NDArray[np.generic], labels: npt.NDArray[np.generic] | None = None) -> bytes:
    """A data file in the pipeline's ``DATA.npz`` format for a model whose one input is ``input``."""
    arrays = {"input": inputs} if labels is None else {"input": inputs, "labels": labels}
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def save_npz(path: Path, inputs: npt.NDArray[np.generic], labels: npt.NDArray[np.generic] | None = None) -> None:
    """Write ``inputs`` (as ``input``) and ``labels`` to ``path`` atomically, in the ``DATA.npz`` format."""
    if labels is not None and labels.shape[0] != inputs.shape[0]:
        raise ValueError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
    write_file_atomic(path, npz_bytes(inputs, labels))
