"""Template photometry: a higher-resolution image as the morphological prior, fluxes solved on the LR pixels.

In the spirit of TFIT / TPHOT (Laidler et al. 2007; Merlin et al. 2015), which measure ground-based
images with templates cut from space images, with the enhanced image standing in for the space one:

1. **Split the prior's light among the children** (:func:`split_light`). The prior (the enhanced
   image, or for the no-enhancement baseline the LR image itself) is smoothed, and pixels below
   ``threshold_sigma`` times the smoothed image's own sky noise (measured from its negative pixels)
   belong to no one, nor do significant islands that hold no child. Each remaining pixel is shared as the
   SDSS deblender shares it (Lupton; Bosch et al. 2018): child ``k``'s symmetric template is
   ``S_k(x) = min(P(x), P(2 c_k - x))``, the point-symmetric minimum about its centre, and the
   pixel's light goes to the children in proportion to their ``S_k``. Light no symmetric template
   covers (arms, tidal features) goes to the nearest child of its island.
2. **Bring each child's light to the LR grid** with the operator the degradation itself uses
   (PSF-matching kernel, then flux-conserving block summation: ``Degrader.noiseless``), or the
   identity for an LR prior.
3. **Solve the fluxes linearly**: ``image_lr = sum_k a_k T_k + noise`` by weighted least squares
   over the cutout (one small normal-equation solve per blend), so every child's flux is ``a_k``
   times its template's light, with the covariance ``(T^T W T)^-1``. A child with no light in the prior falls back to a PSF template at its
   position when an LR PSF is given; a flux with a variance inflation beyond ``max_vif`` (its
   template indistinguishable from a sibling's) is NaN with ``TEMPLATE_FAILED``, and the others are
   solved without it.
4. **Errors** add in quadrature: the solve's (at least its sandwich estimate from the residuals
   under each template), the noise the prior's own light carries (an enhanced image carries the LR
   image's noise; a noiseless prior none), and ``systematic_fraction`` of the flux for the
   template's misfit of the true morphology, calibrated on a sky the benchmark does not use.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal

import numpy as np
from scipy import ndimage
from scipy import fft as sp_fft

from .errors import ConfigError, InputError
from .flags import flag_bit

__all__ = ["TemplateConfig", "split_light", "solve_template_fluxes", "template_fluxes", "prior_sky_noise",
           "psf_templates", "lr_operator"]

_TEMPLATE_FAILED = flag_bit("TEMPLATE_FAILED")
_TINY = 1e-30
#: The LR operator transforms its templates in blocks of about this many bytes of spectrum.
_FFT_BLOCK_BYTES = 3 << 19


@dataclass(frozen=True)
class TemplateConfig:
    """Template photometry.

    Attributes
    ----------
    smooth_fwhm_arcsec : float
        Gaussian smoothing of the prior before the threshold (the shares use the unsmoothed prior).
    threshold_sigma : float
        Pixels of the smoothed prior below this many times its sky noise are no one's light.
    dilate_arcsec : float
        The islands of significant light that hold a child are grown by this radius: their wings,
        below the threshold, belong to them. The light shared out is the prior's, unclipped, so
        that the noise of both signs cancels in each child's sum.
    size_sigma_px : float
        A child alone in its cutout (footprint) gets a zero-flux size-correction term (its LR
        template smoothed by a Gaussian of this sigma, in LR pixels, minus the template), fitted
        beside it: the solve then follows a source sharper or broader than the prior draws it (the
        enhancer draws a star as a small galaxy: +10% flux without it). Not beside siblings, where
        the LR pixels cannot tell a broader child from light taken from its neighbour. 0: none.
    leftover : {"nearest", "drop"}
        Light of a significant pixel that no child's symmetric template covers: to the nearest
        child of its island, or to no one.
    robust_errors : bool
        Each flux variance is at least its sandwich (heteroskedasticity-consistent) estimate from the
        residuals where its template lies: a template that misfits its own pixels widens its error.
    max_vif : float
        A child whose flux variance exceeds this many times the variance it would have alone
        (its template is degenerate with its siblings') is unconstrained: NaN, ``TEMPLATE_FAILED``.
    fit_weights : bool
        Scale the symmetric templates by the weights that best add up to the prior's light before
        sharing it (the SDSS deblender's second step).
    systematic_fraction : float
        Fractional error added in quadrature for the template's misfit of the true morphology. The
        default 0.015 makes the pulls of isolated galaxies brighter than mag 24 that the enhancement
        leaves whole (one peak) unit-width (NMAD 1.00, 68% half-width 1.05), pooled over three simulated
        calibration skies (benchmark spec, ``seed=7000, 7001, 7002``: tiles disjoint from the training
        sky 1000.. and the evaluation sky 5000..) and the 100 real HST stamps of ``hst_cosmos26_f814w``,
        measured with the shipped default model by ``bench/calibrate_template_errors.py``. A galaxy the
        enhancer splits into several peaks is a deblending failure this error does not cover (the
        field job's support tests drop such shreds).
    """

    smooth_fwhm_arcsec: float = 0.3
    threshold_sigma: float = 3.0
    leftover: Literal["nearest", "drop"] = "nearest"
    robust_errors: bool = True
    max_vif: float = 1e4
    dilate_arcsec: float = 0.6
    size_sigma_px: float = 0.7
    fit_weights: bool = True
    monotonic: bool = False
    systematic_fraction: float = 0.015

    def __post_init__(self):
        if not self.smooth_fwhm_arcsec >= 0:
            raise ConfigError("templates.smooth_fwhm_arcsec", f"must be >= 0, got {self.smooth_fwhm_arcsec}")
        if not self.threshold_sigma >= 0:
            raise ConfigError("templates.threshold_sigma", f"must be >= 0, got {self.threshold_sigma}")
        if self.leftover not in ("nearest", "drop"):
            raise ConfigError("templates.leftover", f"must be nearest or drop, got {self.leftover!r}")
        if not self.systematic_fraction >= 0:
            raise ConfigError("templates.systematic_fraction", f"must be >= 0, got {self.systematic_fraction}")
        if not self.max_vif > 1:
            raise ConfigError("templates.max_vif", f"must be > 1, got {self.max_vif}")


def prior_sky_noise(images: np.ndarray) -> np.ndarray:
    """Per image, the sky noise of a background-subtracted image from its negative pixels.

    For noise symmetric about zero, the RMS of the negative pixels is the noise's standard deviation
    whatever the sources add (they add positive light). ``(N, H, W) -> (N,)``; 0 where no pixel is
    negative (a noiseless image).
    """
    a = np.asarray(images, dtype=np.float64)
    neg = np.minimum(a, 0.0)
    n_neg = (a < 0).sum(axis=(-2, -1))
    return np.sqrt((neg**2).sum(axis=(-2, -1)) / np.maximum(n_neg, 1))


def _significant(prior: np.ndarray, *, smooth_px: float, threshold: float) -> np.ndarray:
    if smooth_px > 0:
        sm = ndimage.gaussian_filter(prior, sigma=(0, smooth_px / 2.3548, smooth_px / 2.3548), mode="constant")
    else:
        sm = prior
    noise = prior_sky_noise(sm)
    return sm > threshold * noise[:, None, None]


@lru_cache(maxsize=8)
def _rings(radius: int):
    """Offsets (dy, dx) within ``radius`` (Chebyshev), by ring, each with its neighbour one step
    towards the centre."""
    out = []
    for r in range(1, radius + 1):
        dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
        on = np.maximum(np.abs(dy), np.abs(dx)) == r
        dy, dx = dy[on], dx[on]
        ny = dy - np.rint(dy / r).astype(int)
        nx = dx - np.rint(dx / r).astype(int)
        out.append((dy, dx, ny, nx))
    return tuple(out)


def _make_monotonic(templates: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """Each template made non-increasing outwards from its centre (every pixel at most its neighbour
    one step towards the centre), as the LSST/SDSS deblender's monotonic templates: a neighbour's
    light, which rises again away from the child, is cut off."""
    t = templates.copy()
    k, h, w = t.shape
    rows = np.arange(k)[:, None]
    for dy, dx, ny, nx in _rings(max(h, w)):
        y, x = cy[:, None] + dy[None], cx[:, None] + dx[None]
        yn, xn = cy[:, None] + ny[None], cx[:, None] + nx[None]
        ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        if not ok.any():
            break
        yc, xc = np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)
        inner = t[rows, np.clip(yn, 0, h - 1), np.clip(xn, 0, w - 1)]
        vals = np.minimum(t[rows, yc, xc], inner)
        t[rows[:, :1].repeat(ok.shape[1], 1)[ok], yc[ok], xc[ok]] = vals[ok]
    return t


@lru_cache(maxsize=32)
def _kernel_cached(key_hr: bytes, shape_hr: tuple[int, int], key_lr: bytes, shape_lr: tuple[int, int],
                   factor: int) -> np.ndarray:
    from .degrade import matching_kernel

    psf_hr = np.frombuffer(key_hr, dtype=np.float64).reshape(shape_hr)
    psf_lr = np.frombuffer(key_lr, dtype=np.float64).reshape(shape_lr)
    # The LR PSF image holds the LR pixel's response; brought to the HR grid it is ~ PSF (x) box. The
    # block sum applies that box again, so the kernel K must give psf_hr (x) K (x) box = that image.
    target = np.maximum(ndimage.zoom(psf_lr, factor, order=3, grid_mode=True, mode="grid-constant"), 0.0)
    size = max(shape_hr[0], target.shape[0]) | 1

    def centred(a):
        out = np.zeros((size, size))
        o = (size - a.shape[0]) // 2
        out[o:o + a.shape[0], o:o + a.shape[1]] = a
        return out / out.sum()

    src = ndimage.uniform_filter(centred(psf_hr), size=factor, mode="constant")
    return matching_kernel(centred(src), centred(target))


def lr_operator(psf_hr: np.ndarray, psf_lr: np.ndarray, *, factor: int) -> Callable[[np.ndarray], np.ndarray]:
    """The noiseless degradation of HR templates onto an aligned LR grid, for any box size.

    The templates are convolved on the HR grid with the kernel that takes ``psf_hr`` (odd, centred,
    HR grid) to ``psf_lr`` (odd, centred, LR grid; the LR pixel's response it holds is taken off,
    since the block sum applies it) -- the degradation's Fourier-ratio kernel,
    :func:`galgan_ray.degrade.matching_kernel`, cached per PSF pair -- then summed in
    ``factor x factor`` blocks (LR pixel ``i`` = HR pixels ``factor i .. factor i + factor - 1``).
    ``(M, factor h, factor w) -> (M, h, w)``, flux conserving.
    """
    a = np.ascontiguousarray(psf_hr, dtype=np.float64)
    b = np.ascontiguousarray(psf_lr, dtype=np.float64)
    kernel = _kernel_cached(a.tobytes(), a.shape, b.tobytes(), b.shape, int(factor)).astype(np.float32)
    f = int(factor)

    kh, kw = kernel.shape
    spectra: dict[tuple[int, int], np.ndarray] = {}

    def to_lr(x: np.ndarray) -> np.ndarray:
        # Real float32 FFTs of a linear ('same') convolution, 3x faster than scipy.signal.fftconvolve
        # here, and 1e-7 of the peak is far below any template's accuracy. Only the 'same' window is
        # kept, so the circular convolution need not hold the whole linear one: a length of
        # n + k - 1 - k // 2 keeps the wrap-around out of that window (the full n + k - 1 would, for
        # 66 px boxes and the 81 px kernel, transform 1.9x the pixels for the same result).
        # The block sum along the rows is done on the spectrum: the kernel's spectrum carries the
        # f-row box and the shift to the window, and the spectrum folded f-fold (aliasing is the
        # Fourier form of keeping every f-th row) is inverted on f times fewer rows; the columns are
        # block-summed after the inverse.
        m, hh, ww = x.shape
        l0 = f * sp_fft.next_fast_len(-(-(hh + kh - 1 - kh // 2) // f))
        l1 = sp_fft.next_fast_len(ww + kw - 1 - kw // 2, real=True)
        shape = (l0, l1)
        if shape not in spectra:
            k0 = np.arange(l0)
            box = np.exp(2j * np.pi * np.outer(np.arange(f), k0) / l0).sum(axis=0)
            shift = np.exp(2j * np.pi * k0 * (kh // 2) / l0)
            spec = sp_fft.rfft2(kernel.astype(np.float64), s=shape) * (box * shift / f)[:, None]
            spectra[shape] = spec.astype(np.complex64)
        out = np.empty((m, hh // f, ww // f))
        # In blocks of ~1.5 MB of spectrum: the temporaries stay in cache and are not page-faulted
        # in afresh for every call, as one call on thousands of templates would have them.
        step = max(1, _FFT_BLOCK_BYTES // (8 * l0 * (l1 // 2 + 1)))
        for i in range(0, m, step):
            spec = sp_fft.rfft2(np.asarray(x[i:i + step], dtype=np.float32), s=shape) * spectra[shape]
            rows = sp_fft.irfft2(spec.reshape(len(spec), f, l0 // f, -1).sum(axis=1), s=(l0 // f, l1))
            rows = rows[:, :hh // f, kw // 2:kw // 2 + ww]
            out[i:i + step] = rows.reshape(len(rows), hh // f, ww // f, f).sum(axis=3, dtype=np.float64)
        return out

    return to_lr


def split_light(prior: np.ndarray, centres: np.ndarray, *, pixel_scale_arcsec: float,
                config: TemplateConfig = TemplateConfig()) -> np.ndarray:
    """Each child's share of the prior's light (module docstring, step 1).

    Parameters
    ----------
    prior : numpy.ndarray
        ``(N, H, W)`` background-subtracted images (any units).
    centres : numpy.ndarray
        ``(N, S, 2)`` children's ``(x, y)``, 0-based pixels of ``prior``; NaN rows are no child.
    pixel_scale_arcsec : float
        Pixel scale of ``prior``.
    config : TemplateConfig

    Returns
    -------
    numpy.ndarray
        float32 ``(N, S, H, W)``, non-negative; summed over S it is the prior's significant light
        (clipped at 0) on the islands that hold a child (and without the uncovered light when
        ``leftover="drop"``); zero for padding rows.
    """
    p = np.asarray(prior, dtype=np.float32)
    c = np.asarray(centres, dtype=np.float64)
    if p.ndim != 3 or c.ndim != 3 or c.shape[0] != p.shape[0] or c.shape[2] != 2:
        raise InputError("templates", f"need prior (N, H, W) and centres (N, S, 2), got {p.shape} and {c.shape}")
    n, h, w = p.shape
    s = c.shape[1]
    out = np.zeros((n, s, h, w), dtype=np.float32)
    if n == 0 or s == 0:
        return out
    valid = np.isfinite(c).all(axis=-1)
    sig = _significant(p, smooth_px=config.smooth_fwhm_arcsec / pixel_scale_arcsec, threshold=config.threshold_sigma)
    r_px = config.dilate_arcsec / pixel_scale_arcsec
    # All images at once, in blocks that keep the (B, S, H, W) temporaries in cache.
    block = _image_block(s, h, w)
    for i in range(0, n, block):
        sl = slice(i, i + block)
        if valid[sl].any():
            out[sl] = _split_block(p[sl], c[sl], valid[sl], sig[sl], r_px=r_px, config=config)
    return out


#: split_light and the shares' squares in template_fluxes work on blocks of about this many (image,
#: child, pixel) elements: their (B, S, H, W) temporaries stay in cache.
_SPLIT_BLOCK_PX = 1 << 17


def _image_block(s: int, h: int, w: int) -> int:
    """Images per block of ``_SPLIT_BLOCK_PX`` elements, for ``s`` children of ``h x w`` pixels."""
    return max(1, _SPLIT_BLOCK_PX // max(s * h * w, 1))
#: Labels the 2-D islands of a stack of images at once: no connection between images.
_STACK_STRUCTURE = np.stack([np.zeros((3, 3), bool), ndimage.generate_binary_structure(2, 1), np.zeros((3, 3), bool)])


def _split_block(p: np.ndarray, c: np.ndarray, valid: np.ndarray, sig: np.ndarray, *, r_px: float,
                 config: TemplateConfig) -> np.ndarray:
    """:func:`split_light` on a block of ``B`` images (``p`` float32 ``(B, H, W)``, ``c`` ``(B, S, 2)``,
    ``valid`` ``(B, S)``, ``sig`` ``(B, H, W)``), every step vectorized over the block."""
    b, h, w = p.shape
    s = c.shape[1]
    light = np.maximum(p, 0.0)
    bi, ki = np.nonzero(valid)  # the children
    ix = np.clip(np.rint(c[bi, ki, 0]), 0, w - 1).astype(np.int64)
    iy = np.clip(np.rint(c[bi, ki, 1]), 0, h - 1).astype(np.int64)
    # Islands of significant light that hold a child; the child's own pixel always counts.
    lab, n_lab = ndimage.label(sig, structure=_STACK_STRUCTURE)
    held = np.zeros(n_lab + 1, dtype=bool)
    held[lab[bi, iy, ix]] = True
    held[0] = False
    island = held[lab]
    island[bi, iy, ix] = True
    if r_px >= 1:
        # Grown by dilate_arcsec: the wings below the threshold, with their noise of both signs.
        for j in np.unique(bi):
            island[j] = ndimage.distance_transform_edt(~island[j]) <= r_px
        lab = None  # the grown islands are labelled below, where the leftover needs them
    li = np.where(island, light, np.float32(0.0))
    raw = np.where(island, p, np.float32(0.0))  # the light shared out: not clipped, so noise cancels
    # Point-symmetric minimum about each child (reflection on the pixel grid: 2c rounded):
    # sym[y, x] = min(li[y, x], li[2cy - y, 2cx - x]), the reflection zero off the image.
    r2x = np.rint(2 * c[bi, ki, 0]).astype(np.int64)
    r2y = np.rint(2 * c[bi, ki, 1]).astype(np.int64)
    jy = r2y[:, None] - np.arange(h)[None, :]
    jx = r2x[:, None] - np.arange(w)[None, :]
    ref = li[bi[:, None, None], np.clip(jy, 0, h - 1)[:, :, None], np.clip(jx, 0, w - 1)[:, None, :]]
    ref *= (((jy >= 0) & (jy < h))[:, :, None] & ((jx >= 0) & (jx < w))[:, None, :])
    sym_k = np.minimum(li[bi], ref)  # (K, H, W), one per child
    if config.monotonic:
        sym_k = _make_monotonic(sym_k, iy, ix)
    sym = np.zeros((b, s, h, w), dtype=np.float32)
    sym[bi, ki] = sym_k
    n_valid = valid.sum(axis=1)
    if config.fit_weights and (n_valid > 1).any():
        # SDSS's second step: the symmetric templates' weights that best add up to the light (images
        # of more than one child; a missing child's row is zero and decouples with weight 0).
        m = np.flatnonzero(n_valid > 1)
        flat = sym[m].reshape(len(m), s, -1).astype(np.float64)
        gram = np.einsum("nsp,ntp->nst", flat, flat)
        tr = np.einsum("nss->n", gram)
        gram = gram + 1e-12 * np.maximum(tr, _TINY)[:, None, None] * np.eye(s)[None]
        rhs = np.einsum("nsp,np->ns", flat, li[m].reshape(len(m), -1).astype(np.float64))
        wts = np.linalg.solve(gram, rhs[..., None])[..., 0]
        sym[m] *= np.clip(wts, 1e-3, None)[:, :, None, None].astype(np.float32)
    tot = sym.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(tot[:, None] > 0, sym / np.maximum(tot[:, None], _TINY), np.float32(0.0))
    parts = raw[:, None] * share
    if config.leftover == "nearest":
        left = np.where(tot > 0, np.float32(0.0), raw)
        pb, py, px = np.nonzero(left)  # the light no template covers: to the nearest child, pixel by pixel
        if len(pb):
            cx = np.where(valid, c[..., 0], np.nan)[pb]
            cy = np.where(valid, c[..., 1], np.nan)[pb]
            d2 = (px[:, None] - cx) ** 2 + (py[:, None] - cy) ** 2  # (P, S)
            d2 = np.where(valid[pb], d2, np.inf)
            if (n_valid > 1).any():
                # Only a child of the same island may take the light.
                if lab is None:
                    lab, _ = ndimage.label(island, structure=_STACK_STRUCTURE)
                lab_i = np.where(island, lab, 0)
                child_lab = np.zeros((b, s), dtype=lab_i.dtype)
                child_lab[bi, ki] = lab_i[bi, iy, ix]
                other = (lab_i[pb, py, px][:, None] != child_lab[pb]) & (n_valid > 1)[pb][:, None]
                d2 = np.where(other, d2 + 1e12, d2)
            parts[pb, np.argmin(d2, axis=1), py, px] += left[pb, py, px]
    parts[~valid] = 0.0
    return parts


def psf_templates(psf: np.ndarray, centres: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Unit-flux point-source templates: ``psf`` (odd, centred, unit sum) shifted to each centre.

    ``(N, S, 2)`` centres (x, y) -> float32 ``(N, S, H, W)``; zero for NaN rows.
    """
    psf = np.asarray(psf, dtype=np.float64)
    psf = psf / psf.sum()
    c = np.asarray(centres, dtype=np.float64)
    n, s = c.shape[:2]
    h, w = shape
    ph, pw = psf.shape
    out = np.zeros((n, s, h, w), dtype=np.float32)
    for i, k in zip(*np.nonzero(np.isfinite(c).all(axis=-1))):
        x, y = c[i, k]
        x0, y0 = int(np.rint(x)), int(np.rint(y))
        shifted = ndimage.shift(psf, (y - y0, x - x0), order=3, mode="constant")
        top, left = y0 - ph // 2, x0 - pw // 2  # the PSF's centre pixel lands on (y0, x0)
        ys, xs, ye, xe = max(top, 0), max(left, 0), min(top + ph, h), min(left + pw, w)
        if ye > ys and xe > xs:
            out[i, k, ys:ye, xs:xe] = shifted[ys - top:ye - top, xs - left:xe - left]
    return out


def solve_template_fluxes(image: np.ndarray, variance: np.ndarray, templates: np.ndarray, *,
                          config: TemplateConfig = TemplateConfig(), n_optional: int = 0) -> dict[str, np.ndarray]:
    """Amplitudes of the templates that best describe the images (weighted linear least squares).

    Parameters
    ----------
    image : numpy.ndarray
        ``(N, h, w)``.
    variance : numpy.ndarray
        ``(N, h, w)`` per-pixel variance (``inf`` or ``nan``: no weight), or ``(N,)`` per image.
    templates : numpy.ndarray
        ``(N, S, h, w)``; all-zero rows are no child.
    n_optional : int
        The last ``n_optional`` templates are nuisance terms (e.g. size corrections): where the
        system is degenerate they are dropped first, and their flags are 0.

    Returns
    -------
    dict
        ``amplitude``, ``amplitude_err`` float64 ``(N, S)``; ``cov`` ``(N, S, S)``; ``chi2_red``
        ``(N,)``; ``vif`` ``(N, S)`` (variance inflation: joint over alone); ``flags`` int64 ``(N, S)``
        (``TEMPLATE_FAILED`` for empty or degenerate templates, whose amplitudes are NaN).
    """
    img = np.asarray(image, dtype=np.float64)
    t = np.asarray(templates, dtype=np.float64)
    n, s = t.shape[:2]
    var = np.asarray(variance, dtype=np.float64)
    if var.ndim == 1:
        var = np.broadcast_to(var[:, None, None], img.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        wgt = np.where(np.isfinite(var) & (var > 0), 1.0 / var, 0.0)
    img = np.where(wgt > 0, np.nan_to_num(img), 0.0)
    tw = t * wgt[:, None]
    a_mat = np.einsum("nkij,nlij->nkl", tw, t)
    b_vec = np.einsum("nkij,nij->nk", tw, img)
    diag = np.einsum("nkk->nk", a_mat).copy()
    cov = np.zeros((n, s, s))
    amp = np.full((n, s), np.nan)
    vif = np.full((n, s), np.nan)
    bad = ~(diag > 0)  # empty templates
    for i in range(n):  # small (S x S) systems
        act = np.flatnonzero(~bad[i])
        for _ in range(s):  # degenerate children are dropped, then the rest solved again
            if len(act) == 0:
                break
            sub = a_mat[i][np.ix_(act, act)]
            d = 1.0 / np.sqrt(diag[i, act])
            lam, vec = np.linalg.eigh(sub * d[:, None] * d[None, :])
            v = (vec**2 / np.maximum(lam, 1e-300)[None, :]).sum(axis=1)  # diag of the correlation's inverse
            vif[i, act] = v
            degenerate = ~(v <= config.max_vif)
            optional = act >= s - n_optional
            if (degenerate & optional).any():
                degenerate &= optional  # nuisance terms go first
            if not degenerate.any():
                ci = (vec / np.maximum(lam, 1e-300)[None, :]) @ vec.T * d[:, None] * d[None, :]
                cov[i][np.ix_(act, act)] = ci
                amp[i, act] = ci @ b_vec[i, act]
                break
            bad[i, act[degenerate]] = True
            act = act[~degenerate]
    flags = np.where(bad | ~np.isfinite(amp), _TEMPLATE_FAILED, 0).astype(np.int64)
    if n_optional:
        flags[:, s - n_optional:] = 0
    bad |= ~np.isfinite(amp)
    model = np.einsum("nk,nkij->nij", np.where(bad, 0.0, np.nan_to_num(amp)), t)
    n_pix = (wgt > 0).sum(axis=(1, 2))
    n_free = (~bad).sum(axis=1)
    chi2 = ((img - model) ** 2 * wgt).sum(axis=(1, 2))
    chi2_red = chi2 / np.maximum(n_pix - n_free, 1)
    var_f = np.maximum(np.einsum("nkk->nk", cov), 0.0)
    if config.robust_errors:
        # Sandwich (heteroskedasticity-consistent) covariance: the residuals where each template
        # lies, so a template that misfits its own pixels widens its error.
        r2w2 = (img - model) ** 2 * wgt**2
        meat = np.einsum("nkij,nlij,nij->nkl", t, t, r2w2)
        sand = np.einsum("nab,nbc,ncd->nad", cov, meat, cov)
        var_f = np.maximum(var_f, np.einsum("nkk->nk", sand))
    err = np.sqrt(var_f)
    amp = np.where(bad, np.nan, amp)
    err = np.where(bad, np.nan, err)
    return {"amplitude": amp, "amplitude_err": err, "cov": cov, "chi2_red": chi2_red, "vif": vif, "flags": flags}


def template_fluxes(image_lr: np.ndarray, variance_lr: np.ndarray, prior: np.ndarray, centres: np.ndarray, *,
                    pixel_scale_arcsec: float, to_low_resolution: Callable[[np.ndarray], np.ndarray] | None = None,
                    psf_lr: np.ndarray | None = None, centres_lr: np.ndarray | None = None,
                    config: TemplateConfig = TemplateConfig()) -> dict[str, np.ndarray]:
    """Template photometry of the children of a batch of cutouts (module docstring).

    Parameters
    ----------
    image_lr : numpy.ndarray
        ``(N, h, w)`` LR images measured (background subtracted), in their units (nJy/px).
    variance_lr : numpy.ndarray
        ``(N, h, w)`` or ``(N,)`` their noise variance.
    prior : numpy.ndarray
        ``(N, H, W)`` the morphological prior (the enhanced image in nJy per HR px; or the LR image).
    centres : numpy.ndarray
        ``(N, S, 2)`` children's (x, y) in ``prior`` pixels, NaN rows for none.
    pixel_scale_arcsec : float
        Pixel scale of ``prior``.
    to_low_resolution : callable, optional
        ``(M, H, W) -> (M, h, w)``: the noiseless degradation (flux conserving); ``None`` when the
        prior is on the LR grid already.
    psf_lr, centres_lr : numpy.ndarray, optional
        The LR PSF and the children's LR positions: a child with no light in the prior gets a PSF template.
    config : TemplateConfig

    Returns
    -------
    dict
        ``flux``, ``flux_err`` ``(N, S)`` (image units times pixels: nJy), ``flags`` ``(N, S)``,
        ``template_flux`` (the prior light of each child, before the solve), ``chi2_red`` ``(N,)``,
        ``cov`` ``(N, S, S)`` of the fluxes.
    """
    img = np.asarray(image_lr, dtype=np.float64)
    n, h, w = img.shape
    parts = split_light(prior, centres, pixel_scale_arcsec=pixel_scale_arcsec, config=config)
    s = parts.shape[1]
    light = parts.sum(axis=(-2, -1), dtype=np.float64)  # (N, S)
    if to_low_resolution is None:
        t_lr = parts.astype(np.float64)
    else:
        flat = parts.reshape(n * s, *parts.shape[-2:])
        t_lr = np.zeros((n * s, h, w))
        some = np.flatnonzero(np.abs(flat).sum(axis=(-2, -1)) > 0)  # padding rows and empty shares stay 0
        if len(some):
            t_lr[some] = np.asarray(to_low_resolution(flat[some]), dtype=np.float64)
        t_lr = t_lr.reshape(n, s, h, w)
    norm = light.copy()
    valid = np.isfinite(np.asarray(centres, float)).all(axis=-1)
    no_light = valid & ~(light > 0)
    if psf_lr is not None and centres_lr is not None and no_light.any():
        cl = np.where(no_light[..., None], np.asarray(centres_lr, float), np.nan)
        pt = psf_templates(psf_lr, cl, (h, w)).astype(np.float64)
        t_lr = np.where(no_light[:, :, None, None], pt, t_lr)
        norm = np.where(no_light, 1.0, norm)
    n_opt = 0
    if config.size_sigma_px > 0:
        # A first-order size correction per child: the template broadened minus the template (zero
        # flux), so a prior broader or sharper than the pixels (the enhancer draws a star as a small
        # galaxy) does not bias the amplitude; it carries no flux of its own.
        g = config.size_sigma_px
        d_lr = ndimage.gaussian_filter(t_lr, sigma=(0, 0, g, g), mode="constant") - t_lr
        d_lr[~(np.abs(t_lr).sum(axis=(-2, -1)) > 0)] = 0.0
        # Only for a child alone in its cutout / footprint: beside a sibling, the LR pixels cannot tell
        # a broader child from light taken from its neighbour.
        d_lr[valid.sum(axis=1) != 1] = 0.0
        t_lr = np.concatenate([t_lr, d_lr], axis=1)
        n_opt = s
    res = solve_template_fluxes(img, variance_lr, t_lr, config=config, n_optional=n_opt)
    res = {k: (v[:, :s] if k in ("amplitude", "amplitude_err", "vif", "flags") else
               v[:, :s, :s] if k == "cov" else v) for k, v in res.items()}
    flux = res["amplitude"] * norm
    err = res["amplitude_err"] * norm
    # The prior's own noise in each child's light: the LR noise of the pixels its share covers
    # (an enhanced image carries the LR image's noise, spread over ratio^2 HR pixels per LR pixel).
    var_lr = np.asarray(variance_lr, dtype=np.float64)
    sky_var = var_lr if var_lr.ndim == 1 else np.nanmedian(np.where(np.isfinite(var_lr), var_lr, np.nan), axis=(1, 2))
    share2 = np.zeros((n, s))
    block = _image_block(s, *parts.shape[-2:])
    for i in range(0, n, block):  # in blocks, as split_light: the float64 temporaries stay in cache
        blk = parts[i:i + block]
        total = blk.sum(axis=1, keepdims=True, dtype=np.float64)
        share2[i:i + block] = np.where(total > 0, (blk / np.maximum(total, _TINY)) ** 2, 0.0).sum(axis=(-2, -1))
    px_per_lr = (parts.shape[-1] / w) ** 2
    noisy = prior_sky_noise(np.asarray(prior)) > 0  # a noiseless prior (a model, a simulation's truth) adds none
    light_var = np.where(no_light | ~noisy[:, None], 0.0, sky_var[:, None] * share2 / px_per_lr)
    err = np.sqrt(err**2 + res["amplitude"] ** 2 * light_var + (config.systematic_fraction * flux) ** 2)
    cov = res["cov"] * norm[:, :, None] * norm[:, None, :]
    flags = np.where(valid, res["flags"], 0)
    return {"flux": np.where(valid, flux, np.nan), "flux_err": np.where(valid, err, np.nan), "flags": flags,
            "template_flux": np.where(valid, light, np.nan), "chi2_red": res["chi2_red"], "cov": cov}
