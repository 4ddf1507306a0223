"""Train the sample models on scikit-learn's digits set and write them as ONNX, with their test data.

    python scripts/build_sample_models.py OUT_DIR [--quick] [--only NAME ...] [--seed N]

writes ``OUT_DIR/<name>.onnx``, ``OUT_DIR/<name>-data.npz`` (the held-out split: arrays ``input``
and ``labels``) and ``OUT_DIR/index.json``, and prints what was measured. Needs the ``train`` extra.
The same seed on the same machine and library versions gives byte-identical ONNX files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgefleet_core.samples import SAMPLES, build_all


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write the models into")
    parser.add_argument("--quick", action="store_true", help="train for fewer epochs (smoke runs; lower accuracy)")
    parser.add_argument(
        "--only", nargs="+", choices=list(SAMPLES), metavar="NAME", help=f"build only these: {', '.join(SAMPLES)}"
    )
    parser.add_argument("--seed", type=int, default=0, help="split, initialization and shuffle seed (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    samples = build_all(args.out_dir, quick=args.quick, names=args.only, seed=args.seed)
    table = Table(title=f"sample models in {args.out_dir}")
    table.add_column("name", no_wrap=True, min_width=max(len(name) for name in SAMPLES))
    for column in ("params", "FP32 size", "accuracy", "epochs", "train s"):
        table.add_column(column, justify="right", no_wrap=True)
    for sample in samples:
        table.add_row(
            sample.name,
            f"{sample.parameters:,}",
            f"{sample.fp32_bytes() / 1024:,.0f} KiB",
            f"{100 * sample.accuracy:.2f} %",
            str(sample.epochs),
            f"{sample.train_seconds:.1f}",
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
