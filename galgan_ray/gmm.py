"""Gaussian mixtures: PSF fits, galaxy profiles, analytic convolution and rendering (ngmix's principles).

A :class:`GaussianMixture` holds K two-dimensional Gaussians as arrays: integrated fluxes
(``amplitudes``), centres ``(x, y)`` and 2x2 covariances, in **arcsec** on the sky (x along image
columns, y along rows, as in :mod:`galgan_ray.geometry`). Working in arcsec lets one PSF mixture
serve any pixel grid; :func:`render_mixture` puts a mixture onto a grid.

Three things are built from mixtures, as in ngmix (Sheldon 2014) and The Tractor:

1. **PSF mixtures** (:func:`fit_psf_mixture`): a PSF image is fitted by K Gaussians with a
   least-squares fit of the mixture sampled at pixel centres, with the unweighted second moments of
   the stamp and the half-maximum radius added as soft constraints, so that both the wings (second
   moments) and the core (FWHM) are reproduced to far better than 2%.
2. **Galaxy profiles** (:func:`galaxy_mixture`): Gaussian, exponential (6 components) and de
   Vaucouleurs (10 components) as fixed mixtures of concentric Gaussians, parameterised by flux,
   centre, half-light radius and ellipticity (e1, e2).
3. **Convolution** (:func:`convolve`): Gaussians convolve analytically: amplitudes multiply,
   centres and covariances add, so a galaxy seen through a PSF is again a mixture (K_gal x K_psf).

Pixelisation
------------
A PSF image (drawn by :func:`galgan_ray.psf.draw_psf`, or an HST PSF model) is the *effective*
PSF: the optical PSF already convolved with the pixel response, sampled at pixel centres. The
fitted mixture models this effective PSF, so a galaxy mixture convolved with it and **sampled at
pixel centres** is the pixel-integrated image of the galaxy -- no further pixel integration is
needed or wanted (``oversample=1`` in :func:`render_mixture`). This is exact up to the mixture's
approximation for any sampling, and is how ngmix and GalSim's ``method='no_pixel'`` treat effective
PSFs. Only a mixture that does *not* include a pixel (e.g. a bare galaxy profile) should be
rendered with ``oversample > 1`` (an n x n midpoint rule inside each pixel: at the peak of a
Gaussian of sigma s px the relative error is about ``1 / (24 n^2 s^2)``, 0.26% for s = 1 px and
n = 4, against 4% for plain centre sampling), or convolved with
:meth:`GaussianMixture.convolve_pixel`, which adds the pixel's variance (``scale**2 / 12`` per axis)
-- a Gaussian stand-in for the top hat that is right in the second moments. A mixture fitted on one
grid and used on a coarser one carries the finer pixel, a blur of variance ``fine**2 / 12`` per
axis (0.0003 arcsec^2 for 0.06" pixels, negligible against a 0.6" PSF).

Galaxy profile coefficients
---------------------------
The exponential (6 Gaussians) and de Vaucouleurs (10 Gaussians) mixtures are those of Hogg & Lang
(2013, PASP 125, 719, "Replacing standard galaxy profiles with mixtures of Gaussians"; fitted to
profiles softened to zero in the far wings), as embedded in ngmix (github.com/esheldon/ngmix,
``ngmix/gmix/gmix_nb.py``: ``_pvals_exp``, ``_fvals_exp``, ``_pvals_dev``, ``_fvals_dev``) where they
are normalised to unit flux (``pvals``) and, for the exponential, to unit total second moment
``T = <x^2> + <y^2>`` (``fvals`` scale T). The de Vaucouleurs set has sum(p * f) = 1.025 there,
so we renormalise both sets here to sum(p * f) = 1. The half-light radius of each *mixture*
(not of the untruncated analytic profile) is solved for numerically once, so that a mixture
requested with ``hlr_arcsec=r`` has exactly half its light within r.

Ellipticity convention: (e1, e2) is the distortion ``(a^2 - b^2) / (a^2 + b^2)`` of GalSim's
``shear(e1=..., e2=...)``: e1 > 0 stretches along x, e2 > 0 along x = y, and the area is preserved,
so ``hlr_arcsec`` is the circularised half-light radius sqrt(a b) as in
``galsim.Exponential(half_light_radius=r).shear(e1=e1, e2=e2)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from scipy.optimize import brentq

from .errors import InputError
from .psf import _half_maximum, _peak_centroid, measure_fwhm, normalize_psf

__all__ = [
    "GaussianMixture",
    "PROFILE_MODELS",
    "profile_coefficients",
    "hlr_to_T",
    "T_to_hlr",
    "shape_covariance",
    "galaxy_mixture",
    "convolve",
    "render_mixture",
    "image_moments",
    "fit_psf_mixture",
]

ProfileModel = Literal["gauss", "exp", "dev"]
PROFILE_MODELS: tuple[str, ...] = ("gauss", "exp", "dev")

# Hogg & Lang (2013) mixtures as embedded in ngmix (gmix_nb.py): p = flux fractions, f = T fractions.
_P_EXP = np.array([
    0.00061601229677880041, 0.0079461395724623237, 0.053280454055540001,
    0.21797364640726541, 0.45496740582554868, 0.26521634184240478,
])
_F_EXP = np.array([
    0.002467115141477932, 0.018147435573256168, 0.07944063151366336,
    0.27137669897479122, 0.79782256866993773, 2.1623306025075739,
])
_P_DEV = np.array([
    6.5288960012625658e-05, 0.00044199216814302695, 0.0020859587871659754,
    0.0075913681418996841, 0.02260266219257237, 0.056532254390212859,
    0.11939049233042602, 0.20969545753234975, 0.29254151133139222,
    0.28905301416582552,
])
_F_DEV = np.array([
    3.068330909892871e-07, 3.551788624668698e-06, 2.542810833482682e-05,
    0.0001466508940804874, 0.0007457199853069548, 0.003544702600428794,
    0.01648881157673708, 0.07893194619504579, 0.4203787615506401,
    3.055782252301236,
])


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """K two-dimensional Gaussians, in arcsec.

    Attributes
    ----------
    amplitudes : numpy.ndarray
        ``(K,)`` integrated flux of each component (image units, or a fraction for a PSF).
    centres : numpy.ndarray
        ``(K, 2)`` centre ``(x, y)`` of each component, arcsec.
    covariances : numpy.ndarray
        ``(K, 2, 2)`` covariance ``[[xx, xy], [xy, yy]]`` of each component, arcsec^2.
    """

    amplitudes: np.ndarray
    centres: np.ndarray
    covariances: np.ndarray

    def __post_init__(self):
        a = np.atleast_1d(np.asarray(self.amplitudes, dtype=np.float64))
        c = np.asarray(self.centres, dtype=np.float64).reshape(-1, 2)
        v = np.asarray(self.covariances, dtype=np.float64).reshape(-1, 2, 2)
        if not (a.ndim == 1 and len(a) == len(c) == len(v)):
            raise InputError("GaussianMixture", f"inconsistent shapes {a.shape}, {c.shape}, {v.shape}")
        det = v[:, 0, 0] * v[:, 1, 1] - v[:, 0, 1] * v[:, 1, 0]
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(c)) and np.all(np.isfinite(v))):
            raise InputError("GaussianMixture", "non-finite amplitudes, centres or covariances")
        if np.any(v[:, 0, 0] <= 0) or np.any(det <= 0):
            raise InputError("GaussianMixture", "covariances must be positive definite")
        for name, arr in (("amplitudes", a), ("centres", c), ("covariances", v)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    # -- summaries -----------------------------------------------------------------------------
    @property
    def n_components(self) -> int:
        """Number of Gaussians K."""
        return len(self.amplitudes)

    @property
    def flux(self) -> float:
        """Total flux (sum of amplitudes)."""
        return float(self.amplitudes.sum())

    @property
    def centroid(self) -> np.ndarray:
        """Flux-weighted centre ``(x, y)``, arcsec."""
        return (self.amplitudes[:, None] * self.centres).sum(0) / self.amplitudes.sum()

    @property
    def covariance(self) -> np.ndarray:
        """Total second-moment matrix about the centroid (arcsec^2), over the infinite plane."""
        a = self.amplitudes / self.amplitudes.sum()
        d = self.centres - self.centroid
        return (a[:, None, None] * (self.covariances + d[:, :, None] * d[:, None, :])).sum(0)

    @property
    def T(self) -> float:
        """``T = Ixx + Iyy`` of the whole mixture (arcsec^2)."""
        cov = self.covariance
        return float(cov[0, 0] + cov[1, 1])

    # -- transformations -----------------------------------------------------------------------
    def shifted(self, dx_arcsec: float, dy_arcsec: float) -> "GaussianMixture":
        """The mixture moved by ``(dx, dy)`` arcsec."""
        return GaussianMixture(self.amplitudes, self.centres + np.array([dx_arcsec, dy_arcsec]), self.covariances)

    def centred(self) -> "GaussianMixture":
        """The mixture moved so that its centroid is at (0, 0)."""
        cx, cy = self.centroid
        return self.shifted(-cx, -cy)

    def with_flux(self, flux: float) -> "GaussianMixture":
        """The mixture rescaled to total flux ``flux``."""
        return GaussianMixture(self.amplitudes * (flux / self.amplitudes.sum()), self.centres, self.covariances)

    def convolve(self, other: "GaussianMixture") -> "GaussianMixture":
        """Analytic convolution with ``other`` (see :func:`convolve`)."""
        return convolve(self, other)

    def convolve_pixel(self, pixel_scale_arcsec: float) -> "GaussianMixture":
        """Add a square pixel's variance ``scale**2 / 12`` per axis to every component."""
        v = self.covariances + np.eye(2) * (pixel_scale_arcsec**2 / 12.0)
        return GaussianMixture(self.amplitudes, self.centres, v)

    def to_dict(self) -> dict[str, list]:
        """Plain lists (for YAML/JSON/Parquet metadata); :meth:`from_dict` inverts it."""
        return {"amplitudes": self.amplitudes.tolist(), "centres": self.centres.tolist(),
                "covariances": self.covariances.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GaussianMixture":
        """Rebuild a mixture written by :meth:`to_dict`."""
        try:
            return cls(np.asarray(data["amplitudes"]), np.asarray(data["centres"]), np.asarray(data["covariances"]))
        except KeyError as exc:
            raise InputError("GaussianMixture", f"missing key {exc.args[0]!r}") from None

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, flux={self.flux:.6g}, T={self.T:.6g} arcsec^2)"


