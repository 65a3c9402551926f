"""What the plan's WebDataset listing costs: `sample_keys` vs a plain read of the same bytes.

The driver streams every pending tar shard once before the run (keys for resume and counts,
truncation found before Ray's reader would crash on it). This prints, per shard size, the
listing time next to the time to read the shard's bytes with pyarrow (the I/O floor), local
and on the tests' SeaweedFS S3 when ``--s3`` is given, then a final JSON line.

    .venv/bin/python bench/inputs.py [--samples 1000 4000] [--s3]
"""

from __future__ import annotations

# ruff: noqa: E402  (sys.path is fixed before the other imports)
import os
import sys

# Run as a script, bench/ is sys.path[0] and bench/select.py would shadow the stdlib `select`.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.io.webdataset import sample_keys
from tests.input_helpers import ASSETS, sample, write_shard


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _read_all(fs: pafs.FileSystem, path: str) -> None:
    with fs.open_input_stream(path, buffer_size=8 << 20) as f:  # as sample_keys reads
        while f.read(1 << 20):
            pass


def measure(fs: pafs.FileSystem, path: str, where: str, samples: int, mb: float) -> dict:
    keys = sample_keys(fs, path)
    assert len(keys) == samples
    listing, floor = _best(lambda: sample_keys(fs, path)), _best(lambda: _read_all(fs, path))
    return {
        "where": where,
        "samples": samples,
        "MB": round(mb, 1),
        "list_s": round(listing, 3),
        "read_s": round(floor, 3),
        "ratio": round(listing / floor, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--s3", action="store_true", help="also on a SeaweedFS S3 on loopback")
    args = parser.parse_args()
    jpg = (ASSETS / "coffee.jpg").read_bytes()
    rows = []
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.s3:
            from tests.s3server import apply_env, start_s3_server

            server = start_s3_server()
            apply_env(server)
            server.create_bucket("bench")
        for n in args.samples:
            shard = Path(tmp) / f"{n}.tar"
            data = write_shard(shard, [sample(f"{i:09d}", jpg, {"q": "x"}, "c") for i in range(n)])
            mb = len(data) / 1e6
            rows.append(measure(pafs.LocalFileSystem(), str(shard), "local", n, mb))
            if server is not None:
                server.client().upload_file(str(shard), "bench", shard.name)
                s3 = pafs.S3FileSystem(endpoint_override=server.endpoint)
                rows.append(measure(s3, f"bench/{shard.name}", "s3", n, mb))
    if server is not None:
        server.stop()
    print("| where | samples | MB | listing s | read s | listing / read |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['where']} | {r['samples']} | {r['MB']} | {r['list_s']} | {r['read_s']} "
            f"| {r['ratio']}x |"
        )
    print(json.dumps({"bench": "inputs_listing", "rows": rows}))


if __name__ == "__main__":
    main()
