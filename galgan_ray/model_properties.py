"""Properties a super-resolution model must have to be trusted, measured on an :class:`~galgan_ray.enhance.Enhancer`.

An enhancer that has learned where galaxies sit in its training cutouts draws one there whatever the
input says. These measures expose such a model; ``tests/test_model_properties.py`` holds the shipped
checkpoints to them and ``bench/model_properties.py`` prints them. All fluxes are in units of the LR
noise sigma per HR pixel (``sigma_lr / factor**2``, the flux scale of the output).

- :func:`zero_response`: nothing in, nothing out (the largest output pixel from an all-zero input);
- :func:`positional_bias`: pure noise in (sigma 1, many draws of one cutout size), the per-pixel mean
  of the output against its per-pixel scatter: a position prior shows as a mean that is not flat;
- :func:`shift_error`: a shifted input gives a shifted output (translation equivariance, away from
  the edges);
- :func:`window_error`: a whole image enhanced in overlapping windows equals one forward pass;
- :func:`noise_pattern`: the mean of a few enhanced pure-noise images (``galgan enhance``'s path, with
  or without its support gate) has the scatter of independent noise and no fixed pattern (dots at a
  tile stride, seams, noise peaks painted into sources).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .enhance import Enhancer, enhance_image, gate_enhanced
from .geometry import make_tan_wcs
from .support_map import SupportConfig

__all__ = ["NOISE_PATTERN_BRIGHTEST_MAX", "NOISE_PATTERN_RATIO_MAX", "PositionalBias", "galaxy_field",
           "noise_pattern", "noise_pattern_means", "noise_pattern_passes", "noise_pattern_scores",
           "positional_bias", "shift_error", "window_error", "zero_response"]

#: The trust issue's fixed-pattern check (``../shared/tools/noise_pattern.py``): the mean of the enhanced
#: noise images scatters less than this many times independent noise's ...
NOISE_PATTERN_RATIO_MAX = 1.3
#: ... and no pixel of it stands above this many times that scatter.
NOISE_PATTERN_BRIGHTEST_MAX = 8.0


def zero_response(enhancer: Enhancer, *, size: int = 22, plane_px: int = 60) -> float:
    """The largest output pixel (sigma per HR pixel) from an all-zero input: cutouts and a plane."""
    c = enhancer.n_bands
    out = enhancer.enhance_cutouts(np.zeros((1, c, size, size), np.float32), np.ones((1, c), np.float32))
    worst = float(np.abs(out).max())
    if c == 1:
        worst = max(worst, float(np.abs(enhancer.enhance_plane(np.zeros((plane_px, plane_px), np.float32), 1.0)).max()))
    return worst * enhancer.factor**2


@dataclass(frozen=True)
class PositionalBias:
    """The mean of ``n_draws`` enhanced pure-noise cutouts of one band, against its scatter.

    Attributes
    ----------
    band : str
    max_inner : float
        The largest ``|mean - mean over the cutout|`` over the per-pixel scatter, inside the cutout's
        outermost LR pixel.
    max_ring : float
        Its largest value on that ring (where the network sees its zero padding).
    z_interior : float
        The largest deviation of the mean from flat, in standard errors of the mean, 6 LR px or more
        from the edges.
    centre_z : float
        The mean of the central 16x16 HR pixels against the interior's, in standard errors: a
        source painted at the centre.
    n_draws : int
    """

    band: str
    max_inner: float
    max_ring: float
    z_interior: float
    centre_z: float
    n_draws: int


def positional_bias(enhancer: Enhancer, *, n_draws: int = 256, size: int = 22, seed: int = 7) -> list[PositionalBias]:
    """:class:`PositionalBias` of every band, from ``n_draws`` cutouts of unit white noise (module docstring)."""
    c, f = enhancer.n_bands, enhancer.factor
    rng = np.random.default_rng(seed)
    lr = rng.normal(0.0, 1.0, (n_draws, c, size, size)).astype(np.float32)
    out = enhancer.enhance_cutouts(lr, np.ones((n_draws, c), np.float32)).astype(np.float64)
    n_hr = out.shape[-1]
    edge, inner = f, slice(6 * f, n_hr - 6 * f)
    half = n_hr // 2
    centre = slice(half - 8, half + 8)
    n_centre = 16 * 16
    res = []
    for b in range(c):
        mean, scatter = out[:, b].mean(axis=0), out[:, b].std(axis=0, ddof=1)
        bias = np.abs(mean - mean.mean())
        ratio = bias / scatter
        z = bias[inner, inner] / (scatter[inner, inner] / np.sqrt(n_draws))
        offset = mean[centre, centre].mean() - mean[inner, inner].mean()
        # the central box's mean: n_centre pixels of n_draws draws, one in 16 counted as independent
        err = scatter[inner, inner].mean() / np.sqrt(n_draws * n_centre / 16)
        res.append(PositionalBias(band=str(enhancer.band_keys_low[b]),
                                  max_inner=float(ratio[edge:-edge, edge:-edge].max()), max_ring=float(ratio.max()),
                                  z_interior=float(z.max()), centre_z=float(offset / err), n_draws=n_draws))
    return res


def galaxy_field(n: int, seed: int) -> np.ndarray:
    """An LR image (sigma 1 noise) with 12 exponential-ish blobs of S/N 20-200 at random positions, 36 px
    or more from the edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    img = rng.normal(0.0, 1.0, (n, n))
    for _ in range(12):
        x0, y0 = rng.uniform(36, n - 36, 2)
        r = np.hypot(xx - x0, yy - y0)
        img += rng.uniform(2, 20) * np.exp(-r / rng.uniform(0.8, 2.0))
    return img.astype(np.float32)