# -- galaxy profiles ------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _profile(model: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(flux fractions p, T fractions f with sum(p f) = 1, hlr / sqrt(T)) of a profile model."""
    if model == "gauss":
        p, f = np.array([1.0]), np.array([1.0])
    elif model == "exp":
        p, f = _P_EXP / _P_EXP.sum(), _F_EXP.copy()
    elif model == "dev":
        p, f = _P_DEV / _P_DEV.sum(), _F_DEV.copy()
    else:
        raise InputError("model", f"unknown profile model {model!r}; known: {list(PROFILE_MODELS)}")
    f = f / (p * f).sum()
    # Half-light radius of the round mixture with T = 1: each component has variance f/2 per axis,
    # and encloses 1 - exp(-r^2 / (2 var)) of its flux within r.
    var = f / 2.0
    ratio = brentq(lambda r: (p * (1.0 - np.exp(-r * r / (2.0 * var)))).sum() - 0.5, 1e-8, 100.0, xtol=1e-14)
    p.setflags(write=False)
    f.setflags(write=False)
    return p, f, float(ratio)


def profile_coefficients(model: ProfileModel) -> tuple[np.ndarray, np.ndarray]:
    """Flux fractions ``p`` and size fractions ``f`` of a profile mixture.

    Component k of a profile with total second moment T has flux ``p[k]`` and variance
    ``T * f[k] / 2`` per axis; ``sum(p) == 1`` and ``sum(p * f) == 1``.

    Parameters
    ----------
    model : {"gauss", "exp", "dev"}

    Returns
    -------
    p, f : numpy.ndarray
        Read-only ``(K,)`` arrays (K = 1, 6, 10).
    """
    p, f, _ = _profile(model)
    return p, f


