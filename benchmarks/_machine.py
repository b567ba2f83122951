"""What every serving benchmark starts with: the machine its table was measured on (``lscpu``'s model name and
flags, cores, Python), and the bundle it serves."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["bundle_or_exit", "machine_lines"]


def bundle_or_exit(path: str) -> Path:
    """``path`` as a bundle folder, or exit with the fix (build the demo's, or pass ``--bundle``)."""
    bundle = Path(path)
    if not (bundle / "manifest.json").is_file():
        sys.exit(f"{bundle} is not a bundle: run 'make demo' first or pass --bundle")
    return bundle


def machine_lines() -> list[str]:
    """Lines for the top of a benchmark's output (every table states the CPU it was measured on)."""
    model, flags = platform.processor() or "unknown", ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return [
        f"machine: {model}; {os.cpu_count()} cores; Python {platform.python_version()}",
        f"cpu flags: {flags or 'unknown'}",
    ]
