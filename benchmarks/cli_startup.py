"""How long ``roadwork help`` takes to answer, and what ``import roadwork`` pulls in.

    python benchmarks/cli_startup.py [--runs 11]

Each command runs in a fresh process (the console script, as a user types it); the table gives the median and
the spread over ``--runs`` runs, after one untimed warm-up run (file-system caches). ``python -c pass`` is the
floor: the interpreter's own start-up on this machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_lines


def _time(cmd: list[str], runs: int) -> list[float]:
    subprocess.run(cmd, capture_output=True, check=True)  # warm-up, untimed
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        out.append(time.perf_counter() - t0)
    return out


def _heavy_modules(code: str) -> str:
    probe = f"import sys; {code}; print(','.join(m for m in ('numba', 'pandas', 'pydantic', 'torch') if m in sys.modules), file=sys.stderr)"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return res.stderr.strip() or "none"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=11)
    args = parser.parse_args()
    roadwork = shutil.which("roadwork", path=str(Path(sys.executable).parent)) or "roadwork"
    rows = [
        ("python -c pass", [sys.executable, "-c", "pass"], "none"),
        (
            "roadwork help",
            [roadwork, "help"],
            _heavy_modules("from roadwork.cli import main; main(['help'])"),
        ),
        (
            "roadwork run --help",
            [roadwork, "run", "--help"],
            _heavy_modules("from roadwork.cli import main; main(['run', '--help'])"),
        ),
        (
            "python -c 'import roadwork'",
            [sys.executable, "-c", "import roadwork"],
            _heavy_modules("import roadwork"),
        ),
    ]
    for line in machine_lines():
        print(line)
    print(f"{args.runs} runs each after one warm-up; wall time of a fresh process\n")
    print(f"| {'command':<28} | {'median s':>8} | {'min s':>6} | {'max s':>6} | heavy modules loaded |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 8}|{'-' * 8}|----------------------|")
    for name, cmd, heavy in rows:
        t = _time(cmd, args.runs)
        print(
            f"| {name:<28} | {statistics.median(t):>8.3f} | {min(t):>6.3f} | {max(t):>6.3f} | {heavy:<20} |"
        )


if __name__ == "__main__":
    main()
