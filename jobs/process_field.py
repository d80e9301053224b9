"""Process a field of survey tiles: footprints -> GAN enhancement -> peaks -> forced GMM photometry.

Usage::

    python jobs/process_field.py                       # a small simulated field, local Ray, ./output/
    python jobs/process_field.py --config field.yaml --set inputs=[s3://bucket/tiles/] \\
        --set output=s3://bucket/run1 --set storage.endpoint_url=http://127.0.0.1:9000
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/process_field.py --set output=$PWD/output   # README "On a Ray cluster"
    # "python" is the one on the PATH of the shell that started Ray (the venv with galgan_ray installed);
    # under ray job submit the output must be absolute or a URL (a relative one is refused)

With no arguments it runs the embedded default (galgan_ray/data/field_default.yaml): a simulated
HSC-like field of 2 x 2 overlapping ~40" tiles, processed on a local Ray instance (2 CPUs) with the
shipped model. Under ``ray job submit`` (RAY_ADDRESS set) it joins the running cluster. Rerunning
the same command skips committed tiles. Progress: Ray Data's bars on a terminal, its log lines
otherwise (``ray job logs``); ``-q`` turns both off.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(argv: list[str] | None = None) -> int:
    # Imports here, not at the top: a job script sets its environment (above) before Ray is imported.
    try:
        from galgan_ray.commands._common import add_config_arguments, config_from_args
        from galgan_ray.errors import InputError
        from galgan_ray.progress import set_progress
        from galgan_ray.ray_shell.job import FieldJobConfig, run_field
    except ImportError as exc:  # e.g. `ray job submit ... -- python` found a Python without galgan-ray
        print(f"error: {sys.executable} cannot import galgan_ray's stack ({exc}); run the job with the Python "
              f"where galgan-ray is installed (under `ray job submit`: start Ray from that environment, e.g. "
              f"`. .venv/bin/activate` before `ray start --head`)", file=sys.stderr)
        return 2

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(p, what="job", default="field_default.yaml")
    p.add_argument("--input", action="append", default=[], metavar="URL", help="tile URL(s); same as --set inputs=[...]")
    p.add_argument("--output", metavar="URL", help="output URL; same as --set output=URL")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress log lines")
    args = p.parse_args(argv)
    if args.quiet:
        set_progress(False)
    overrides = []
    if args.input:
        overrides.append("inputs=[" + ",".join(repr(u) for u in args.input) + "]")
    if args.output:
        overrides.append(f"output={args.output!r}")
    try:
        args.overrides += overrides  # --input / --output win over --set, as they always have
        config = config_from_args(FieldJobConfig, args)
        summary = run_field(config)
    except InputError as exc:
        hint = ("\n(the field job takes a model with --set checkpoint=PATH_OR_URL)"
                if "model" in str(exc) or "checkpoint" in str(exc) else "")
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
    return 0 if summary["tiles"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