def shift_error(enhancer: Enhancer, k: int, *, size: int = 120, reach_lr_px: int = 34) -> float:
    """Shift the input of a :func:`galaxy_field` by ``k`` LR px: the largest difference of the outputs after
    shifting by ``factor * k`` HR px, ``reach_lr_px`` or more from the edges (beyond the network's
    reach), as a fraction of the output's peak. Exact up to float noise for ``k`` a multiple of
    ``Enhancer.plane_step`` (the stride of the U-Net's coarsest level)."""
    f = enhancer.factor
    img = galaxy_field(size, seed=k)
    a = enhancer.enhance_plane(img[:, :-k], 1.0)
    b = enhancer.enhance_plane(img[:, k:], 1.0)
    m = f * reach_lr_px
    diff = np.abs(a[m:-m, f * k + m:-m] - b[m:-m, m:-(f * k + m)])
    return float(diff.max() / a.max())


def window_error(enhancer: Enhancer, *, size: int = 150, window_px: int = 40, halo_px: int = 32) -> float:
    """Windowed inference (``window_px`` windows with ``halo_px`` halos) against one whole-image pass:
    the largest difference as a fraction of the peak."""
    img = galaxy_field(size, seed=11)
    windowed = enhancer.enhance_plane(img, 1.0, window_px=window_px, halo_px=halo_px)
    whole = enhancer.enhance_whole(img, 1.0)
    if windowed.shape != whole.shape:
        raise ValueError(f"windowed {windowed.shape} and whole {whole.shape} outputs differ in shape")
    return float(np.abs(windowed - whole).max() / np.abs(whole).max())


