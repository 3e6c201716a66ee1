"""Peak resident memory of a command and every process it starts, summed, and its wall time.

    python -m bench.peak_memory [--interval 0.1] -- COMMAND ...

`/usr/bin/time -v` reports the largest single process (ru_maxrss); an export that runs its torch reference in a
child needs the sum over the process tree at each instant. This samples /proc every `interval` seconds (so a
peak shorter than that can be missed; ru_maxrss of the largest process is printed beside it as a floor).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants now."""
    total, pending = 0, [pid]
    while pending:
        p = pending.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        pending += children(p)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peak_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    start = time.perf_counter()
    process = subprocess.Popen(command)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(args.interval)
    wall = time.perf_counter() - start
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"peak RSS summed over the process tree {peak / 1e9:.2f} GB; largest single process {largest / 1e9:.2f} GB; "
          f"wall {wall:.0f} s; exit {process.returncode}", file=sys.stderr)
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
