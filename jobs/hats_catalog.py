"""Write (or rewrite) a field run's committed catalog as a HATS catalog, ``OUT/hats/``, that LSDB opens.

Usage::

    python jobs/hats_catalog.py                    # the run in ./output (from jobs/process_field.py)
    python jobs/hats_catalog.py s3://bucket/run1 --endpoint-url http://127.0.0.1:9000 --max-rows 500000

The field job writes it at the end of every run; this job rebuilds it with other partition sizes,
or for a run made before the job wrote one. Then, in Python::

    import lsdb
    objects = lsdb.read_hats("output/hats")     # HEALPix-partitioned, joins other HATS catalogs
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from galgan_ray.hats_catalog import write_hats_catalog
    from galgan_ray.storage import StorageConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", default="output", help="the field run's output URL (default: output)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint of the run's store")
    p.add_argument("--max-rows", type=int, default=1_000_000, help="rows per HEALPix partition at most")
    p.add_argument("--highest-order", type=int, default=10, help="smallest partitions: this HEALPix order")
    args = p.parse_args(argv)
    info = write_hats_catalog(args.run, storage=StorageConfig(endpoint_url=args.endpoint_url),
                              max_rows=args.max_rows, highest_order=args.highest_order)
    if info is None:
        print(f"error: {args.run}: no committed catalog rows; nothing written", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
