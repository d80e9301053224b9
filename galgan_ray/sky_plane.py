"""The residual gradient of a sky: a plane fitted with sigma clipping, for estimators to take out first.

A coadd's background subtraction leaves a pedestal and a gradient. Estimators that are exact on a
constant (a clipped mode, a MAD) are not on a gradient: a mesh or a box of sky then holds a spread of
levels, and a noise estimate made there grows. :func:`fit_sky_plane` fits the plane by least squares
over the pixels a caller marks as usable, clipping the residuals at ``nsigma`` robust standard
deviations until the set of kept pixels stops changing, so the sources fall out. Least squares is
equivariant: adding a plane to the image adds exactly that plane to the fit, keeps the same pixels and
leaves every residual as it was, so whatever is computed from ``image - fit_sky_plane(...)`` is the
same with or without a residual gradient (to rounding).

:func:`convolve_keeping_sky` PSF-matches an image with the fitted plane (level included) taken out
and added back: a linear convolution pads the image with zeros, which bends a pedestal or gradient
down within half a kernel of the edges (and of unusable pixels) into a rim that looks like structure.
"""
from __future__ import annotations

import numpy as np
from scipy.signal import fftconvolve

__all__ = ["fit_sky_plane", "convolve_keeping_sky", "MAX_FIT_PIXELS"]

#: At most about this many pixels enter the fit of a large image (a fixed grid of every n-th pixel).
MAX_FIT_PIXELS = 250_000


def fit_sky_plane(image: np.ndarray, use: np.ndarray, *, along_y: bool = True, along_x: bool = True,
                  level: bool = False, nsigma: float = 3.0, max_iter: int = 10) -> np.ndarray:
    """The gradient of ``image`` over the pixels ``use`` selects, along the axes asked for.

    Returns the fitted plane, float64 ``(H, W)``, without its constant term (zero at the image centre:
    callers measure the level with their own estimator) unless ``level``; zeros when fewer than 10
    pixels per fitted term are usable.
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    use = np.asarray(use, dtype=bool) & np.isfinite(img)
    yc, xc = np.arange(h) - (h - 1) / 2.0, np.arange(w) - (w - 1) / 2.0  # about the image centre
    n_terms = 1 + along_y + along_x
    if n_terms == 1 and not level:
        return np.zeros((h, w))
    # a large image is fitted on a fixed grid of every step-th pixel (the same pixels whatever the
    # values, so the fit stays equivariant), at most ~MAX_FIT_PIXELS of them
    step = max(1, int(np.ceil(np.sqrt(h * w / MAX_FIT_PIXELS))))
    ys, xs = yc[::step], xc[::step]
    r_s, keep_s = img[::step, ::step], use[::step, ::step]
    terms = [np.ones(r_s.shape)] + ([np.broadcast_to(ys[:, None], r_s.shape)] if along_y else []) \
        + ([np.broadcast_to(xs[None, :], r_s.shape)] if along_x else [])
    a = np.stack([t[keep_s] for t in terms], axis=1)
    r = r_s[keep_s]
    if len(r) < 10 * n_terms:
        return np.zeros((h, w))
    keep = np.ones(len(r), bool)
    for _ in range(max_iter):
        coef = np.linalg.lstsq(a[keep], r[keep], rcond=None)[0]
        res = r - a @ coef
        scale = 1.4826 * np.median(np.abs(res[keep] - np.median(res[keep])))
        new = np.abs(res) <= nsigma * scale
        if np.array_equal(new, keep) or new.sum() < 10 * n_terms:
            break
        keep = new
    out = np.full((h, w), coef[0] if level else 0.0)
    k = 1
    if along_y:
        out = out + coef[k] * yc[:, None]
        k += 1
    if along_x:
        out = out + coef[k] * xc[None, :]
    return out


def convolve_keeping_sky(image: np.ndarray, kernel: np.ndarray, use: np.ndarray) -> np.ndarray:
    """``fftconvolve(image, kernel, mode="same")`` for a unit-sum ``kernel``, with the sky plane of the
    pixels ``use`` selects (:func:`fit_sky_plane`, level included) taken out before and added back
    after, and the pixels ``use`` leaves out set to that plane: the edges and holes are padded with
    the sky instead of zeros. float64 ``(H, W)``."""
    img = np.asarray(image, dtype=np.float64)
    use = np.asarray(use, dtype=bool) & np.isfinite(img)
    plane = fit_sky_plane(img, use, level=True)
    return fftconvolve(np.where(use, img - plane, 0.0), kernel, mode="same") + plane
