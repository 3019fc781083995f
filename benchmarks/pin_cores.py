"""Run a command on N distinct physical cores of this machine: a bigger host measured as an N-core CPU.

    python benchmarks/pin_cores.py --cores 2 -- python benchmarks/bench_metrics.py --sizes 2e4 --dims 2048

The targets in BENCHMARKS.md are stated for a 2-core CPU. On a larger host (a device machine's
16-core Xeon, say) the command runs on the first N cores that share no hyperthread sibling (from
/sys/devices/system/cpu/cpu*/topology/thread_siblings_list), one per physical core, on the first
socket where it has them. Every script here reads its cores from the affinity mask (torch's and
numba's threads follow it too), so they report "N cores" and size their thread pools to N.
The chosen CPUs are printed on stderr; the command's exit status is returned.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_CPUS = Path("/sys/devices/system/cpu")


def _parse_list(text: str) -> list[int]:
    """A kernel CPU list ("0-3,8,10-11") as integers."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def physical_cores(allowed: set[int], root: Path = _CPUS) -> list[int]:
    """One CPU per physical core among `allowed`, in CPU order, first socket first (a CPU without topology
    files counts as a core of its own)."""
    chosen: list[tuple[int, int]] = []
    taken: set[int] = set()
    for cpu in sorted(allowed):
        if cpu in taken:
            continue
        topo = root / f"cpu{cpu}" / "topology"
        try:
            siblings = set(_parse_list((topo / "thread_siblings_list").read_text()))
        except (OSError, ValueError):
            siblings = {cpu}
        try:
            package = int((topo / "physical_package_id").read_text())
        except (OSError, ValueError):
            package = 0
        taken |= siblings
        chosen.append((package, cpu))
    return [cpu for _, cpu in sorted(chosen)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("pin_cores: error: give the command after --, e.g. pin_cores.py --cores 2 -- python x.py", file=sys.stderr)
        return 2
    i = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cores", type=int, default=2, help="physical cores to run on (default 2)")
    args = ap.parse_args(argv[:i])
    cmd = argv[i + 1:]
    if not cmd or args.cores < 1:
        print("pin_cores: error: need a command after -- and --cores >= 1", file=sys.stderr)
        return 2
    cores = physical_cores(set(os.sched_getaffinity(0)))
    if len(cores) < args.cores:
        print(f"pin_cores: error: this machine offers {len(cores)} physical cores, fewer than --cores {args.cores}",
              file=sys.stderr)
        return 2
    pick = cores[:args.cores]
    print(f"pin_cores: running on CPUs {pick} (one per physical core)", file=sys.stderr, flush=True)
    os.sched_setaffinity(0, pick)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"pin_cores: error: cannot run {cmd[0]!r}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
