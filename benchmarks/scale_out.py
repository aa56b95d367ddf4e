"""Memory and throughput of long-stack segmentation (out-of-core and on Dask).

1. Peak resident memory of ``revolver segment`` on a 2000 x 512 x 512 uint16 zarr stack
   (generated here) against the same for 100 slices: slices stream from the input to the
   output, so the ratio should stay near 1 (target <= 1.5).
2. Throughput of ``--scheduler local:2`` (two worker processes) against one process on the
   same stack (ratio of slices per second).

    python benchmarks/scale_out.py [--long 2000] [--short 100] [--throughput-slices 96] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_stack(path: Path, n: int, size: int) -> None:
    """A uint16 zarr stack of ``n`` slices (the demo's nuclei, repeated), one chunk per slice."""
    import zarr

    from napari_revolver.core.synthetic import sample_stack

    base, _, _, _ = sample_stack(seed=2, shape=(16, size, size))
    arr = zarr.create_array(
        str(path), shape=(n, size, size), chunks=(1, size, size), dtype="uint16", overwrite=True
    )
    for i in range(0, n, 16):
        k = min(16, n - i)
        arr[i : i + k] = base[:k]


def write_clicks(path: Path, size: int) -> None:
    from napari_revolver.core.io import PointTable, write_points
    from napari_revolver.core.synthetic import sample_stack

    _, _, pts, lab = sample_stack(seed=2, shape=(16, size, size))
    pts = pts.copy()
    pts[:, 0] = 1
    write_points(path, PointTable(pts, lab), overwrite=True)


def run_segment(image: Path, clicks: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    """Wall time and peak RSS (MiB) of one `revolver segment` in a fresh process."""
    cmd = [
        sys.executable,
        "-c",
        "import resource, sys; from napari_revolver.cli import main; code = main(sys.argv[1:]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)",
        "segment",
        str(image),
        "--points",
        str(clicks),
        "-o",
        str(out),
        "--overwrite",
        "--device",
        "cpu",
        *extra,
    ]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    peak = next(int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("PEAK"))
    return wall, peak / 1024


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--long", type=int, default=2000)
    ap.add_argument("--short", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--throughput-slices", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        clicks = d / "clicks.csv"
        write_clicks(clicks, args.size)
        for name, n in (("short", args.short), ("long", args.long)):
            make_stack(d / f"{name}.zarr", n, args.size)
            wall, peak = run_segment(d / f"{name}.zarr", clicks, d / f"{name}.out.zarr", [])
            res[f"{name}_slices"] = n
            res[f"{name}_peak_mib"] = peak
            res[f"{name}_seconds"] = wall
            print(f"{n:5d} slices: peak RSS {peak:7.0f} MiB, {wall:6.1f} s", file=sys.stderr)
        res["peak_ratio_long_vs_short"] = res["long_peak_mib"] / res["short_peak_mib"]

        n = args.throughput_slices
        make_stack(d / "tp.zarr", n, args.size)
        one, _ = run_segment(d / "tp.zarr", clicks, d / "tp1.zarr", [])
        many, _ = run_segment(
            d / "tp.zarr",
            clicks,
            d / "tp2.zarr",
            ["--scheduler", f"local:{args.workers}", "--chunk", "8"],
        )
        res["throughput_one_process"] = n / one
        res[f"throughput_local_{args.workers}"] = n / many
        res["throughput_ratio"] = one / many
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(
        f"peak memory: {res['short_slices']} slices {res['short_peak_mib']:.0f} MiB, "
        f"{res['long_slices']} slices {res['long_peak_mib']:.0f} MiB, "
        f"ratio {res['peak_ratio_long_vs_short']:.2f} (target <= 1.5)"
    )
    print(
        f"throughput ({n} slices incl. start-up): one process {res['throughput_one_process']:.1f} "
        f"slices/s, local:{args.workers} {res[f'throughput_local_{args.workers}']:.1f} slices/s, "
        f"ratio {res['throughput_ratio']:.2f}"
    )


if __name__ == "__main__":
    main()
