"""Benchmark the batched Gaussian-mixture photometry: time per source, and a per-cutout scipy loop.

Draws two-galaxy blends with GalSim (exponentials, HSC i-like: 0.6" Moffat PSF, 0.18"/px, 22x22 px,
HSC-Wide sky noise), fits every blend with :func:`galgan_ray.photometry.fit_fluxes` (all cutouts
at once, both sources of a cutout together), and, as a reference, fits a subset one cutout at a
time with ``scipy.optimize.least_squares`` on the same Gaussian-mixture model (rendered with
numpy through :mod:`galgan_ray.gmm`, finite-difference Jacobian). Also measures the same blends
with template photometry (:mod:`galgan_ray.templates`, the catalog's ``templateFlux``), its prior the
same blends drawn at HST-like resolution (F775W PSF, 0.06"/px, HST noise). Prints time per source
for each, their ratios (a ``summary:`` line with template / GMM time per source, measured in this one
run: the two timed ``--repeat`` times in turn, the best of each), and the flux pulls (fitted - true) / error.

    .venv/bin/python bench/bench_photometry.py [--n-blends 1000] [--n-ref 40] [--threads 1]
        [--dtype float64] [--batch-size 256] [--device cpu] [--mode full] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time

import galsim
import numpy as np
import torch
from scipy.optimize import least_squares

from galgan_ray.gmm import convolve, fit_psf_mixture, galaxy_mixture, render_mixture
from galgan_ray.instrument import get_band
from galgan_ray.photometry import PhotometryComputeConfig, PhotometryConfig, fit_fluxes
from galgan_ray.psf import draw_psf, psf_profile
from galgan_ray.templates import TemplateConfig, lr_operator, template_fluxes

N_PIX = 22


def make_blends(n: int, *, band, seed: int = 0, band_hr=None):
    """n GalSim two-exponential blends -> images (n, 22, 22), centres (n, 2, 2) px, fluxes (n, 2);
    with ``band_hr`` also the same blends at its resolution (n, 66, 66), the template prior."""
    rng = np.random.default_rng(seed)
    scale = band.pixel_scale_arcsec
    psf = psf_profile(band.psf)
    c = (N_PIX - 1) / 2.0
    images = np.zeros((n, N_PIX, N_PIX))
    centres = np.zeros((n, 2, 2))
    fluxes = band.flux_from_mag(rng.uniform(21.0, 24.5, size=(n, 2)))
    hr = None if band_hr is None else np.zeros((n, 3 * N_PIX, 3 * N_PIX))
    for i in range(n):
        sep = rng.uniform(0.6, 1.8)
        ang = rng.uniform(0, 2 * np.pi)
        mid = rng.uniform(-0.2, 0.2, 2)
        half = 0.5 * sep * np.array([np.cos(ang), np.sin(ang)])
        offs = [mid - half, mid + half]
        gals = []
        for j in range(2):
            e = rng.uniform(-0.3, 0.3, 2)
            gals.append(galsim.Exponential(half_light_radius=rng.uniform(0.15, 0.6), flux=fluxes[i, j])
                        .shear(e1=e[0], e2=e[1]).shift(*offs[j]))
            centres[i, j] = c + offs[j] / scale
        images[i] = galsim.Convolve(galsim.Add(gals), psf).drawImage(nx=N_PIX, ny=N_PIX, scale=scale).array
        if hr is not None:
            hr[i] = galsim.Convolve(galsim.Add(gals), psf_profile(band_hr.psf)).drawImage(
                nx=3 * N_PIX, ny=3 * N_PIX, scale=scale / 3).array
    images += rng.normal(size=images.shape) * band.sky_sigma
    if hr is not None:
        hr += rng.normal(size=hr.shape) * band_hr.sky_sigma * band_hr.to_njy
        return images, centres, fluxes, hr
    return images, centres, fluxes


def scipy_fit_one(image, centres, *, psf_mix, sigma, scale, cfg: PhotometryConfig):
    """Reference: one cutout, scipy least_squares on (flux, x, y, ln hlr, e1, e2) per source."""
    s = len(centres)
    c = (N_PIX - 1) / 2.0
    lim = cfg.allow_shift_px
    x0, lo, hi = [], [], []
    for x, y in centres:
        x0 += [image.sum() / s, x, y, np.log(cfg.hlr_init_arcsec), 0.0, 0.0]
        lo += [-np.inf, x - lim, y - lim, np.log(cfg.hlr_min_arcsec), -0.85, -0.85]
        hi += [np.inf, x + lim, y + lim, np.log(cfg.hlr_max_arcsec), 0.85, 0.85]

    def resid(p):
        model = np.zeros_like(image)
        for f, x, y, lh, e1, e2 in p.reshape(s, 6):
            e = np.hypot(e1, e2)
            if e > 0.95:
                e1, e2 = e1 * 0.95 / e, e2 * 0.95 / e
            g = galaxy_mixture(cfg.model, flux=f, hlr_arcsec=np.exp(lh), e1=e1, e2=e2,
                               centre_arcsec=((x - c) * scale, (y - c) * scale))
            model += render_mixture(convolve(g, psf_mix), shape=image.shape, pixel_scale_arcsec=scale)
        return ((image - model) / sigma).ravel()

    res = least_squares(resid, np.array(x0), bounds=(lo, hi), method="trf", x_scale="jac")
    jac = res.jac
    cov = np.linalg.pinv(jac.T @ jac)
    return res.x.reshape(s, 6)[:, 0], np.sqrt(np.diag(cov).reshape(s, 6)[:, 0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-blends", type=int, default=1000)
    ap.add_argument("--n-ref", type=int, default=40, help="cutouts fitted one at a time with scipy")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a shared 2-core machine more threads only contend)")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default=None)
    ap.add_argument("--mode", default="full", choices=["full", "round", "forced"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3,
                    help="time the GMM fit and the template solve this many times, alternating; the best of each is kept")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    band = get_band("hsc", "i")
    scale, sigma = band.pixel_scale_arcsec, band.sky_sigma
    t0 = time.perf_counter()
    psf_mix, info = fit_psf_mixture(draw_psf(band.psf, pixel_scale_arcsec=scale), n_gauss=3, pixel_scale_arcsec=scale)
    t_psf = time.perf_counter() - t0
    print(f"PSF mixture (3 Gaussians) of {band.key}: {t_psf * 1e3:.0f} ms, FWHM err {info['fwhm_rel_err']:+.2e}, "
          f"moment err {info['moment_rel_err']:.2e}, frac RMS resid {info['frac_rms']:.2e}")
    t0 = time.perf_counter()
    band_hr = get_band("hst", "F775W")
    images, centres, fluxes, prior = make_blends(args.n_blends, band=band, seed=args.seed, band_hr=band_hr)
    print(f"drew {args.n_blends} two-galaxy blends with GalSim in {time.perf_counter() - t0:.1f} s "
          f"(sky sigma {sigma:.2f} nJy/px)")

    cfg = PhotometryConfig(mode=args.mode)
    comp = PhotometryComputeConfig(device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    kw = dict(psf_mixture=psf_mix, noise_sigma=sigma, pixel_scale_arcsec=scale, config=cfg, compute=comp)
    fit_fluxes(images[:8], centres=centres[:8], **kw)  # warm-up
    if comp.device and comp.device.startswith("cuda"):
        torch.cuda.synchronize()

    def run_gmm():
        t0 = time.perf_counter()
        out = fit_fluxes(images, centres=centres, **kw)
        if comp.device and comp.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    res, t_batch = run_gmm()
    n_src = 2 * args.n_blends
    ms_batch = t_batch / n_src * 1e3
    pull = (res["flux"] - fluxes) / res["flux_err"]
    ok = res["flags"] == 0
    device = comp.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"batched fit_fluxes, first run ({args.mode}, {args.dtype}, {device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}): {t_batch:.2f} s for {n_src} sources = {ms_batch:.3f} ms/source; "
          f"LM iterations mean {res['n_iter'].mean():.1f}, max {res['n_iter'].max()}; "
          f"converged {res['converged'].mean():.3f}; unflagged {ok.mean():.3f}")
    print(f"  flux pulls (unflagged): mean {np.mean(pull[ok]):+.3f}, std {np.std(pull[ok]):.3f}; "
          f"median |flux/true - 1| {np.median(np.abs(res['flux'][ok] / fluxes[ok] - 1)):.3f}")

    # Template photometry (the field catalog's templateFlux) on the same blends, with the HST-like
    # image of the same sky as its prior: the per-source cost against the Gaussian-mixture fit.
    op = lr_operator(draw_psf(band_hr.psf, pixel_scale_arcsec=scale / 3), draw_psf(band.psf, pixel_scale_arcsec=scale),
                     factor=3)
    prior_centres = 3 * centres + 1.0
    tcfg = TemplateConfig()
    template_fluxes(images[:8], np.full(8, sigma**2), prior[:8], prior_centres[:8], pixel_scale_arcsec=scale / 3,
                    to_low_resolution=op, config=tcfg)  # warm-up

    def run_template():
        t0 = time.perf_counter()
        out = template_fluxes(images, np.full(len(images), sigma**2), prior, prior_centres,
                              pixel_scale_arcsec=scale / 3, to_low_resolution=op, config=tcfg)
        return out, time.perf_counter() - t0

    tres, t_tmpl = run_template()
    # Side by side: the two timed again in turn, the best of each kept (a shared machine's noise
    # moved single timings by +-20%).
    for _ in range(max(args.repeat, 1) - 1):
        t_batch = min(t_batch, run_gmm()[1])
        t_tmpl = min(t_tmpl, run_template()[1])
    ms_batch = t_batch / n_src * 1e3
    ms_tmpl = t_tmpl / n_src * 1e3
    tok = tres["flags"] == 0
    tpull = (tres["flux"] - fluxes) / tres["flux_err"]
    print(f"template_fluxes, best run (HST-like prior, {prior.shape[-1]}x{prior.shape[-1]} px): {t_tmpl:.2f} s for {n_src} "
          f"sources = {ms_tmpl:.3f} ms/source; unflagged {tok.mean():.3f}")
    print(f"  flux pulls (unflagged): mean {np.mean(tpull[tok]):+.3f}, std {np.std(tpull[tok]):.3f}; "
          f"median |flux/true - 1| {np.median(np.abs(tres['flux'][tok] / fluxes[tok] - 1)):.3f}")
    print(f"best of {max(args.repeat, 1)}, alternating: GMM {ms_batch:.3f} ms/source, template {ms_tmpl:.3f} ms/source")
    print(f"summary: template_ms_per_source={ms_tmpl:.3f} gmm_ms_per_source={ms_batch:.3f} "
          f"template_over_gmm_time={ms_tmpl / ms_batch:.3f}")

    if args.n_ref > 0:
        n_ref = min(args.n_ref, args.n_blends)
        t0 = time.perf_counter()
        ref = [scipy_fit_one(images[i], centres[i], psf_mix=psf_mix, sigma=sigma, scale=scale, cfg=cfg)
               for i in range(n_ref)]
        t_ref = time.perf_counter() - t0
        ms_ref = t_ref / (2 * n_ref) * 1e3
        f_ref = np.array([r[0] for r in ref])
        e_ref = np.array([r[1] for r in ref])
        d = (f_ref - res["flux"][:n_ref]) / res["flux_err"][:n_ref]
        print(f"per-cutout scipy.optimize.least_squares loop ({n_ref} cutouts): {ms_ref:.2f} ms/source; "
              f"batched is {ms_ref / ms_batch:.0f}x faster")
        print(f"  scipy vs batched fluxes: median |diff| / err {np.median(np.abs(d)):.3f}; "
              f"median err ratio {np.median(e_ref / res['flux_err'][:n_ref]):.3f}")


if __name__ == "__main__":
    main()
