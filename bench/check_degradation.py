"""Print the degradation checks of the foundation issue, measured side by side in one run.

    .venv/bin/python bench/check_degradation.py

For the default HST F775W (0.06"/px) -> HSC i (0.6", 0.18"/px) operator: total flux after/before
(no noise) for a few galaxies, FWHM of a degraded point source over the target PSF's FWHM on the same
grid, and the RMS of the added noise over the band's sky sigma.
"""
from __future__ import annotations

import dataclasses

import galsim
import numpy as np

from galgan_ray.degrade import DegradeConfig, degrade
from galgan_ray.psf import draw_psf, measure_fwhm, psf_profile


def main() -> None:
    cfg = DegradeConfig()
    high, low = cfg.high[0], cfg.low[0]
    quiet = dataclasses.replace(cfg, add_noise=False)
    psf = psf_profile(high.psf)
    gals = [galsim.Exponential(half_light_radius=r, flux=1e4).shear(e1=0.3, e2=-0.1) for r in (0.1, 0.25, 0.4, 0.6)]
    hr = np.stack([galsim.Convolve(g, psf).drawImage(nx=64, ny=64, scale=high.pixel_scale_arcsec).array
                   for g in gals])[:, None].astype(np.float32)
    lr = degrade(hr, config=quiet)["image_lr"]
    ratios = lr.sum(axis=(1, 2, 3)) / hr.sum(axis=(1, 2, 3))
    point = draw_psf(high.psf, pixel_scale_arcsec=high.pixel_scale_arcsec, size=63)
    hr_pt = np.zeros((1, 1, 64, 64), np.float32)
    hr_pt[0, 0, :62, :62] = point[1:, 1:]  # at HR pixel 30: the centre of LR pixel 10
    fwhm = measure_fwhm(degrade(hr_pt, config=quiet)["image_lr"][0, 0], pixel_scale_arcsec=low.pixel_scale_arcsec)
    target = measure_fwhm(draw_psf(low.psf, pixel_scale_arcsec=low.pixel_scale_arcsec), pixel_scale_arcsec=low.pixel_scale_arcsec)
    noise = degrade(np.zeros((200, 1, 64, 64), np.float32), config=cfg, rng=np.random.default_rng(1))["image_lr"]
    print(f"flux after/before, exponentials of hlr 0.1, 0.25, 0.4, 0.6 arcsec: {', '.join(f'{r:.4f}' for r in ratios)}"
          "  (target: within 1%; a 0.6\" galaxy loses light past the 3.96\" LR cutout edge)")
    print(f"point-source FWHM {fwhm:.4f}\" / target {target:.4f}\" = {fwhm / target:.4f}  (target: within 5%)")
    print(f"noise RMS {noise.std():.4f} / sky sigma {low.sky_sigma:.4f} nJy = {noise.std() / low.sky_sigma:.4f}")


if __name__ == "__main__":
    main()
