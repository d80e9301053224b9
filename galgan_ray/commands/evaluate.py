"""``galgan evaluate``: the blend benchmark -- detection fractions at high, low and enhanced resolution,
false positives, baselines, Figs. 4-7 and report.json."""
from __future__ import annotations

import argparse
import json
from importlib import resources

from ..config import load_config
from ..evaluation import EvalSpec, evaluate, write_report
from ..progress import note
from ..storage import check_writable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="blend benchmark: detection fractions (high/low/enhanced), false positives, baselines, figures",
        description="Build blends from the evaluation sky (or from real stamps in GalSim RealGalaxyCatalog format), "
                    "enhance them, find peaks at every resolution, match them to the truth and write "
                    "OUT/report.json (keys detection_fraction.<row>, false_positive_rate.<row>, n_blends, ...), "
                    "OUT/table.md and Figs. 4-7.")
    p.add_argument("--model", default="default", help="SR checkpoint: 'default', 'default-7band' or a path/URL")
    p.add_argument("--compare", nargs="*", default=None, metavar="NAME=CHECKPOINT",
                   help="more enhancers as extra rows (default: the shipped twin trained with the flux-consistency "
                        "term, as enhanced_fluxcons; with --model default-7band the shipped 1-band model on the "
                        "spec's detect_band channel, as enhanced_1band)")
    p.add_argument("--spec", help="benchmark spec YAML (default: the committed benchmark_default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set n_blends=1000")
    p.add_argument("--real-galaxies", metavar="CATALOG", help="GalSim RealGalaxyCatalog file of real HST stamps")
    p.add_argument("--real-band", default="hst/F814W", help="band of the real stamps")
    p.add_argument("--no-photometry", action="store_true", help="skip the Fig. 7 photometry experiment")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--work-dir", default="runs/evaluate", help="scratch folder for the evaluation sky")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec_path = args.spec or str(resources.files("galgan_ray").joinpath("data/benchmark_default.yaml"))
    spec = load_config(EvalSpec, spec_path, args.overrides)
    check_writable(args.out, key="--out")  # a folder, before the ~6 min of work
    models = {"enhanced": args.model}
    if args.compare is None:
        from ..enhance import model_available  # here, not at the top: it imports scipy.signal (~0.5 s)

        if args.model == "default" and model_available("default-fluxcons"):
            models["enhanced_fluxcons"] = "default-fluxcons"
        if args.model == "default-7band" and model_available("default"):
            # The paired 7-band benchmark: the shipped 1-band model on the detect_band's channel.
            models["enhanced_1band"] = "default"
    else:
        for item in args.compare:
            name, _, ckpt = item.partition("=")
            models[name] = ckpt
    note(f"galgan evaluate: {spec.n_blends} blends, {len(models)} enhancer(s); the default benchmark takes "
         f"~3 min on 2 idle cores (sky and blends first, then a bar per enhancement and the baselines)")
    out = evaluate(spec, models=models, work_dir=args.work_dir, real_galaxies=args.real_galaxies,
                   real_band=args.real_band, photometry=not args.no_photometry)
    written = write_report(out, args.out)
    rep = out["report"]
    print((open(written["table"]).read()))
    summary = {"n_blends": rep["n_blends"], "written": written,
               "detection_fraction": {k: round(v["fraction"], 4) for k, v in rep["detection_fraction"].items()},
               "timing_s": {k: round(v, 1) for k, v in rep["timing"].items()}}
    if rep.get("paired"):
        summary["paired"] = rep["paired"]
    if "photometry" in rep:
        summary["photometry_headline"] = rep["photometry"]["headline"]
    if "photometry_models" in rep:
        summary["photometry_models"] = {k: {"headline": v["headline"], "all.dominant": v["all.dominant"]}
                                        for k, v in rep["photometry_models"].items()}
    print(json.dumps(summary, indent=2))
    return 0