def hlr_to_T(model: ProfileModel, hlr: float | np.ndarray) -> float | np.ndarray:
    """``T = Ixx + Iyy`` of a profile mixture with half-light radius ``hlr`` (same length units squared)."""
    return (np.asarray(hlr, dtype=np.float64) / _profile(model)[2]) ** 2


def T_to_hlr(model: ProfileModel, T: float | np.ndarray) -> float | np.ndarray:
    """Half-light radius of a profile mixture of second moment ``T`` (inverse of :func:`hlr_to_T`)."""
    return np.sqrt(np.asarray(T, dtype=np.float64)) * _profile(model)[2]


def shape_covariance(e1: float, e2: float) -> np.ndarray:
    """Unit-determinant 2x2 matrix of ellipticity (e1, e2): ``[[1+e1, e2], [e2, 1-e1]] / sqrt(1-e^2)``."""
    e_sq = e1 * e1 + e2 * e2
    if not e_sq < 1.0:
        raise InputError("ellipticity", f"|e| must be < 1, got ({e1}, {e2})")
    return np.array([[1.0 + e1, e2], [e2, 1.0 - e1]]) / math.sqrt(1.0 - e_sq)


def galaxy_mixture(
    model: ProfileModel,
    *,
    flux: float = 1.0,
    hlr_arcsec: float,
    e1: float = 0.0,
    e2: float = 0.0,
    centre_arcsec: tuple[float, float] = (0.0, 0.0),
) -> GaussianMixture:
    """A galaxy profile as a fixed mixture of concentric Gaussians.

    Parameters
    ----------
    model : {"gauss", "exp", "dev"}
        Gaussian, exponential (6 Gaussians) or de Vaucouleurs (10 Gaussians), Hogg & Lang (2013).
    flux : float
        Total flux (image units).
    hlr_arcsec : float
        Circularised half-light radius of the mixture, arcsec.
    e1, e2 : float
        Distortion ellipticity (GalSim's ``shear(e1=, e2=)``), ``|e| < 1``; area-preserving.
    centre_arcsec : (float, float)
        Centre ``(x, y)``, arcsec.

    Returns
    -------
    GaussianMixture
        K = 1, 6 or 10 components.
    """
    if not hlr_arcsec > 0:
        raise InputError("hlr_arcsec", f"must be > 0, got {hlr_arcsec}")
    p, f, _ = _profile(model)
    T = float(hlr_to_T(model, hlr_arcsec))
    shape = shape_covariance(e1, e2)
    cov = (T * f / 2.0)[:, None, None] * shape[None]
    cen = np.broadcast_to(np.asarray(centre_arcsec, dtype=np.float64), (len(p), 2))
    return GaussianMixture(flux * p, cen, cov)


