"""Turn a folder of your own photos and a CSV of their positions into a dataset in the VG layout for `eval.py`.

    python make_vg_dataset.py --photos my_photos --csv my_photos.csv --out datasets_vg/datasets --name my_street
    python eval.py --datasets_folder datasets_vg/datasets --dataset_name my_street --resume_fe ... --resume_hr ...

The CSV's columns, the names written and the safety of --overwrite: see `tools.make_vg_dataset`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from interrupts import Interrupted, install_signal_handlers
from tools import vg_names
from tools.make_vg_dataset import ROLES, make_vg_dataset


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of `main`."""
    parser = argparse.ArgumentParser(
        description="Make a dataset in the VG layout (<out>/<name>/images/<split>/{database,queries}/, positions in "
        "the file names) from a folder of photos and a CSV of their positions, for eval.py. CSV header: "
        "path,role,lat,lon (WGS84 degrees) or path,role,easting,northing,zone,band (UTM; hemisphere N/S may replace "
        "band); role is database or queries; optional columns heading, timestamp.",
    )
    parser.add_argument("--photos", type=Path, required=True, help="Folder of the photos (the CSV's paths start here).")
    parser.add_argument("--csv", type=Path, required=True, help="The CSV of the photos' roles and positions.")
    parser.add_argument(
        "--out", type=Path, default=Path("datasets_vg/datasets"), help="Datasets folder (eval.py's --datasets_folder)."
    )
    parser.add_argument("--name", required=True, help="Dataset name (eval.py's --dataset_name).")
    parser.add_argument("--split", default="test", help="Split folder; eval.py evaluates 'test' (default: test).")
    parser.add_argument(
        "--zone",
        type=int,
        default=None,
        help="UTM zone (1-60) of every photo (default: the zone of the median position).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing <out>/<name> that make_vg_dataset.py wrote, with nothing else in it.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Make the dataset the flags describe, print what was written; return its folder."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.zone is not None and not 1 <= args.zone <= 60:
        parser.error(f"--zone {args.zone}: must be from 1 to 60")
    # SIGTERM and SIGHUP clean up like Ctrl-C: the temporary folder is removed
    restore_signal_handlers = install_signal_handlers()
    try:
        folder = make_vg_dataset(args.photos, args.csv, args.out, args.name, args.split, args.zone, args.overwrite)
    except (ValueError, OSError) as error:  # a bad row, photo or destination: one line, no traceback
        raise SystemExit(f"make_vg_dataset.py: {error}") from None
    finally:
        restore_signal_handlers()
    names = {role: sorted(os.listdir(folder / "images" / args.split / role)) for role in ROLES}
    zone = vg_names.parse_field(names["database"][0], "utm_zone")
    print(f"Wrote {folder}: {len(names['database'])} database photos, {len(names['queries'])} queries, UTM zone {zone}")
    print(
        f"Evaluate with: python eval.py --datasets_folder {args.out} --dataset_name {args.name} "
        "--resume_fe ... --resume_hr ..."
    )
    return folder


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Interrupted as interrupted:
        sys.exit(128 + interrupted.signum)  # the shell's convention for a process ended by a signal
    except KeyboardInterrupt:
        sys.exit(128 + 2)  # Ctrl-C (SIGINT)
