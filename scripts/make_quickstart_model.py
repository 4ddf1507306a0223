"""Train the quickstart's small digits CNN and pin its sha256 in the quickstart EdgeModel.

    python scripts/make_quickstart_model.py [--examples DIR] [--epochs N] [--seed N] [--check]

writes ``DIR/models/digits-small-cnn.onnx`` and ``DIR/models/digits-small-cnn-data.npz`` (the
held-out digits split: arrays ``input`` and ``labels``), then rewrites the two ``sha256:`` lines of
``DIR/edgemodel-digits.yaml`` that follow the ``uri:`` of those files, so ``edgefleet up -f DIR``
verifies exactly these bytes. ``--check`` writes nothing and exits 1 when a pinned digest differs
from its file. Needs the ``train`` extra. The same seed on the same machine and library versions
gives a byte-identical model (and so the same digest).

The model is a smaller sibling of the ``digits-cnn`` sample (channels 8/16/32 instead of 32/64/128),
so that it can live in the repository (it must stay under :data:`MAX_MODEL_BYTES`) and the
pipeline optimizes it in seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[1]
MODEL_FILE: Final = "models/digits-small-cnn.onnx"
DATA_FILE: Final = "models/digits-small-cnn-data.npz"
EDGE_MODEL_FILE: Final = "edgemodel-digits.yaml"
MAX_MODEL_BYTES: Final = 300 * 1024
"""A model larger than this does not belong in the repository."""
NAME: Final = "digits-small-cnn"
DESCRIPTION: Final = (
    "Small CNN on 8x8 digits for the quickstart: 3x (Conv3x3+BatchNormalization+Relu) 8/16/32, MaxPool, "
    "Conv3x3 32+Relu, GlobalAveragePool, Gemm 32->10. BatchNormalization is left unfused."
)
DEFAULT_EPOCHS: Final = 12
LEARNING_RATE: Final = 1e-2


def _pinned_line(relative: str) -> re.Pattern[str]:
    """The ``sha256:`` line right after ``uri: file://./<relative>`` (group 1 keeps everything before the digest)."""
    return re.compile(rf"(uri:\s*file://\./{re.escape(relative)}\s*\n\s*sha256:\s*)([0-9a-f]{{64}})")


def pinned_digests(document: str) -> dict[str, str]:
    """The sha256 the EdgeModel pins for the model and the data file, by relative path."""
    found: dict[str, str] = {}
    for relative in (MODEL_FILE, DATA_FILE):
        matches = _pinned_line(relative).findall(document)
        if len(matches) != 1:
            raise ValueError(f"expected one `uri: file://./{relative}` followed by `sha256:`, found {len(matches)}")
        found[relative] = matches[0][1]
    return found


def pin(document: str, digests: dict[str, str]) -> str:
    """``document`` with the digest after each file's ``uri:`` replaced; comments and layout untouched."""
    pinned_digests(document)  # both lines present exactly once
    for relative, digest in digests.items():
        document = _pinned_line(relative).sub(rf"\g<1>{digest}", document)
    return document


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(examples: Path) -> list[str]:
    """What differs between the pinned digests and the files (empty when all match)."""
    pinned = pinned_digests((examples / EDGE_MODEL_FILE).read_text(encoding="utf-8"))
    problems = []
    for relative, digest in pinned.items():
        path = examples / relative
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif (actual := _sha256(path)) != digest:
            problems.append(f"{path}: the file's sha256 is {actual}, {EDGE_MODEL_FILE} pins {digest}")
    return problems


def build(examples: Path, *, epochs: int, seed: int) -> None:
    """Train, write the model and data atomically, pin their digests."""
    # The train extra (torch, scikit-learn) is only needed here, not by --check.
    from edgefleet_core.atomic import write_file_atomic  # noqa: PLC0415
    from edgefleet_core.optimize.model_io import serialize  # noqa: PLC0415
    from edgefleet_core.samples.architectures import PlainCNN, plain_cnn_onnx  # noqa: PLC0415
    from edgefleet_core.samples.digits import DigitsSubset, Images, npz_bytes  # noqa: PLC0415
    from edgefleet_core.samples.models import SampleSpec, train_sample  # noqa: PLC0415

    def images(subset: DigitsSubset) -> Images:
        return subset.images

    def small_cnn() -> PlainCNN:
        return PlainCNN((8, 16, 32), 32, batch_norm=True)

    spec = SampleSpec(
        NAME,
        DESCRIPTION,
        small_cnn,
        plain_cnn_onnx,
        images,
        epochs=epochs,
        quick_epochs=epochs,
        learning_rate=LEARNING_RATE,
    )
    sample = train_sample(spec, epochs, seed=seed)
    model = serialize(sample.model)
    if len(model) > MAX_MODEL_BYTES:
        raise SystemExit(f"error: the model is {len(model)} bytes, over {MAX_MODEL_BYTES}: not for the repository")
    document_path = examples / EDGE_MODEL_FILE
    document = document_path.read_text(encoding="utf-8")
    data = npz_bytes(sample.test_inputs, sample.test_labels)
    digests = {MODEL_FILE: hashlib.sha256(model).hexdigest(), DATA_FILE: hashlib.sha256(data).hexdigest()}
    updated = pin(document, digests)  # refuses a document without the two lines before anything is written
    write_file_atomic(examples / MODEL_FILE, model)
    write_file_atomic(examples / DATA_FILE, data)
    write_file_atomic(document_path, updated.encode("utf-8"))
    print(
        f"{NAME}: {sample.parameters:,} parameters, {len(model) / 1024:.0f} KiB, "
        f"top-1 {100 * sample.accuracy:.2f} % on {len(sample.test_labels)} held-out digits, "
        f"{epochs} epochs in {sample.train_seconds:.1f} s"
    )
    for relative, digest in digests.items():
        print(f"{examples / relative}  sha256 {digest}")
    print(f"pinned both in {document_path}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--examples", type=Path, default=ROOT / "examples", help="the examples folder (default: the repository's)"
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0, help="split, initialization and shuffle seed (default 0)")
    parser.add_argument("--check", action="store_true", help="only check the pinned digests against the files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.check:
            problems = check(args.examples)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            if not problems:
                print(f"{args.examples / EDGE_MODEL_FILE} pins the files' digests")
            return 1 if problems else 0
        build(args.examples, epochs=args.epochs, seed=args.seed)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
