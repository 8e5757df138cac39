"""Generate a procedural street-view world for visual place recognition, in the visual geo-localization benchmark
layout, with each query's true homography onto its nearest database image (see `tools.synthetic`).

Usage::

    python synthetic.py --out datasets_vg/datasets --name synthetic --seed 0
    python synthetic.py --out /tmp/worlds --name tiny --preset tiny
"""

from __future__ import annotations

import logging
import sys

from interrupts import Interrupted
from tools.synthetic.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(sys.argv[1:])
    except Interrupted as interrupted:
        sys.exit(128 + interrupted.signum)  # the shell's convention for a process ended by a signal
