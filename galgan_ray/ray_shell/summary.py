"""The run summary of a field job: counts, throughput, outputs, failures, truth scores (simulations)."""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from ..outputs import hats_url, run_url
from ..storage import StorageConfig, open_fs, scrub_url

__all__ = ["summarise", "format_summary", "existing_outputs"]


def existing_outputs(outputs: Mapping[str, str], *, storage: StorageConfig = StorageConfig(),
                     keep: Sequence[str] = ("summary",)) -> dict[str, str]:
    """``outputs`` (name -> URL) less those that do not exist (``keep``: written after the check)."""
    out = {}
    for name, url in outputs.items():
        fs, path = open_fs(url, storage)
        if name in keep or fs.exists(path.rstrip("/")):
            out[name] = url
    return out


def summarise(config: Any, results: Sequence[Mapping[str, Any]], skipped: Sequence[Mapping[str, Any]], *,
              model_id: Mapping[str, str], wall_s: float, total_s: float, n_sources_total: int,
              sim_info: Mapping[str, Any] | None, hats: Mapping[str, Any] | None = None,
              cores: float | None = None, layout: str | None = None) -> dict[str, Any]:
    """The run summary (``OUT/summary.json``) from the commit rows of this run and the markers of the
    tiles committed before (``skipped``); keys as :func:`galgan_ray.ray_shell.job.run_field` lists.
    ``outputs`` lists only what exists under the output (``summary`` itself is written next);
    ``hats`` is :func:`galgan_ray.hats_catalog.write_hats_catalog`'s answer (None: none written).

    ``throughput.core_h_per_deg2`` is the cost of this run per area: ``cores`` (the CPUs the Ray
    instance had) x the pipeline wall time over the area of the tiles processed in this run, the
    definition ``bench/bench_field.py`` reports (per area, never scaled by catalog rows);
    ``throughput.layout`` the actor layout that ran (``compute.layout`` resolved; None: nothing ran)."""
    done = [r for r in results if r["status"] == "done"]
    failed = [r for r in results if r["status"] != "done"]
    stats_new = [json.loads(r["stats"]) for r in done]
    stats_all = stats_new + [m.get("stats", {}) for m in skipped]

    def total(stats, key):
        return int(sum(s.get(key, 0) for s in stats))

    area_new = float(sum(s.get("area_deg2", 0.0) for s in stats_new))
    n_new = total(stats_new, "n_sources")
    out = config.output.rstrip("/")
    summary: dict[str, Any] = {
        "tiles": {"total": n_sources_total, "done": len(done), "failed": len(failed), "skipped": len(skipped)},
        "sources": total(stats_all, "n_sources"),
        "sources_this_run": n_new,
        "footprints": total(stats_all, "n_footprints"),
        "newly_resolved_blends": total(stats_all, "n_newly_resolved"),
        "enhance_skipped_footprints": total(stats_all, "n_enhance_skipped"),
        "unsupported_children": total(stats_all, "n_unsupported"),
        "unsupported_kept": bool(config.field.keep_unsupported),
        "area_deg2": float(sum(s.get("area_deg2", 0.0) for s in stats_all)),
        "throughput": {"wall_s": wall_s, "total_s": total_s,
                       "sources_per_s": n_new / wall_s if wall_s > 0 else 0.0,
                       "deg2_per_hour": area_new / (wall_s / 3600.0) if wall_s > 0 else 0.0,
                       "cores": cores, "layout": layout,
                       "core_h_per_deg2": (cores * wall_s / 3600.0 / area_new) if cores and area_new > 0 else None},
        "model": model_id,
        "enhance_device": sorted({s.get("enhance_device") for s in stats_new if s.get("enhance_device")}),
        "outputs": {"catalog": f"{out}/catalog/", "summary": f"{out}/summary.json", "config": f"{out}/config.yaml",
                    "run": run_url(out)},
        "failures": [{"tileId": r["tileId"], "source": scrub_url(r["source"]), "stage": r["stage"],
                      "reason": r["reason"]} for r in failed],
        "stage_seconds": {k: float(sum(s.get("timing", {}).get(k, 0.0) for s in stats_new))
                          for k in sorted({k for s in stats_new for k in s.get("timing", {})})},
    }
    summary["outputs"]["failures"] = f"{out}/failures/"  # (listed below only where a tile failed)
    if hats and hats.get("error"):
        summary["hats"] = {"error": hats["error"]}
    elif hats:
        summary["outputs"]["hats"] = hats_url(out) + "/"
        summary["hats"] = {k: hats[k] for k in ("rows", "partitions", "max_order")}
    truths = [s["truth"] for s in stats_all if s.get("truth")]
    if truths:
        summary["outputs"].update({"truth": f"{out}/truth/", "blends": f"{out}/blends/"})
        t = {k: int(sum(x.get(k, 0) for x in truths)) for k in truths[0]}
        t["purity_radius_arcsec"] = float(config.field.truth.purity_radius_arcsec)
        summary["truth"] = t
    if sim_info:
        summary["outputs"]["input"] = f"{out}/input/"
        summary["simulation"] = sim_info
    summary["outputs"] = existing_outputs(summary["outputs"], storage=getattr(config, "storage", StorageConfig()))
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """The one-screen text of a run summary."""
    t = summary["tiles"]
    th = summary["throughput"]
    lines = [
        "=" * 78,
        "galgan-ray field run",
        f"  model      {summary['model']['path']}  (sha256 {summary['model']['sha256'][:12]}...)"
        + (f"  on {', '.join(summary['enhance_device'])}" if summary.get("enhance_device") else ""),
        f"  tiles      {t['done']} done, {t['failed']} failed, {t['skipped']} skipped (already committed)"
        f"  of {t['total']}",
        f"  sources    {summary['sources']} in {summary['footprints']} low-resolution footprints"
        f"  ({summary['area_deg2'] * 3600:.2f} arcmin^2)",
        f"  newly resolved blends  {summary['newly_resolved_blends']} footprints with <= 1 low-resolution peak "
        f"split into >= 2 by enhancement",
        f"  unsupported {summary.get('unsupported_children', 0)} enhanced children the low-resolution pixels do not "
        f"support ({'kept, flagged UNSUPPORTED' if summary.get('unsupported_kept') else 'left out of the catalog'})",
        f"  throughput {th['sources_per_s']:.1f} sources/s, {th['deg2_per_hour']:.4f} deg^2/hour "
        f"(pipeline {th['wall_s']:.1f} s, job {th['total_s']:.1f} s)"
        + (f"; cost {th['core_h_per_deg2']:.1f} core-h/deg^2 ({th['cores']:g} CPUs x pipeline wall / area; a run "
           f"this small is dominated by start-up, see bench/bench_field.py)" if th.get("core_h_per_deg2") else ""),
    ]
    if summary.get("truth"):
        tr = summary["truth"]
        n, nb = max(tr["n_scored"], 1), max(tr["n_blends"], 1)
        lines.append(f"  truth      {tr['n_scored']} scored sources found: high {tr['matched_high'] / n:.0%}, "
                     f"low {tr['matched_low'] / n:.0%}, enhanced {tr['matched_enhanced'] / n:.0%} (children, before "
                     f"the support tests), catalog {tr.get('matched_catalog', 0) / n:.0%}")
        lines.append(f"             {tr['n_blends']} close pairs, both found: high {tr['blends_found_high'] / nb:.0%}, "
                     f"low {tr['blends_found_low'] / nb:.0%}, enhanced {tr['blends_found_enhanced'] / nb:.0%}")
        if tr.get("n_catalog"):
            lines.append(f"  purity     catalog rows within {tr['purity_radius_arcsec']}\" of a true object (any magnitude): "
                         f"{tr['n_catalog_near_truth'] / tr['n_catalog']:.0%} of {tr['n_catalog']}; "
                         f"low-resolution peaks {tr['n_low_near_truth'] / max(tr['n_low_peaks'], 1):.0%} "
                         f"of {tr['n_low_peaks']}")
    if summary.get("hats", {}).get("error"):
        lines.append(f"  HATS       not written: {summary['hats']['error'][:160]}")
    elif summary.get("hats"):
        lines.append(f"  HATS       {summary['hats']['rows']} rows in {summary['hats']['partitions']} HEALPix "
                     f"partition(s): lsdb.read_hats(\"{summary['outputs'].get('hats', '')}\")")
    for f in summary.get("failures", [])[:5]:
        lines.append(f"  FAILED     tile {f['tileId']} at {f['stage']}: {f['reason'][:160]}")
    if len(summary.get("failures", [])) > 5:
        lines.append(f"  ... and {len(summary['failures']) - 5} more in "
                     f"{summary['outputs'].get('failures', 'the summary (failures)')}")
    lines.append("  outputs")
    for k, v in summary["outputs"].items():
        lines.append(f"    {k:<9}{v}")
    lines.append("=" * 78)
    return "\n".join(lines)
