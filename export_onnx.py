"""Export DHE-VPR to ONNX for deployment: the features extractor and the correlation + DHE head, two graphs.

    python export_onnx.py --resume_fe finetunedCCT14_pitts30k.torch --resume_hr finetunedDHE_pitts30k.torch \
        --resize 384 384 --out onnx_models

writes `features_extractor.onnx` and `dhe_head.onnx` into `--out`, runs both with onnxruntime (CPU) on seeded random
inputs and prints how far their outputs are from torch's. The DLT and the inlier count stay outside the graphs:
`deploy.onnx_export.rerank_from_points` (docs/onnx.md). Needs `pip install onnx onnxruntime`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import commons
import parser as flags
from deploy.onnx_export import DEFAULT_OPSET, check_exported, export_models, require_onnx

TOLERANCE = 1e-4
"""Largest relative difference (max |onnx - torch| / max |torch|) of any output that the export accepts."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export_onnx.py",
        description="Export DHE-VPR's features extractor and DHE head to ONNX (CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    flags.MODEL.add(parser)  # the model flags of eval.py, with their defaults, help and checks
    group = parser.add_argument_group("export")
    group.add_argument("--out", type=str, required=True, help="Folder for features_extractor.onnx and dhe_head.onnx.")
    group.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version (14 or later).")
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    flags.MODEL.check(args, parser)
    if args.opset < 14:
        parser.error(f"--opset {args.opset}: must be 14 or later (scaled_dot_product_attention)")
    return args


def main(args: argparse.Namespace) -> dict:
    """Export, then check with onnxruntime; returns {"paths": {...}, "differences": {...}}.

    Raises:
        MissingOnnxError: onnx or onnxruntime is not installed.
        FileNotFoundError, ValueError: a checkpoint is missing or does not fit.
        NotADirectoryError, OSError: `--out` is a file or cannot be created.
        RuntimeError: an output differs from torch's by more than `TOLERANCE`.
    """
    require_onnx()
    for flag in ("resume_fe", "resume_hr", "pretrained_cct"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--{flag} {path}: no such file")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file, not a folder")
    features_extractor, homography_regression = commons.build_models(
        flags.model_config(args), commons.resolve_device("cpu")
    )
    paths = export_models(features_extractor, homography_regression, args.out, args.opset)
    differences = check_exported(features_extractor, homography_regression, paths)
    for path in paths.values():
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")
    print(
        "onnxruntime vs torch (CPU, fp32), max relative difference: "
        + ", ".join(f"{name} {value:.1e}" for name, value in differences.items())
    )
    worst = max(differences, key=differences.get)
    if not differences[worst] <= TOLERANCE:
        raise RuntimeError(f"the ONNX {worst} differ from torch's by {differences[worst]:.2e} (> {TOLERANCE:g})")
    return {"paths": paths, "differences": differences}


def cli(argv: Sequence[str] | None = None) -> dict:
    """Parse `argv` (default: the command line) and run `main`."""
    return main(parse_arguments(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        cli()
    except (ImportError, OSError, ValueError) as error:  # what the user can fix: one line, not a traceback
        print(f"export_onnx.py: error: {error}", file=sys.stderr)
        sys.exit(1)
