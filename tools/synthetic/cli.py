"""The command line of `synthetic.py`: flags -> the world's sizes (a preset and the flags that override it) ->
`tools.synthetic.world.generate_world`, and what it wrote."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from interrupts import install_signal_handlers
from tools.synthetic.world import (
    NUM_SHARED_BUILDINGS,
    PRESETS,
    SHARED_FRACTION,
    SPLITS,
    check_contact_sheet_path,
    check_destination,
    check_repetition_arguments,
    check_world_arguments,
    generate_world,
    make_contact_sheet,
    world_settings,
)


def _preset_help(key: str) -> str:
    """'(default: 384 384; tiny: 96 96)': what each preset sets ``key`` to."""
    values = {name: sizes[key] for name, sizes in PRESETS.items()}
    text = {name: " ".join(map(str, v)) if isinstance(v, tuple) else str(v) for name, v in values.items()}
    return "(" + "; ".join(f"{name}: {value}" for name, value in text.items()) + ")"


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of `main`; the size flags default to the values of ``--preset``."""
    parser = argparse.ArgumentParser(
        description="Generate a synthetic street-view world for visual place recognition in the visual "
        "geo-localization benchmark layout: <out>/<name>/images/{train,val,test}/{database,queries}/*.jpg, plus "
        "images/<split>/homographies.json with each query's true homography onto its nearest database image.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("datasets_vg/datasets"),
        help="Folder that receives the world (default: datasets_vg/datasets).",
    )
    parser.add_argument("--name", default="synthetic", help="Folder of the world inside --out (default: synthetic).")
    parser.add_argument(
        "--seed", type=int, default=0, help="Random seed; the same seed gives byte-identical files (default: 0)."
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="Sizes to start from: 'default' (384 x 384 images, a few hundred of them) or 'tiny' (96 x 96, a few "
        "dozen, for tests). The size flags below override the preset's values (default: default).",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help=f"Image height and width in pixels, 32 to 4096 {_preset_help('image_size')}.",
    )
    parser.add_argument(
        "--database_per_split",
        type=int,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        help=f"Database images of each split, at least 2 {_preset_help('database_per_split')}.",
    )
    parser.add_argument(
        "--queries_per_split",
        type=int,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        help=f"Queries of each split, at least 1 {_preset_help('queries_per_split')}.",
    )
    parser.add_argument(
        "--images_per_street",
        type=int,
        metavar="N",
        help="Database images per street at most; a split has ceil(database / N) streets, each N * spacing metres "
        f"long {_preset_help('images_per_street')}.",
    )
    parser.add_argument(
        "--database_spacing",
        type=float,
        metavar="METRES",
        help="Metres between consecutive database images along a street, 1 to 12, so that every query has a "
        f"database image within 10 m {_preset_help('database_spacing')}.",
    )
    parser.add_argument(
        "--shared_fraction",
        type=float,
        default=SHARED_FRACTION,
        metavar="F",
        help="Fraction (0 to 1) of the buildings taken from a library that recurs all over the world, the rest being "
        "unique. Raising it (with --shared_buildings about 12) makes places that only the arrangement of their "
        f"facades tells apart: hard for a global descriptor, not for geometry (default: {SHARED_FRACTION}).",
    )
    parser.add_argument(
        "--shared_buildings",
        type=int,
        default=NUM_SHARED_BUILDINGS,
        metavar="N",
        help=f"Buildings in that library, 1 to 1000 (default: {NUM_SHARED_BUILDINGS}).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing <out>/<name> that synthetic.py wrote, with nothing else in it (default: refuse).",
    )
    parser.add_argument(
        "--contact_sheet",
        type=Path,
        default=None,
        metavar="PNG",
        help="Also save a PNG of a few test queries next to their nearest database images (default: none).",
    )
    return parser


def _sizes(args: argparse.Namespace) -> dict:
    """The world's sizes: the preset's, with the flags given on the command line instead."""
    sizes = dict(PRESETS[args.preset])
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = tuple(getattr(args, key)) if isinstance(sizes[key], tuple) else getattr(args, key)
    return sizes


def settings_of_flags(argv: Sequence[str]) -> dict:
    """The `world_settings` of the world that ``synthetic.py argv`` writes (to recognise it, e.g. in demo.py)."""
    args = build_parser().parse_args(argv)
    return world_settings(
        seed=args.seed,
        shared_fraction=args.shared_fraction,
        num_shared_buildings=args.shared_buildings,
        **_sizes(args),
    )


def main(argv: Sequence[str] | None = None) -> Path:
    """Generate the world that the flags ``argv`` describe, print its counts and the time it took; return its folder."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sizes = _sizes(args)
    try:
        check_world_arguments(**sizes)
        check_repetition_arguments(args.shared_fraction, args.shared_buildings)
        check_destination(args.out, args.name, args.overwrite)
        if args.contact_sheet is not None:
            check_contact_sheet_path(args.contact_sheet)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    start = time.perf_counter()
    # SIGTERM and SIGHUP clean up like Ctrl-C: the temporary folder is removed
    restore_signal_handlers = install_signal_handlers()
    try:
        world = generate_world(
            args.out,
            args.name,
            seed=args.seed,
            overwrite=args.overwrite,
            shared_fraction=args.shared_fraction,
            num_shared_buildings=args.shared_buildings,
            **sizes,
        )
    except OSError as error:  # another run on the same name seen once this one had started, a full disk: one line
        raise SystemExit(f"synthetic.py: {error}") from None
    finally:
        restore_signal_handlers()
    elapsed = time.perf_counter() - start
    counts = []
    for split in SPLITS:
        database = len(list((world / "images" / split / "database").glob("*.jpg")))
        queries = len(list((world / "images" / split / "queries").glob("*.jpg")))
        counts.append(f"{split} {database} database / {queries} queries")
    print(f"Wrote {world} in {elapsed:.1f} s: {', '.join(counts)}")
    if args.contact_sheet is not None:
        print(f"Contact sheet: {make_contact_sheet(world, args.contact_sheet)}")
    return world
