"""What machine a benchmark ran on, for the figures it prints."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU's model name and count, as /proc/cpuinfo gives it (platform.processor() elsewhere)."""
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as file:
            name = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs)"
