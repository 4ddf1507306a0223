"""Sample models trained from code on real data, for the pipeline's tests, benchmark and demo.

Needs the ``train`` extra (PyTorch, scikit-learn). The models are built, never downloaded: each
architecture is a PyTorch module trained on scikit-learn's bundled handwritten digits and emitted
as an ONNX graph (opset 17) with ``onnx.helper`` from the trained weights.
"""

from edgefleet_core.samples.digits import DigitsSplit, DigitsSubset, load_digits_split, save_npz
from edgefleet_core.samples.models import (
    SAMPLES,
    SampleModel,
    build,
    build_all,
    digits_cnn,
    overparameterized_mlp,
    tiny_transformer,
    wide_cnn,
)

__all__ = [
    "SAMPLES",
    "DigitsSplit",
    "DigitsSubset",
    "SampleModel",
    "build",
    "build_all",
    "digits_cnn",
    "load_digits_split",
    "overparameterized_mlp",
    "save_npz",
    "tiny_transformer",
    "wide_cnn",
]
