"""Start-up time of `facerestore`: how long a command takes before (or instead of) restoring.

    python benchmarks/bench_startup.py              # 7 runs of each command
    python benchmarks/bench_startup.py --runs 11

Each command runs as the user runs it (the `facerestore` script next to this Python, in a
fresh process), once to warm the file cache and then --runs times; the table gives the median
wall-clock time (and the fastest and slowest run) and the exit code. The commands:

- `facerestore --help` and `facerestore restore --help`
- a bad path: `restore /nonexistent -o OUT` (a per-file error, exit 1)
- a bad option value: `restore IN -o OUT --batch-size zero` (exit 2)
- `restore IN -o OUT --device cuda` (on a machine without CUDA: a one-line error, exit 2)
- a rerun with nothing left to do: `restore IN -o OUT --skip-existing` after a first run wrote
  every output, IN being the bundled example photos (examples/*.jpg)

Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def facerestore() -> str:
    """The `facerestore` script of this Python's environment (else the one on PATH)."""
    script = Path(sys.executable).parent / "facerestore"
    return str(script) if script.exists() else (shutil.which("facerestore") or sys.exit("no facerestore script found"))


def machine() -> str:
    probe = "import torch; print(torch.__version__.split('+')[0], torch.cuda.is_available())"
    version, cuda = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    gpu = "CUDA" if cuda == "True" else "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()}, {gpu}, torch {version}"


def timed(cmd: list[str], runs: int) -> tuple[int, list[float]]:
    """The exit code and each run's wall-clock seconds (after one untimed warm-up run)."""
    subprocess.run(cmd, capture_output=True)
    times, code = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        code = subprocess.run(cmd, capture_output=True).returncode
        times.append(time.perf_counter() - t0)
    return code, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="Timed runs of each command (the median is reported).")
    args = ap.parse_args()
    exe = facerestore()
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in", Path(tmp) / "out"
        inp.mkdir()
        for photo in sorted(EXAMPLES.glob("*.jpg")):
            shutil.copy(photo, inp / photo.name)
        first = subprocess.run([exe, "restore", str(inp), "-o", str(out)], capture_output=True, text=True)
        if first.returncode != 0:
            sys.exit(f"the first restore run failed:\n{first.stderr}")
        cases = [
            ("`facerestore --help`", [exe, "--help"]),
            ("`facerestore restore --help`", [exe, "restore", "--help"]),
            ("bad path: `restore /nonexistent -o OUT`", [exe, "restore", "/nonexistent", "-o", str(Path(tmp) / "x")]),
            ("bad option: `restore IN -o OUT --batch-size zero`", [exe, "restore", str(inp), "-o", str(out), "--batch-size", "zero"]),
            ("`restore IN -o OUT --device cuda`", [exe, "restore", str(inp), "-o", str(out), "--device", "cuda"]),
            (
                f"rerun, nothing to do: `restore IN -o OUT --skip-existing` ({len(list(inp.iterdir()))} photos)",
                [exe, "restore", str(inp), "-o", str(out), "--skip-existing"],
            ),
        ]
        print(f"{machine()}; median of {args.runs} runs (fastest - slowest), after one warm-up run\n")
        print("| command | exit code | median s | fastest - slowest s |")
        print("|---|---|---|---|")
        for name, cmd in cases:
            code, times = timed(cmd, args.runs)
            print(f"| {name} | {code} | {statistics.median(times):.2f} | {min(times):.2f} - {max(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