def noise_pattern(enhancer: Enhancer, *, n_images: int = 6, size: int = 150, seed: int = 20261202,
                  pixel_scale_arcsec: float = 0.168, psf_fwhm_arcsec: float | None = 0.6,
                  support: SupportConfig | None = SupportConfig()) -> tuple[float, float]:
    """The mean of ``n_images`` enhanced pure-noise images (:func:`galgan_ray.enhance.enhance_image`, an
    HSC-like 0.168"/px grid), 10% cut from each side: ``(its pixel scatter, its largest |pixel|)``,
    both over what independent noise gives (the mean single-image scatter / sqrt(n_images)).

    The defaults are ``../shared/tools/noise_pattern.py``'s draw: ``size`` x ``size`` float32 images of
    unit white noise from ``default_rng(seed)``, enhanced with a Moffat (beta 3.5) PSF of
    ``psf_fwhm_arcsec`` on a 41x41 grid at the image's scale (``None``: no PSF given). Other seeds and
    sizes draw other noise: ``bench/model_properties.py`` measures several, since one draw's brightest
    pixel is that of the one noise peak the model paints brightest.

    ``support``: :func:`galgan_ray.enhance.enhance_image`'s support gate, as ``galgan enhance`` applies it
    (default); ``None`` measures the model's own output everywhere (the model property: how bright a
    source it paints on a noise peak)."""
    means = noise_pattern_means(enhancer, n_images=n_images, size=size, seed=seed,
                                pixel_scale_arcsec=pixel_scale_arcsec, psf_fwhm_arcsec=psf_fwhm_arcsec,
                                support=support)
    return noise_pattern_scores(*means["raw" if support is None else "gated"])


def noise_pattern_scores(mean: np.ndarray, expect: float) -> tuple[float, float]:
    """``(scatter, largest |pixel|)`` of a mean image over the scatter independent noise gives it."""
    return float(mean.std() / expect), float(np.abs(mean).max() / expect)


def noise_pattern_means(enhancer: Enhancer, *, n_images: int = 6, size: int = 150, seed: int = 20261202,
                        pixel_scale_arcsec: float = 0.168, psf_fwhm_arcsec: float | None = 0.6,
                        support: SupportConfig | None = SupportConfig()) -> dict[str, tuple[np.ndarray, float]]:
    """:func:`noise_pattern`'s mean image (10% cut from each side) and the scatter independent noise would
    give it (the mean single-image scatter / sqrt(n_images)), ``{"raw": ..., "gated": ...}``: the model's
    output everywhere, and the same outputs through ``support``'s gate (one enhancement per image; the
    gate is what :func:`~galgan_ray.enhance.enhance_image` applies; ``support=None``: ``raw`` only).
    The same arguments."""
    wcs = make_tan_wcs(150.1, 2.2, pixel_scale_arcsec=pixel_scale_arcsec, shape=(size, size))
    psf = None
    if psf_fwhm_arcsec is not None:  # sampled at pixel centres as the outside script does (not psf.py's
        yy, xx = np.mgrid[-20:21, -20:21]  # pixel-integrated galsim draw): the same input, the same pixels
        alpha = psf_fwhm_arcsec / pixel_scale_arcsec / (2 * np.sqrt(2 ** (1 / 3.5) - 1))
        psf = (1 + (xx**2 + yy**2) / alpha**2) ** -3.5
        psf = (psf / psf.sum()).astype(np.float32)
    rng = np.random.default_rng(seed)
    outs: dict[str, list[np.ndarray]] = {"raw": []} if support is None else {"raw": [], "gated": []}
    for _ in range(n_images):
        raw, _, info = enhance_image(rng.normal(0.0, 1.0, (size, size)).astype(np.float32), wcs, enhancer=enhancer,
                                     psf=psf, support=None)
        outs["raw"].append(raw)
        if support is not None:
            outs["gated"].append(gate_enhanced(raw, info["image_lr"][0], enhancer=enhancer,
                                               valid=info["footprint_lr"] > 0, sigma_lr=info["sigma_lr"],
                                               support=support)[0])
    res = {}
    for key, images in outs.items():
        st = np.stack(images).astype(np.float64)
        m = st.shape[-1] // 10
        st = st[:, m:-m, m:-m]
        res[key] = (st.mean(axis=0), float(np.mean([s.std() for s in st]) / np.sqrt(n_images)))
    return res


def noise_pattern_passes(ratio: float, brightest: float) -> bool:
    """The fixed-pattern check's verdict on one :func:`noise_pattern` draw."""
    return ratio < NOISE_PATTERN_RATIO_MAX and brightest < NOISE_PATTERN_BRIGHTEST_MAX
