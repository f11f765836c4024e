"""A second process that streams memory, to measure how the CPU route degrades under contention.

    python -m bench.stream --seconds 600 --mib 256 &   # then run bench.run / bench.cpu_passes meanwhile

One thread copies a ``--mib`` MiB float32 array into another, again and again, for ``--seconds`` (the
traffic of another memory-bound job on the same machine); prints the GB/s it reached when it stops.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args(argv)
    src = np.ones(args.mib * 2**18, dtype=np.float32)
    dst = np.empty_like(src)
    copies, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        np.copyto(dst, src)
        copies += 1
    seconds = time.perf_counter() - start
    print(f"# bench.stream: {copies} copies of {args.mib} MiB in {seconds:.0f} s, "
          f"{2 * copies * args.mib * 2**20 / seconds / 1e9:.1f} GB/s read + write")


if __name__ == "__main__":
    main()