def convolve(a: GaussianMixture, b: GaussianMixture) -> GaussianMixture:
    """Convolution of two mixtures: K_a x K_b Gaussians, amplitudes multiply, centres and covariances add.

    Parameters
    ----------
    a, b : GaussianMixture
        E.g. a galaxy profile and a unit-flux PSF mixture.

    Returns
    -------
    GaussianMixture
        Components ordered ``a``-major: index ``i * K_b + j``.
    """
    amp = (a.amplitudes[:, None] * b.amplitudes[None, :]).ravel()
    cen = (a.centres[:, None, :] + b.centres[None, :, :]).reshape(-1, 2)
    cov = (a.covariances[:, None] + b.covariances[None, :]).reshape(-1, 2, 2)
    return GaussianMixture(amp, cen, cov)


# -- rendering ------------------------------------------------------------------------------------
def _render_px(amp, cx, cy, cxx, cxy, cyy, xs, ys) -> np.ndarray:
    """Sum of Gaussians (pixel units) sampled at ``xs`` (W,) x ``ys`` (H,) -> (H, W)."""
    det = cxx * cyy - cxy * cxy
    pxx, pxy, pyy = cyy / det, -cxy / det, cxx / det
    norm = amp / (2.0 * np.pi * np.sqrt(det))
    dx = xs[None, None, :] - cx[:, None, None]
    dy = ys[None, :, None] - cy[:, None, None]
    q = pxx[:, None, None] * dx * dx + 2.0 * pxy[:, None, None] * dx * dy + pyy[:, None, None] * dy * dy
    return np.einsum("k,khw->hw", norm, np.exp(-0.5 * q))


def render_mixture(
    mixture: GaussianMixture,
    *,
    shape: tuple[int, int],
    pixel_scale_arcsec: float,
    centre_px: tuple[float, float] | None = None,
    oversample: int = 1,
) -> np.ndarray:
    """Render a mixture on a pixel grid, in flux per pixel (the image sums to the flux inside it).

    Parameters
    ----------
    mixture : GaussianMixture
        Coordinates in arcsec relative to the point ``centre_px``.
    shape : (int, int)
        ``(H, W)`` of the image.
    pixel_scale_arcsec : float
    centre_px : (float, float), optional
        0-based pixel position ``(x, y)`` of the mixture's origin; default the image centre
        ``((W-1)/2, (H-1)/2)``.
    oversample : int
        1 samples each pixel at its centre (right for mixtures that include the pixel response,
        i.e. anything convolved with an effective PSF); n > 1 averages an n x n grid of sub-pixel
        centres (a midpoint-rule pixel integral, for bare profiles).

    Returns
    -------
    numpy.ndarray
        float64 ``(H, W)`` image: surface brightness times pixel area at each sample.
    """
    h, w = (int(s) for s in shape)
    if centre_px is None:
        centre_px = ((w - 1) / 2.0, (h - 1) / 2.0)
    n = int(oversample)
    if n < 1:
        raise InputError("oversample", f"must be >= 1, got {oversample}")
    s = float(pixel_scale_arcsec)
    amp = mixture.amplitudes
    cx = mixture.centres[:, 0] / s + centre_px[0]
    cy = mixture.centres[:, 1] / s + centre_px[1]
    cov = mixture.covariances / (s * s)
    sub = (np.arange(n) + 0.5) / n - 0.5
    xs = (np.arange(w)[:, None] + sub[None, :]).ravel()
    ys = (np.arange(h)[:, None] + sub[None, :]).ravel()
    img = _render_px(amp, cx, cy, cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1], xs, ys)
    if n > 1:
        img = img.reshape(h, n, w, n).mean(axis=(1, 3))
    return img


