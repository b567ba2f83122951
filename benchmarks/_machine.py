"""The machine a benchmark table was measured on: ``lscpu``'s model name and flags, cores, Python."""

from __future__ import annotations

import os
import platform
import subprocess

__all__ = ["machine_lines"]


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