def image_moments(image: np.ndarray) -> dict[str, float]:
    """Unweighted flux, centroid and second moments of an image, in pixels (0-based).

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)``.

    Returns
    -------
    dict
        ``flux`` (sum), ``x``, ``y`` (centroid, px), ``xx``, ``yy``, ``xy`` (central second
        moments, px^2), ``T`` (xx + yy).
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    f = img.sum()
    xs, ys = np.arange(w), np.arange(h)
    cx = (img.sum(0) * xs).sum() / f
    cy = (img.sum(1) * ys).sum() / f
    dx, dy = xs - cx, ys - cy
    xx = (img.sum(0) * dx * dx).sum() / f
    yy = (img.sum(1) * dy * dy).sum() / f
    xy = (img * dy[:, None] * dx[None, :]).sum() / f
    return {"flux": float(f), "x": float(cx), "y": float(cy), "xx": float(xx), "yy": float(yy),
            "xy": float(xy), "T": float(xx + yy)}


# -- PSF fitting ----------------------------------------------------------------------------------
def _unpack(theta: np.ndarray, k: int, concentric: bool):
    """Parameter vector -> per-component (log-amp, cx, cy, a, b, c) with L = [[e^a, 0], [b, e^c]]."""
    if concentric:
        cx, cy = np.full(k, theta[0]), np.full(k, theta[1])
        rest = theta[2:].reshape(k, 4)
    else:
        per = theta.reshape(k, 6)
        cx, cy, rest = per[:, 0], per[:, 1], per[:, 2:]
    return rest[:, 0], cx, cy, rest[:, 1], rest[:, 2], rest[:, 3]


def _psf_model_and_jac(theta, k, concentric, xs, ys):
    """Mixture sampled at pixel centres (H*W,) and its transposed Jacobian (n_params, H*W), pixel units.

    Covariance ``C = L L^T`` (positive definite by construction); with ``u = C^-1 d`` the derivative
    of a Gaussian G is ``G u`` for its centre and ``G (u^T dC u - tr(C^-1 dC)) / 2`` for a covariance
    parameter.
    """
    la, cx, cy, a, b, c = _unpack(theta, k, concentric)
    l11, l22 = np.exp(a), np.exp(c)
    cxx, cxy, cyy = l11 * l11, l11 * b, b * b + l22 * l22
    det = cxx * cyy - cxy * cxy
    pxx, pxy, pyy = cyy / det, -cxy / det, cxx / det
    amp = np.exp(la)
    norm = amp / (2.0 * np.pi * np.sqrt(det))
    dx = (xs[None, None, :] - cx[:, None, None])
    dy = (ys[None, :, None] - cy[:, None, None])
    ux = pxx[:, None, None] * dx + pxy[:, None, None] * dy
    uy = pxy[:, None, None] * dx + pyy[:, None, None] * dy
    g = norm[:, None, None] * np.exp(-0.5 * (ux * dx + uy * dy))  # (k, H, W)
    gxx, gxy, gyy = g * ux * ux, g * ux * uy, g * uy * uy

    def dcov(dxx, dxy, dyy):  # dG for a covariance change (per component, broadcast)
        tr = pxx * dxx + 2.0 * pxy * dxy + pyy * dyy
        return 0.5 * (dxx[:, None, None] * gxx + 2.0 * dxy[:, None, None] * gxy
                      + dyy[:, None, None] * gyy - tr[:, None, None] * g)

    zero = np.zeros(k)
    d_la = g
    d_cx, d_cy = g * ux, g * uy
    d_a = dcov(2.0 * cxx, cxy, zero)
    d_b = dcov(zero, l11, 2.0 * b)
    d_c = dcov(zero, zero, 2.0 * l22 * l22)
    n = g.shape[1] * g.shape[2]
    flat = lambda t: t.reshape(k, n)  # noqa: E731
    if concentric:
        cols = [flat(d_cx).sum(0)[None], flat(d_cy).sum(0)[None]]
        per = np.stack([flat(d_la), flat(d_a), flat(d_b), flat(d_c)], axis=1).reshape(4 * k, n)
        jac = np.concatenate(cols + [per], axis=0)
    else:
        jac = np.stack([flat(d_cx), flat(d_cy), flat(d_la), flat(d_a), flat(d_b), flat(d_c)], axis=1).reshape(6 * k, n)
    return g.sum(0).ravel(), jac


def _halfmax_functional(img: np.ndarray) -> np.ndarray | None:
    """Pixel weights L with ``sum(L * m) == 0`` when m's FWHM, measured as :func:`measure_fwhm`
    measures the image's (same centre and radial bins), equals the image's.

    The radial profile interpolated at the image's half-maximum radius is linear in the pixel
    values, and so is the peak; L is their difference, normalised by the image's peak.
    """
    hm = _half_maximum(img)
    if hm is None:
        return None
    ring, counts, rings, rad, j = hm.ring, hm.counts, hm.rings, hm.radius, hm.j
    weights = np.zeros(img.size)
    if hm.peak_from_ring:
        weights[ring == rings[0]] -= 0.5 / counts[rings[0]]
    else:
        weights[np.argmax(img)] -= 0.5
    t = (hm.radius_px - rad[j - 1]) / (rad[j] - rad[j - 1])
    weights[ring == rings[j - 1]] += (1.0 - t) / counts[rings[j - 1]]
    weights[ring == rings[j]] += t / counts[rings[j]]
    return weights / hm.peak


def _levenberg_marquardt(evaluate, x0, lo, hi, *, max_iter: int, rtol: float = 1e-5) -> dict[str, Any]:
    """Minimise |r(x)|^2 with ``evaluate(x) -> (r, (J_pix^T, J_extra^T))``, parameters clipped to [lo, hi].

    ``r`` is the pixel residuals followed by the extra (constraint) residuals; the transposed
    Jacobian comes in two blocks, ``(P, n_pix)`` and ``(P, n_extra)`` (or None), to avoid copies.

    Marquardt's scaled damping on the normal equations (J^T J is tiny: 6 K parameters); a step is
    kept only where the cost falls and stays finite. Converged when a kept step lowers the cost by
    less than ``rtol`` relative three times in a row, or when the damping saturates at a stationary point.
    """
    x = np.clip(np.asarray(x0, dtype=np.float64), lo, hi)
    r, jac = evaluate(x)
    cost = float(r @ r)
    lam, nfev, success, message = 1e-3, 1, False, "maximum number of evaluations reached"
    small = 0

    def normal(jac, r):
        jp, je = jac
        n = jp.shape[1]
        hess, grad = jp @ jp.T, jp @ r[:n]
        if je is not None:
            hess, grad = hess + je @ je.T, grad + je @ r[n:]
        return hess, grad

    while nfev < max_iter:
        hess, grad = normal(jac, r)
        diag = np.maximum(np.diag(hess), 1e-30)
        try:
            step = np.linalg.solve(hess + lam * np.diag(diag), -grad)
        except np.linalg.LinAlgError:
            lam *= 10.0
            continue
        x_new = np.clip(x + step, lo, hi)
        r_new, jac_new = evaluate(x_new)
        nfev += 1
        cost_new = float(r_new @ r_new) if np.all(np.isfinite(r_new)) else np.inf
        if cost_new < cost:
            rel = (cost - cost_new) / max(cost, 1e-300)
            x, r, jac, cost = x_new, r_new, jac_new, cost_new
            lam = max(lam / 3.0, 1e-12)
            small = small + 1 if rel < rtol else 0
            if small >= 3:
                success, message = True, "relative cost reduction below rtol (3 steps in a row)"
                break
        else:
            lam *= 4.0
            if lam > 1e12:
                success, message = True, "no further decrease (damping saturated)"
                break
    return {"x": x, "cost": cost, "nfev": nfev, "success": success, "message": message}


def fit_psf_mixture(
    psf_image: np.ndarray,
    *,
    n_gauss: int = 3,
    pixel_scale_arcsec: float,
    concentric: bool = True,
    moment_weight: float = 30.0,
    fwhm_weight: float = 30.0,
    max_nfev: int = 300,
    source: str = "psf_image",
) -> tuple[GaussianMixture, dict[str, Any]]:
    """Fit an (effective, pixel-convolved) PSF image with ``n_gauss`` Gaussians.

    The mixture, sampled at pixel centres, is fitted to the unit-sum image by least squares
    (Levenberg-Marquardt on the normal equations, analytic Jacobian) with positive
    amplitudes and positive-definite covariances by construction (log-amplitudes, Cholesky factors
    with log diagonals). Four extra residuals act as soft constraints:

    - the unweighted second moments (xx, yy, xy) of the model in the stamp minus those of the
      image, over the image's T: a plain least-squares fit spends itself on the core and misses the
      wings, which dominate the unweighted moments;
    - the model's radial profile at the image's half-maximum radius minus half the model's peak
      (same centre and radial bins as :func:`galgan_ray.psf.measure_fwhm`): the core of an Airy-like
      (HST) PSF is flatter than a Gaussian and would otherwise come out narrower.

    Each constraint residual is scaled so that a relative error d costs as much as a fractional RMS
    pixel residual of ``weight * d``. The mixture is returned normalised to unit total flux.

    Parameters
    ----------
    psf_image : numpy.ndarray
        ``(H, W)`` PSF image (any normalisation; checked and normalised to unit sum). It should be
        the effective PSF of the grid it is sampled on (see the module notes on pixelisation).
    n_gauss : int
        Number of Gaussians: 3 for a Moffat/Kolmogorov PSF; a sharp diffraction-limited HST PSF
        fits its core better with 4 (both meet the FWHM and moment constraints; the pixel
        residuals are larger).
    pixel_scale_arcsec : float
        Sampling of ``psf_image``.
    concentric : bool
        Give all Gaussians one common centre (default). Concentric mixtures meet the FWHM and
        moment constraints on the HST PSFs too (the asymmetry goes into the covariances), are
        better conditioned, and take the fast path of :func:`galgan_ray.photometry.fit_fluxes`.
    moment_weight, fwhm_weight : float
        Weights of the second-moment and half-maximum constraints (0 turns one off).
    max_nfev : int
        Budget of model evaluations for the optimiser.
    source : str
        Name used in error messages.

    Returns
    -------
    mixture : GaussianMixture
        Unit-flux mixture in arcsec, coordinates relative to the stamp centre ``((W-1)/2, (H-1)/2)``
        (a PSF drawn centred has its centroid at about (0, 0)).
    info : dict
        ``frac_rms``: sqrt(sum(resid^2) / sum(image^2)); ``max_resid``: max |model - image| over
        the image's peak; ``fwhm_image_arcsec``, ``fwhm_model_arcsec`` (from
        :func:`galgan_ray.psf.measure_fwhm`) and ``fwhm_rel_err`` (model / image - 1);
        ``moments_image``, ``moments_model`` (:func:`image_moments` of image and rendered model, px)
        and ``moment_rel_err`` (the largest of |xx_m/xx_i - 1|, |yy_m/yy_i - 1|, |xy_m - xy_i| / T_i);
        ``T_rel_err`` (T_m / T_i - 1); ``flux_in_stamp`` (fraction of the mixture's flux inside the
        stamp); ``n_gauss``; ``success`` (the optimiser converged); ``nfev`` (model evaluations);
        ``message``.
    """
    img = normalize_psf(psf_image, source=source)
    if int(n_gauss) < 1:
        raise InputError(source, f"n_gauss must be >= 1, got {n_gauss}")
    if not pixel_scale_arcsec > 0:
        raise InputError(source, f"pixel_scale_arcsec must be > 0, got {pixel_scale_arcsec}")
    k = int(n_gauss)
    h, w = img.shape
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    flat_img = img.ravel()
    mom = image_moments(img)
    scale = float(np.sqrt((flat_img * flat_img).sum()))  # constraint residuals in units of this
    halfmax = _halfmax_functional(img) if fwhm_weight > 0 else None
    xg, yg = np.meshgrid(xs, ys)
    xg, yg = xg.ravel(), yg.ravel()

    # 1. Initial guess: centroid of the 3x3 core, a ladder of widths from the core to the wings.
    cy0, cx0 = (float(c) for c in _peak_centroid(img))
    fwhm_px = measure_fwhm(img)
    if not np.isfinite(fwhm_px) or fwhm_px <= 0:
        fwhm_px = 2.0
    s_core = max(fwhm_px / 2.3548, 0.3)
    s_wing = max(math.sqrt(mom["T"] / 2.0), 1.5 * s_core)
    ladder = np.arange(k) / max(k - 1, 1)
    sig = s_core * 0.85 * (1.2 * s_wing / s_core) ** ladder
    frac = np.geomspace(1.0, 0.1, k)
    frac /= frac.sum()
    per = np.stack([np.log(frac), np.log(sig), np.zeros(k), np.log(sig)], axis=1)
    if concentric:
        theta0 = np.concatenate([[cx0, cy0], per.ravel()])
    else:
        theta0 = np.concatenate([np.full((k, 1), cx0), np.full((k, 1), cy0), per], axis=1).ravel()

    # Bounds keep every trial finite: amplitudes in [1e-9, e^2], widths in [0.05 px, the stamp].
    big = float(max(h, w))
    lo_per = [math.log(1e-9), math.log(0.05), -big, math.log(0.05)]
    hi_per = [2.0, math.log(big), big, math.log(big)]
    if concentric:
        lo = np.concatenate([[-0.5, -0.5], np.tile(lo_per, k)])
        hi = np.concatenate([[w - 0.5, h - 0.5], np.tile(hi_per, k)])
    else:
        lo = np.tile(np.concatenate([[-0.5, -0.5], lo_per]), k)
        hi = np.tile(np.concatenate([[w - 0.5, h - 0.5], hi_per]), k)
    theta0 = np.clip(theta0, lo + 1e-9, hi - 1e-9)

    # 2. Residuals = pixel residuals + weighted constraint rows, all functionals of the model image.
    cache: dict[str, Any] = {}

    def evaluate(theta):
        key = theta.tobytes()
        if cache.get("key") != key:
            m, jac = _psf_model_and_jac(theta, k, concentric, xs, ys)
            rows, jrows = [m - flat_img], [jac]
            if moment_weight > 0:
                f = m.sum()
                mx, my = (m * xg).sum() / f, (m * yg).sum() / f
                dx, dy = xg - mx, yg - my
                mxx, myy, mxy = (m * dx * dx).sum() / f, (m * dy * dy).sum() / f, (m * dx * dy).sum() / f
                c = moment_weight * scale / mom["T"]
                rows.append(c * np.array([mxx - mom["xx"], myy - mom["yy"], mxy - mom["xy"]]))
                dmom = np.stack([dx * dx - mxx, dy * dy - myy, dx * dy - mxy]) / f  # d(moment)/d(pixel)
                jrows.append(c * (jac @ dmom.T))
            if halfmax is not None:
                c = fwhm_weight * scale * 2.0
                rows.append(c * np.array([halfmax @ m]))
                jrows.append(c * (jac @ halfmax)[:, None])
            extra = np.concatenate(jrows[1:], axis=1) if len(jrows) > 1 else None
            cache.update(key=key, r=np.concatenate(rows), j=(jac, extra))
        return cache["r"], cache["j"]

    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        res = _levenberg_marquardt(evaluate, theta0, lo, hi, max_iter=max_nfev)
    la, cx, cy, a, b, c = _unpack(res["x"], k, concentric)
    amp = np.exp(la)
    l11, l22 = np.exp(a), np.exp(c)
    cxx, cxy, cyy = l11 * l11, l11 * b, b * b + l22 * l22
    s = float(pixel_scale_arcsec)
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    mixture = GaussianMixture(
        amp / amp.sum(),
        (np.stack([cx, cy], axis=1) - centre) * s,
        np.stack([np.stack([cxx, cxy], -1), np.stack([cxy, cyy], -1)], -2) * s * s,
    )
    # 3. Quality of the returned (unit-flux) mixture rendered on the stamp.
    rendered = render_mixture(mixture, shape=(h, w), pixel_scale_arcsec=s)
    model_fit = evaluate(res["x"])[0][: h * w] + flat_img
    r = model_fit - flat_img
    mm = image_moments(rendered)
    fwhm_img = measure_fwhm(img, pixel_scale_arcsec=s)
    fwhm_mod = measure_fwhm(rendered, pixel_scale_arcsec=s)
    mom_err = max(abs(mm["xx"] / mom["xx"] - 1.0), abs(mm["yy"] / mom["yy"] - 1.0),
                  abs(mm["xy"] - mom["xy"]) / mom["T"])
    info = {
        "frac_rms": float(np.sqrt((r * r).sum()) / scale),
        "max_resid": float(np.abs(r).max() / img.max()),
        "fwhm_image_arcsec": fwhm_img,
        "fwhm_model_arcsec": fwhm_mod,
        "fwhm_rel_err": float(fwhm_mod / fwhm_img - 1.0),
        "moments_image": mom,
        "moments_model": mm,
        "moment_rel_err": float(mom_err),
        "T_rel_err": float(mm["T"] / mom["T"] - 1.0),
        "flux_in_stamp": float(rendered.sum()),
        "n_gauss": k,
        "success": bool(res["success"]),
        "nfev": int(res["nfev"]),
        "message": str(res["message"]),
    }
    return mixture, info
