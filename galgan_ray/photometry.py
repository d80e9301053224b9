"""Simultaneous Gaussian-mixture photometry of blended sources, batched over cutouts in torch.

The paper (Hemmati et al. 2022) measures fluxes with ngmix: every galaxy of a blend is a Gaussian
mixture (exponential, de Vaucouleurs or Gaussian profile) convolved analytically with a Gaussian
mixture of the PSF, and all galaxies of a cutout are fitted together to the low-resolution image
at the positions found on the GAN-enhanced image. :func:`fit_fluxes` does that for N cutouts at once:

1. every source ``s`` of a cutout has a flux ``F`` and nonlinear parameters: centre ``(x, y)``
   (free within ``allow_shift_px`` of the given position), size ``T`` (second moment, from the
   half-light radius) and ellipticity ``(e1, e2)``; the model image is
   ``sum_s F_s g_s(x_s, y_s, T_s, e_s)`` with ``g_s`` the unit-flux PSF-convolved profile sampled
   at pixel centres (see :mod:`galgan_ray.gmm` on why no extra pixel integration is needed);
2. the fluxes enter linearly: they start at the exact weighted linear least-squares solution for
   the initial shapes (the S x S normal equations of every cutout solved in one batched call),
   which is also the whole fit in ``mode="forced"``;
3. otherwise all parameters of all sources of a cutout are refined together by Levenberg-Marquardt
   on the weighted chi^2 (analytic derivatives of the Gaussians, one damping factor per cutout,
   every cutout in one batched solve); bounds are smooth reparameterisations (tanh for the
   centre shift, a logistic for ln T, ``e = e_max w / sqrt(1 + |w|^2)`` for the ellipticity) and
   weak Gaussian priors on ln(size) and ellipticity keep faint sources well posed;
4. errors come from the Fisher matrix of the weighted least squares at the solution (plus the
   weak priors): the flux error is marginalised over the other free parameters (centre, size,
   shape, the other sources). Pulls are unit-normal where photon noise dominates; at S/N above
   ~50 the mixtures' approximation of the true profile (~0.1-0.5% in flux, more in tight blends)
   becomes comparable to the error and pulls widen.

Flags (bits of :data:`galgan_ray.flags.FLAGS`): ``FIT_FAILED`` (no convergence within
``max_iter``, a non-finite result, or a flux the data do not constrain), ``FIT_SHIFTED`` (the
centre ran to the shift limit), ``EDGE`` (the source lies within ``edge_margin_px`` of the image
border), ``NONFINITE`` (non-finite pixels were masked in the cutout).

Speed: about 0.6-1.3 ms per source on one contended CPU core for two-source 22x22 blends
(``bench/bench_photometry.py``); the full-size work is one exp and one small matrix product per
(real source, component, pixel) -- padding slots and fixed parameters cost nothing there -- all
else is per-source. Each Levenberg-Marquardt iteration also has a fixed cost of about 1 ms (some
hundred small torch operations), so few cutouts per call, or a long tail of slow fits, cost more per
source (a field tile: ``bench/bench_tile.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from .errors import ConfigError, InputError
from .flags import flag_bit
from .gmm import GaussianMixture, T_to_hlr, hlr_to_T, profile_coefficients
from .instrument import NJY_ZEROPOINT

__all__ = ["PhotometryConfig", "PhotometryComputeConfig", "fit_fluxes", "measure_input_fluxes"]

_NPAR = 6  # per source: flux, x, y, ln T, e1, e2
_LOG_FLOOR = -300.0  # smallest log of a Gaussian component evaluated (see _Problem.templates)
_CHUNK_ELEMENTS = 1 << 19  # sources x components x pixels evaluated at once (see _Problem._source_terms)
_EDGE = flag_bit("EDGE")
_FAILED = flag_bit("FIT_FAILED")
_SHIFTED = flag_bit("FIT_SHIFTED")
_NONFINITE = flag_bit("NONFINITE")


@dataclass(frozen=True)
class PhotometryConfig:
    """Science parameters of the Gaussian-mixture photometry.

    Attributes
    ----------
    model : {"exp", "dev", "gauss"}
        Galaxy profile (ngmix's ``exp`` was the paper's choice).
    mode : {"full", "round", "forced"}
        ``full``: flux, centre, size and ellipticity of every source; ``round``: flux, centre and
        size (ellipticity held at its initial value, 0 by default); ``forced``: fluxes only, at the
        given centres and shapes (a linear fit).
    fit_centre : bool
        Let centres move (``full`` and ``round`` only).
    allow_shift_px : float
        Largest shift of a centre from its given position, per axis, in pixels of the image fitted.
    hlr_init_arcsec : float
        Initial (or, when forced, fixed) half-light radius where none is given per source.
    hlr_min_arcsec, hlr_max_arcsec : float
        Bounds on the half-light radius.
    size_prior_sigma : float or None
        Width of a Gaussian prior on ln(hlr) about its initial value (None: no prior).
    e_max : float
        Bound on |e| (distortion).
    e_prior_sigma : float or None
        Width of a Gaussian prior on e1 and e2 about 0 (None: no prior).
    max_iter : int
        Levenberg-Marquardt iterations at most.
    tol_chi2 : float
        Converged when the Newton decrement (the chi^2 decrease a full Gauss-Newton step would
        still bring), over the parameters not pinned at a bound, is below this times
        max(1, chi^2 / dof): where one profile misfits a galaxy, the flux error scales with the
        reduced chi^2 and so does what "no further change" means.
    edge_margin_px : float
        Sources closer than this to the image border (pixel edges) get the ``EDGE`` flag.
    shift_flag_fraction : float
        ``FIT_SHIFTED`` when a fitted shift reaches this fraction of ``allow_shift_px``.
    """

    model: Literal["exp", "dev", "gauss"] = "exp"
    mode: Literal["full", "round", "forced"] = "full"
    fit_centre: bool = True
    allow_shift_px: float = 0.75
    hlr_init_arcsec: float = 0.3
    hlr_min_arcsec: float = 0.01
    hlr_max_arcsec: float = 3.0
    size_prior_sigma: float | None = 2.0
    e_max: float = 0.9
    e_prior_sigma: float | None = 0.5
    max_iter: int = 40
    tol_chi2: float = 1e-3
    edge_margin_px: float = 2.0
    shift_flag_fraction: float = 0.98

    def __post_init__(self):
        if self.model not in ("exp", "dev", "gauss"):
            raise ConfigError("photometry.model", f"must be exp, dev or gauss, got {self.model!r}")
        if self.mode not in ("full", "round", "forced"):
            raise ConfigError("photometry.mode", f"must be full, round or forced, got {self.mode!r}")
        if not self.allow_shift_px >= 0:
            raise ConfigError("photometry.allow_shift_px", f"must be >= 0, got {self.allow_shift_px}")
        if not 0 < self.hlr_min_arcsec <= self.hlr_init_arcsec <= self.hlr_max_arcsec:
            raise ConfigError("photometry.hlr_init_arcsec",
                              "need 0 < hlr_min_arcsec <= hlr_init_arcsec <= hlr_max_arcsec")
        if not 0 < self.e_max < 1:
            raise ConfigError("photometry.e_max", f"must be in (0, 1), got {self.e_max}")
        for name in ("size_prior_sigma", "e_prior_sigma"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"photometry.{name}", f"must be > 0 or null, got {v}")
        if self.max_iter < 1:
            raise ConfigError("photometry.max_iter", f"must be >= 1, got {self.max_iter}")


@dataclass(frozen=True)
class PhotometryComputeConfig:
    """Compute knobs of the photometry (kept apart from the science, see ARCHITECTURE.md).

    Attributes
    ----------
    device : str or None
        torch device; None picks ``"cuda"`` when available, else ``"cpu"``.
    dtype : {"float64", "float32"}
        Precision of the model images (normal equations are always accumulated in float64).
    batch_size : int
        Cutouts evaluated together (memory grows as batch x sources x components x pixels).
    """

    device: str | None = None
    dtype: Literal["float64", "float32"] = "float64"
    batch_size: int = 256

    def __post_init__(self):
        if self.dtype not in ("float64", "float32"):
            raise ConfigError("photometry_compute.dtype", f"must be float64 or float32, got {self.dtype!r}")
        if self.batch_size < 1:
            raise ConfigError("photometry_compute.batch_size", f"must be >= 1, got {self.batch_size}")


# -- inputs ---------------------------------------------------------------------------------------
def _pad_centres(centres, n: int, n_sources, source_mask) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, 2) float64 centres and (N, S) bool mask from a list or a padded array."""
    if isinstance(centres, np.ndarray) or torch.is_tensor(centres):
        arr = np.asarray(centres, dtype=np.float64)
        if arr.ndim == 2 and n == 1:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[0] != n or arr.shape[2] != 2:
            raise InputError("centres", f"expected shape (N={n}, S, 2), got {arr.shape}")
        mask = np.ones(arr.shape[:2], dtype=bool)
        if source_mask is not None:
            mask = np.asarray(source_mask, dtype=bool)
            if mask.shape != arr.shape[:2]:
                raise InputError("source_mask", f"expected shape {arr.shape[:2]}, got {mask.shape}")
        elif n_sources is not None:
            counts = np.broadcast_to(np.asarray(n_sources, dtype=np.int64), (n,))
            mask = np.arange(arr.shape[1])[None, :] < counts[:, None]
        return arr, mask & np.all(np.isfinite(arr), axis=2)
    if len(centres) != n:
        raise InputError("centres", f"expected {n} entries (one per cutout), got {len(centres)}")
    rows = [np.asarray(c, dtype=np.float64).reshape(-1, 2) for c in centres]
    s_max = max([len(r) for r in rows] + [1])
    arr = np.zeros((n, s_max, 2))
    mask = np.zeros((n, s_max), dtype=bool)
    for i, r in enumerate(rows):
        arr[i, : len(r)] = r
        mask[i, : len(r)] = np.all(np.isfinite(r), axis=1)
    return arr, mask


def _psf_arrays(psf_mixture, n: int, pixel_scale: float):
    """PSF mixture(s) -> amplitudes (P, J), centres (P, J, 2), covariances (P, J, 2, 2) in px; P in {1, N}."""
    mixes = [psf_mixture] if isinstance(psf_mixture, GaussianMixture) else list(psf_mixture)
    if len(mixes) not in (1, n):
        raise InputError("psf_mixture", f"expected one mixture or {n}, got {len(mixes)}")
    ks = {m.n_components for m in mixes}
    if len(ks) != 1:
        raise InputError("psf_mixture", f"all PSF mixtures need the same number of Gaussians, got {sorted(ks)}")
    amp = np.stack([m.amplitudes / m.amplitudes.sum() for m in mixes])
    cen = np.stack([m.centres for m in mixes]) / pixel_scale
    cov = np.stack([m.covariances for m in mixes]) / pixel_scale**2
    return amp, cen, cov


def _shape_init(shapes, key, mask, default):
    if shapes is None or key not in shapes or shapes[key] is None:
        return np.where(mask, default, 0.0)
    v = np.asarray(shapes[key], dtype=np.float64)
    if v.shape != mask.shape:
        raise InputError(f"shapes[{key!r}]", f"expected shape {mask.shape}, got {v.shape}")
    return np.where(mask & np.isfinite(v), v, default)


# -- the model ------------------------------------------------------------------------------------
class _Problem:
    """Everything fixed during the fit of one chunk of cutouts (torch tensors on one device).

    Fitted parameters per source are ``u = (flux, ux, uy, v, w1, w2)``, mapped to physical values
    by :meth:`physical`: ``x = x0 + shift * tanh(ux)`` (same for y), ``ln T = lo + (hi - lo) *
    sigmoid(v)``, ``e = e_max * w / sqrt(1 + |w|^2)``; the maps keep every trial inside its bounds
    and the problem smooth. ``free`` marks the parameters fitted (by source mask and mode).
    """

    def __init__(self, *, data, weight, x0, y0, mask, lnT0, psf, prof, cfg, hlr_px_bounds, dtype, device):
        self.dtype, self.device = dtype, device
        t = lambda a, dt=dtype: torch.tensor(np.asarray(a), dtype=dt, device=device)  # noqa: E731
        self.data, self.weight = t(data), t(weight)
        self.sqrt_weight = torch.sqrt(self.weight)
        b, h, w = data.shape
        self.shape = (b, h, w)
        self.xs, self.ys = t(np.arange(w, dtype=np.float64)), t(np.arange(h, dtype=np.float64))
        self.x0, self.y0 = t(x0, torch.float64), t(y0, torch.float64)
        self.mask = torch.as_tensor(mask, device=device)
        self.lnT0 = t(lnT0, torch.float64)  # centre of the size prior
        amp, cen, cov = psf
        self.psf_amp, self.psf_cen, self.psf_cov = t(amp), t(cen), t(cov)
        # Concentric PSF mixtures (every Gaussian on one centre) take the fast one-group path.
        self.concentric = bool(np.all(np.abs(cen - cen[:, :1]) < 1e-9))
        p, f = prof
        self.prof_p, self.prof_f = t(p), t(f)
        self.cfg = cfg
        self.shift = float(cfg.allow_shift_px)
        self.lnT_lo = math.log(float(hlr_to_T(cfg.model, hlr_px_bounds[0])))
        self.lnT_hi = math.log(float(hlr_to_T(cfg.model, hlr_px_bounds[1])))
        s = mask.shape[1]
        free = np.zeros((b, s, _NPAR), dtype=bool)
        free[..., 0] = mask
        if cfg.mode != "forced":
            if cfg.fit_centre and self.shift > 0:
                free[..., 1] = free[..., 2] = mask
            free[..., 3] = mask
            if cfg.mode == "full":
                free[..., 4] = free[..., 5] = mask
        self.free = torch.as_tensor(free.reshape(b, s * _NPAR), device=device)
        # The parameter types (0 flux, 1-2 centre, 3 ln T, 4-5 e) fitted for every real source: the
        # Jacobian and the Hessian are built for these only (fixed ones would be zero rows).
        types = [0]
        if cfg.mode != "forced":
            types += [1, 2] if cfg.fit_centre and self.shift > 0 else []
            types += [3, 4, 5] if cfg.mode == "full" else [3]
        self.free_types = types
        self.centre_free = 1 in types

    # parameter maps u -> physical ------------------------------------------------------------
    def physical(self, u, idx):
        """u (B, S, 6) of cutouts ``idx`` -> physical parameters and d(physical)/du (float64)."""
        x_t, y_t = torch.tanh(u[..., 1]), torch.tanh(u[..., 2])
        sig = torch.sigmoid(u[..., 3])
        span = self.lnT_hi - self.lnT_lo
        w1, w2 = u[..., 4], u[..., 5]
        s = torch.rsqrt(1.0 + w1 * w1 + w2 * w2)
        em = self.cfg.e_max
        return {
            "flux": u[..., 0],
            "x": self.x0[idx] + self.shift * x_t,
            "y": self.y0[idx] + self.shift * y_t,
            "lnT": self.lnT_lo + span * sig,
            "e1": em * w1 * s,
            "e2": em * w2 * s,
            "dx": self.shift * (1.0 - x_t * x_t),
            "dy": self.shift * (1.0 - y_t * y_t),
            "dlnT": span * sig * (1.0 - sig),
            # de_i/dw_j = e_max (delta_ij s - w_i w_j s^3)
            "de": em * torch.stack([torch.stack([s - w1 * w1 * s**3, -w1 * w2 * s**3], -1),
                                    torch.stack([-w1 * w2 * s**3, s - w2 * w2 * s**3], -1)], -2),
        }

    def to_u(self, x, y, lnT, e1, e2, flux):
        """Physical -> u (inverse maps), clipping into the open bounds."""
        f64 = torch.float64
        t = lambda a: torch.as_tensor(a, dtype=f64, device=self.device)  # noqa: E731
        if self.shift > 0:
            ux = torch.atanh(((t(x) - self.x0) / self.shift).clamp(-0.999, 0.999))
            uy = torch.atanh(((t(y) - self.y0) / self.shift).clamp(-0.999, 0.999))
        else:
            ux = uy = torch.zeros_like(self.x0)
        frac = ((t(lnT) - self.lnT_lo) / (self.lnT_hi - self.lnT_lo)).clamp(1e-6, 1 - 1e-6)
        v = torch.log(frac / (1.0 - frac))
        e1, e2 = t(e1), t(e2)
        em = self.cfg.e_max
        # |e| / e_max = |w| / sqrt(1 + |w|^2)  <=>  w = e / (e_max sqrt(1 - (|e| / e_max)^2))
        r = (torch.sqrt(e1 * e1 + e2 * e2) / em).clamp(max=0.999)
        scale = 1.0 / (em * torch.sqrt(1.0 - r * r))
        w1, w2 = e1 * scale, e2 * scale
        return torch.stack([t(flux), ux, uy, v, w1, w2], -1)

    # model images ----------------------------------------------------------------------------
    def templates(self, idx, x, y, lnT, e1, e2, jac: bool, centre: bool = True):
        """Unit-flux PSF-convolved profiles g (B, S, HW) and, with ``jac``, dg/d(x, y, lnT, e1, e2)
        (dg/d(lnT, e1, e2) without ``centre``: fixed centres need no centre derivatives).

        Component c = (PSF Gaussian j, profile Gaussian k) of source s has covariance
        ``C = t_k M(e) + Sigma_j`` (``t_k = T f_k / 2``, ``M`` the unit-determinant shape matrix)
        and centre ``(x_s, y_s) + m_j``. Components sharing a centre form a group (one group when
        the PSF mixture is concentric, else one per PSF Gaussian). With ``u = C^-1 d`` and
        ``d = pixel - centre``, the derivatives are ``sum_c G_c u_c`` (centre) and
        ``sum_c G_c (u_c^T dC_c u_c - tr(C_c^-1 dC_c)) / 2`` (ln T, e1, e2). Expanding u in the
        group's offsets dx, dy, every sum becomes (per-component coefficients) @ G -- one batched
        matrix product -- times polynomials in dx, dy, so only G itself is built at full size
        (batch x sources x components x pixels).
        """
        dt = self.dtype
        b, s = x.shape
        h, w = self.shape[1:]
        x, y, lnT, e1, e2 = (v.to(dt) for v in (x, y, lnT, e1, e2))
        amp_p, cen_p, cov_p = self.psf_amp, self.psf_cen, self.psf_cov
        if amp_p.shape[0] > 1:
            amp_p, cen_p, cov_p = amp_p[idx], cen_p[idx], cov_p[idx]
        p, f = self.prof_p, self.prof_f
        k, j = p.shape[0], amp_p.shape[1]
        ng, nk = (1, j * k) if self.concentric else (j, k)  # groups x components per group
        q = torch.rsqrt(1.0 - e1 * e1 - e2 * e2)
        mxx, mxy, myy = q * (1.0 + e1), q * e2, q * (1.0 - e1)
        tk = torch.exp(lnT)[..., None] * (0.5 * f)  # (B, S, K)
        # Component covariances, index c = j * K + k: (B, S, J, K) -> (B, S, ng, nk).
        sxx, sxy, syy = (cov_p[:, None, :, None, a, bb] for a, bb in ((0, 0), (0, 1), (1, 1)))
        tjk = tk[:, :, None, :]
        cxx = (tjk * mxx[..., None, None] + sxx).reshape(b, s, ng, nk)
        cxy = (tjk * mxy[..., None, None] + sxy).reshape(b, s, ng, nk)
        cyy = (tjk * myy[..., None, None] + syy).reshape(b, s, ng, nk)
        det = cxx * cyy - cxy * cxy
        pxx, pxy, pyy = cyy / det, -cxy / det, cxx / det
        amp = (amp_p[:, :, None] * p).reshape(amp_p.shape[0], 1, ng, nk)
        lognorm = torch.log(amp / (2.0 * math.pi)) - 0.5 * torch.log(det)
        if self.concentric:
            gx0, gy0 = x[..., None] + cen_p[:, None, :1, 0], y[..., None] + cen_p[:, None, :1, 1]
        else:
            gx0, gy0 = x[..., None] + cen_p[:, None, :, 0], y[..., None] + cen_p[:, None, :, 1]
        dx = self.xs - gx0[..., None]  # (B, S, ng, W)
        dy = self.ys - gy0[..., None]  # (B, S, ng, H)
        # log G = lognorm - (pxx dx^2 + 2 pxy dx dy + pyy dy^2) / 2 from row and column factors:
        # one broadcast add, one in-place addcmul and one in-place exp over the full-size tensor.
        ax = lognorm[..., None] - 0.5 * pxx[..., None] * (dx * dx)[:, :, :, None, :]  # (B,S,ng,nk,W)
        ay = -0.5 * pyy[..., None] * (dy * dy)[:, :, :, None, :]  # (B,S,ng,nk,H)
        cr = -pxy[..., None] * dy[:, :, :, None, :]  # (B,S,ng,nk,H)
        gc = ay[..., :, None] + ax[..., None, :]
        gc.addcmul_(cr[..., :, None], dx[:, :, :, None, None, :])
        # Far from a component log G runs to -1e4 and exp underflows to subnormals or 0, which x86
        # computes (and multiplies downstream) 10-80 times slower than normal numbers; a floor of
        # exp(_LOG_FLOOR) ~ 5e-131 per component changes no sum (it is 1e-100 of any relevant value).
        gc = gc.clamp_(min=_LOG_FLOOR).exp_().reshape(b, s, ng, nk, h * w)
        if not jac:
            g = gc.sum(3)
            return (g[:, :, 0] if ng == 1 else g.sum(2)), None
        # Shape-matrix derivatives D (xx, xy, yy) for ln T (M itself), e1, e2: (B, S, 3, 3).
        q2 = q * q
        dm = torch.stack([
            torch.stack([mxx, mxy, myy], -1),
            torch.stack([q + e1 * q2 * mxx, e1 * q2 * mxy, -q + e1 * q2 * myy], -1),
            torch.stack([e2 * q2 * mxx, q + e2 * q2 * mxy, e2 * q2 * myy], -1),
        ], -2)[:, :, None, :, None, :]  # (B, S, 1, 3, 1, 3)
        dxx, dxy, dyy = dm[..., 0], dm[..., 1], dm[..., 2]
        t_c = tk[:, :, None, :].expand(b, s, j, k).reshape(b, s, ng, 1, nk)
        a_, b_, c_ = pxx[:, :, :, None, :], pxy[:, :, :, None, :], pyy[:, :, :, None, :]
        one = torch.ones_like(pxx)
        # Coefficient rows: 0 g; 1-3 pxx, pxy, pyy; per shape parameter the dx^2, dx dy, dy^2
        # coefficients of u^T D u, then the traces tr(P D), all halved (exact: a power of two).
        t_c = 0.5 * t_c
        quad_xx = t_c * (dxx * a_ * a_ + 2.0 * dxy * a_ * b_ + dyy * b_ * b_)
        quad_xy = t_c * 2.0 * (dxx * a_ * b_ + dxy * (a_ * c_ + b_ * b_) + dyy * b_ * c_)
        quad_yy = t_c * (dxx * b_ * b_ + 2.0 * dxy * b_ * c_ + dyy * c_ * c_)
        trace = t_c * (a_ * dxx + 2.0 * b_ * dxy + c_ * dyy)
        first = [one, pxx, pxy, pyy] if centre else [one]
        nc = len(first)
        coef = torch.cat([torch.stack(first, 3),
                          torch.stack([quad_xx, quad_xy, quad_yy], 4).reshape(b, s, ng, 9, nk), trace], 3)
        mom = torch.matmul(coef, gc)  # (B, S, ng, nc + 12, HW)
        mom = mom.reshape(b, s, ng, nc + 12, h, w)
        ddx, ddy = dx[..., None, None, :], dy[..., None, :, None]  # (B,S,ng,1,1,W), (B,S,ng,1,H,1)
        g = mom[:, :, :, 0]
        qd = mom[:, :, :, nc:nc + 9].reshape(b, s, ng, 3, 3, h, w)
        # (u^T D u - tr(P D)) / 2 (the coefficients carry the 1/2).
        dshape = (qd[:, :, :, :, 0] * (ddx * ddx) + qd[:, :, :, :, 1] * (ddx * ddy)
                  + qd[:, :, :, :, 2] * (ddy * ddy) - mom[:, :, :, nc + 9:nc + 12])
        if centre:
            gxx = ddx[:, :, :, 0] * mom[:, :, :, 1] + ddy[:, :, :, 0] * mom[:, :, :, 2]
            gyy = ddx[:, :, :, 0] * mom[:, :, :, 2] + ddy[:, :, :, 0] * mom[:, :, :, 3]
            dshape = torch.cat([gxx[:, :, :, None], gyy[:, :, :, None], dshape], 3)
        dg = dshape[:, :, 0] if ng == 1 else dshape.sum(2)  # (B, S, 5 or 3, H, W)
        g = g[:, :, 0] if ng == 1 else g.sum(2)
        return g.reshape(b, s, h * w), dg.reshape(b, s, dg.shape[2], h * w)

    def _source_terms(self, src, x, y, lnT, e1, e2, amat, sqw, bi, want_jac: bool):
        """Templates g (R, HW) of R sources (cutout ``src``, parameters (R,)) and, with ``amat``,
        the whitened Jacobian rows ``amat @ [g, dg] * sqrt(weight)`` (R, F, HW).

        On CPU, sources are taken in chunks of about ``_CHUNK_ELEMENTS`` component-pixels: the
        largest temporaries (one Gaussian per component and pixel) then stay in the caches; one big
        batch runs up to three times slower per pixel. A GPU takes them all at once.
        """
        r, hw = len(src), self.shape[1] * self.shape[2]
        ncomp = self.prof_p.shape[0] * self.psf_amp.shape[1]
        step = max(1, _CHUNK_ELEMENTS // (ncomp * hw)) if torch.device(self.device).type == "cpu" else max(r, 1)
        gs, jus = [], []
        for a in range(0, max(r, 1), step):
            sl = slice(a, a + step)
            g, dg = self.templates(src[sl], x[sl, None], y[sl, None], lnT[sl, None], e1[sl, None], e2[sl, None],
                                   want_jac, centre=self.centre_free)
            g = g[:, 0]
            gs.append(g)
            if amat is not None:
                nf = amat.shape[1]
                # dg holds the derivatives in type order ((x, y,) ln T, e1, e2); the fitted ones are a prefix.
                base = torch.cat([g[:, None], dg[:, 0, :nf - 1]], 1) if want_jac else g[:, None]
                jus.append(torch.matmul(amat[sl], base * sqw.index_select(0, bi[sl])[:, None, :]))
        g = gs[0] if len(gs) == 1 else torch.cat(gs)
        ju = None if amat is None else (jus[0] if len(jus) == 1 else torch.cat(jus))
        return g, ju

    def source_templates(self, idx, ph):
        """Unit-flux templates of the real sources of cutouts ``idx`` only (padding slots are skipped):
        flat rows ``(cutout, slot)`` = ``(bi, si)`` and g ``(R, HW)``."""
        bi, si = torch.nonzero(self.mask[idx], as_tuple=True)
        pick = lambda k: ph[k][bi, si]  # noqa: E731
        g, _ = self._source_terms(idx[bi], pick("x"), pick("y"), pick("lnT"), pick("e1"), pick("e2"), None, None,
                                  bi, False)
        return bi, si, g

    def evaluate(self, idx, u, jac: bool = True):
        """chi^2 (with priors), gradient and Gauss-Newton Hessian in u, for cutouts ``idx``.

        The full-size work (templates, their derivatives, the Jacobian and its products) is done for
        the real sources of the cutouts only, as one flat batch (:meth:`_source_terms`), and for the
        parameter types that are fitted: source slots of padding, and fixed centres, cost nothing.
        """
        ph = self.physical(u, idx)
        mask = self.mask[idx]
        b, s = mask.shape
        dt, f64, dev = self.dtype, torch.float64, self.device
        types = self.free_types
        want_jac = jac and len(types) > 1  # fluxes only (forced): the templates are the Jacobian
        # 1. Templates of the real sources (flat rows r = (cutout bi, slot si)), and with ``jac`` their
        #    derivatives d(model)/du for the fitted types: A (R, F, F) @ [g, dg/d(type)], A holding the
        #    flux and the chain rule u -> physical (block diagonal by type).
        bi, si = torch.nonzero(mask, as_tuple=True)
        pick = lambda k: ph[k][bi, si]  # noqa: E731
        flux = pick("flux")
        data, sqw = self.data[idx].flatten(1), self.sqrt_weight[idx].flatten(1)
        r, nf = len(bi), len(types)
        amat = None
        if jac:
            amat = torch.zeros(r, _NPAR, _NPAR, dtype=f64, device=dev)
            amat[:, 0, 0] = 1.0
            amat[:, 1, 1] = flux * pick("dx")
            amat[:, 2, 2] = flux * pick("dy")
            amat[:, 3, 3] = flux * pick("dlnT")
            amat[:, 4:, 4:] = flux[:, None, None] * ph["de"][bi, si].transpose(-1, -2)
            tt = torch.as_tensor(types, device=dev)
            amat = amat[:, tt][:, :, tt].to(dt)
        g, ju = self._source_terms(idx[bi], pick("x"), pick("y"), pick("lnT"), pick("e1"), pick("e2"),
                                   amat, sqw, bi, want_jac)
        model = torch.zeros_like(data).index_add_(0, bi, flux.to(dt)[:, None] * g)
        resid = (data - model) * sqw  # whitened residuals
        chi2 = (resid * resid).sum(1).double()
        prior_r, prior_j = self._priors(ph, idx)
        chi2 = chi2 + (prior_r * prior_r).sum((1, 2))
        if not jac:
            return {"chi2": chi2}
        free = self.free[idx]
        # 2. Gradient and Hessian blocks cutout by cutout, batched over the cutouts holding the same
        #    number k of real sources (their rows are contiguous in ju: (k F, HW) per cutout).
        hw = ju.shape[-1]
        counts = mask.sum(1)
        hs = torch.zeros(b, s, s, nf, nf, dtype=f64, device=dev)
        gs = torch.zeros(b, s, nf, dtype=f64, device=dev)
        for k in torch.unique(counts[counts > 0]).tolist():
            cb = torch.nonzero(counts == k).flatten()
            rows = None if len(cb) * k == r else torch.nonzero(counts[bi] == k).flatten()
            juk = (ju if rows is None else ju.index_select(0, rows)).reshape(len(cb), k * nf, hw)
            sl = (si if rows is None else si[rows]).reshape(len(cb), k)
            blk = torch.bmm(juk, juk.transpose(1, 2)).double()
            hs[cb[:, None, None], sl[:, :, None], sl[:, None, :]] = blk.reshape(len(cb), k, nf, k, nf).transpose(2, 3)
            grad_k = torch.bmm(juk, resid.index_select(0, cb)[..., None])[..., 0].double()  # = -d(chi2/2)/du
            gs[cb[:, None], sl] = grad_k.reshape(len(cb), k, nf)
        full = torch.zeros(b, s, s, _NPAR, _NPAR, dtype=f64, device=dev)
        full[..., tt[:, None], tt[None, :]] = hs
        hess = full.permute(0, 1, 3, 2, 4).reshape(b, s * _NPAR, s * _NPAR)
        gfull = torch.zeros(b, s, _NPAR, dtype=f64, device=dev)
        gfull[..., tt] = gs
        grad = gfull.reshape(b, s * _NPAR)
        if prior_j.shape[1]:
            hess = hess + torch.einsum("bkp,bkq->bpq", prior_j, prior_j)
            grad = grad - torch.einsum("bkp,bk->bp", prior_j, prior_r.reshape(b, -1))
        # Fixed parameters: identity rows so every system stays solvable.
        hess = hess * (free[:, :, None] & free[:, None, :]) + torch.diag_embed((~free).double())
        grad = grad * free
        return {"chi2": chi2, "hess": hess, "grad": grad}

    def _priors(self, ph, idx):
        """Residuals (B, S*2+?) of the Gaussian priors and their Jacobian rows in u."""
        cfg = self.cfg
        free = self.free[idx].reshape(-1, self.mask.shape[1], _NPAR)
        b, s = free.shape[:2]
        rows_r, rows_j = [], []
        zero = torch.zeros(b, s, _NPAR, dtype=torch.float64, device=self.device)
        if cfg.size_prior_sigma is not None:
            sig = 2.0 * cfg.size_prior_sigma  # prior on ln hlr -> on ln T = 2 ln hlr + const
            on = free[..., 3].double()
            rows_r.append(on * (ph["lnT"] - self.lnT0[idx]) / sig)
            jr = zero.clone()
            jr[..., 3] = on * ph["dlnT"] / sig
            rows_j.append(jr)
        if cfg.e_prior_sigma is not None:
            sig = cfg.e_prior_sigma
            for comp, name in ((4, "e1"), (5, "e2")):
                on = free[..., comp].double()
                rows_r.append(on * ph[name] / sig)
                jr = zero.clone()
                jr[..., 4] = on * ph["de"][..., comp - 4, 0] / sig
                jr[..., 5] = on * ph["de"][..., comp - 4, 1] / sig
                rows_j.append(jr)
        if not rows_r:
            return torch.zeros(b, 0, s, dtype=torch.float64, device=self.device), \
                torch.zeros(b, 0, s * _NPAR, dtype=torch.float64, device=self.device)
        r = torch.stack(rows_r, 1)  # (B, R, S)
        jmat = torch.stack(rows_j, 1)  # (B, R, S, 6): row (r, s) depends only on source s
        # Expand to (B, R*S, S*6) block-diagonal over sources.
        eye = torch.eye(s, dtype=torch.float64, device=self.device)
        jfull = (jmat[:, :, :, None, :] * eye[None, None, :, :, None]).reshape(b, len(rows_r) * s, s * _NPAR)
        return r, jfull


# -- the fit --------------------------------------------------------------------------------------
def _solve(hess, grad, lam):
    """Damped step (H + lam diag(H)) d = g; a tiny ridge keeps degenerate systems solvable; rows whose
    solve fails return NaN (the step is then rejected)."""
    diag = torch.diagonal(hess, dim1=1, dim2=2)
    ridge = 1e-12 * diag.abs().amax(1, keepdim=True).clamp_min(1e-300)
    a = hess + torch.diag_embed(lam[:, None] * diag.clamp_min(0) + ridge)
    step, info = torch.linalg.solve_ex(a, grad[..., None])
    step = step[..., 0]
    return torch.where((info == 0)[:, None] & torch.isfinite(step).all(1, keepdim=True), step,
                       torch.full_like(step, float("nan")))


def _fit_chunk(prob: _Problem, u0: torch.Tensor, cfg: PhotometryConfig):
    """Levenberg-Marquardt on every cutout of the chunk at once.

    Returns the final u, chi^2 (with priors), Gauss-Newton Hessian, iterations and a converged mask.
    Cutouts leave the active set as soon as they converge, so later iterations cost less.
    """
    b = u0.shape[0]
    dev = prob.device
    all_idx = torch.arange(b, device=dev)
    u = u0.clone()
    st = prob.evaluate(all_idx, u)
    chi2, hess, grad = st["chi2"], st["hess"], st["grad"]
    lam = torch.full((b,), 1e-3, dtype=torch.float64, device=dev)
    n_iter = torch.zeros(b, dtype=torch.int64, device=dev)
    converged = torch.zeros(b, dtype=torch.bool, device=dev)
    if cfg.mode == "forced":  # linear: u0 already holds the exact least-squares fluxes
        converged[:] = True
        return u, chi2, hess, n_iter, converged

    def saturated(uu):
        """Parameters pinned at a bound (size at hlr_min/max, |e| at e_max, centre at the shift limit):
        the optimum lies on the bound, where the bounded parametrisation's gradient never vanishes."""
        sat = torch.zeros(uu.shape, dtype=torch.bool, device=uu.device)
        sig = torch.sigmoid(uu[..., 3])
        sat[..., 3] = (sig < 1e-3) | (sig > 1 - 1e-3)
        w2 = uu[..., 4] ** 2 + uu[..., 5] ** 2
        sat[..., 4] = sat[..., 5] = w2 / (1.0 + w2) > 0.99**2  # |e| > 0.99 e_max
        sat[..., 1] = torch.tanh(uu[..., 1]).abs() > 0.99
        sat[..., 2] = torch.tanh(uu[..., 2]).abs() > 0.99
        return sat.reshape(uu.shape[0], -1)

    def decrement(h, g, uu):
        # The Newton decrement over the free parameters that are not pinned at a bound (a projected
        # Newton test): a fit converged onto a bound is converged.
        sat = saturated(uu)
        keep = (~sat).double()
        hh = h * keep[:, :, None] * keep[:, None, :] + torch.diag_embed(sat.double())
        gg = g * keep
        step = _solve(hh, gg, torch.zeros(h.shape[0], dtype=h.dtype, device=h.device))
        return torch.nan_to_num((gg * step).sum(1), nan=float("inf"))

    # The tolerance is in units of the reduced chi^2 where the model misfits (chi^2 / dof > 1): a bright
    # galaxy that one profile cannot describe has its flux error scaled by it, and asking its fit for
    # an absolute 1e-3 in chi^2 of ~1e5 keeps it iterating to max_iter without changing its flux.
    n_pix = (prob.weight.flatten(1) > 0).sum(1).double()
    dof = (n_pix - prob.free.reshape(b, -1).sum(1).double()).clamp_min(1.0)

    def tol(idx):
        return cfg.tol_chi2 * (chi2[idx] / dof[idx]).clamp_min(1.0)

    converged = decrement(hess, grad, u) < tol(all_idx)
    for _ in range(cfg.max_iter):
        act = torch.nonzero(~converged).flatten()
        if act.numel() == 0:
            break
        step = _solve(hess[act], grad[act], lam[act])
        u_try = u[act] + step.reshape(-1, u.shape[1], _NPAR)
        tr = prob.evaluate(act, u_try)
        ok = torch.isfinite(tr["chi2"]) & (tr["chi2"] <= chi2[act]) & torch.isfinite(tr["hess"]).all((1, 2))
        n_iter[act] += 1
        acc = act[ok]
        u[acc] = u_try[ok]
        chi2[acc], hess[acc], grad[acc] = tr["chi2"][ok], tr["hess"][ok], tr["grad"][ok]
        lam[acc] = (lam[acc] / 3.0).clamp_min(1e-9)
        lam[act[~ok]] *= 5.0
        dec = decrement(hess[act], grad[act], u[act])
        converged[act] = (dec < tol(act)) | (lam[act] > 1e9) & (dec < 100 * tol(act))
    return u, chi2, hess, n_iter, converged


def fit_fluxes(
    images: np.ndarray,
    *,
    centres: np.ndarray | Sequence[np.ndarray],
    psf_mixture: GaussianMixture | Sequence[GaussianMixture],
    noise_sigma: float | np.ndarray | None = None,
    variance: np.ndarray | None = None,
    pixel_scale_arcsec: float = 0.18,
    n_sources: np.ndarray | None = None,
    source_mask: np.ndarray | None = None,
    shapes: dict[str, np.ndarray] | None = None,
    config: PhotometryConfig = PhotometryConfig(),
    compute: PhotometryComputeConfig = PhotometryComputeConfig(),
) -> dict[str, np.ndarray]:
    """Fit all sources of each cutout simultaneously with PSF-convolved Gaussian-mixture profiles.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, H, W)`` single-band cutouts (``(H, W)`` for one), image units per pixel (nJy/px).
    centres : array or list
        Source positions ``(x, y)`` in 0-based pixels of ``images``: a list of N arrays ``(S_i, 2)``,
        or a padded array ``(N, S, 2)`` with ``n_sources`` or ``source_mask`` (NaN rows count as
        padding too).
    psf_mixture : GaussianMixture or sequence of GaussianMixture
        Unit-flux PSF mixture in arcsec (from :func:`galgan_ray.gmm.fit_psf_mixture` on the PSF of
        this grid), one for all cutouts or one per cutout (same number of Gaussians).
    noise_sigma : float or numpy.ndarray, optional
        Per-pixel noise of each cutout: a scalar or ``(N,)``.
    variance : numpy.ndarray, optional
        ``(N, H, W)`` per-pixel variance (overrides ``noise_sigma``); pixels with a non-finite or
        non-positive variance, or a non-finite value, get zero weight.
    pixel_scale_arcsec : float
        Pixel scale of ``images``.
    n_sources, source_mask : numpy.ndarray, optional
        ``(N,)`` counts or ``(N, S)`` booleans telling real sources from padding in a padded
        ``centres`` array.
    shapes : dict, optional
        Initial (in ``forced`` mode: fixed) ``hlr_arcsec``, ``e1``, ``e2`` as ``(N, S)`` arrays
        (any subset; NaN entries take the config's defaults).
    config : PhotometryConfig
    compute : PhotometryComputeConfig

    Returns
    -------
    dict of numpy.ndarray
        Per source (N, S), NaN (flags 0) at padding:

        - ``flux``: total flux of the profile (image units x pixels, e.g. nJy);
        - ``flux_err``: its 1-sigma error from the Fisher matrix of the weighted least squares at
          the solution, marginalised over every other free parameter of the cutout;
        - ``x``, ``y``: fitted centre (0-based px); ``hlr_arcsec``: half-light radius;
          ``e1``, ``e2``: ellipticity;
        - ``flags``: int32 bits: ``FIT_FAILED`` (the cutout's fit did not converge, or this flux
          is non-finite or unconstrained -- its error is then inf), ``FIT_SHIFTED`` (the centre
          reached ``shift_flag_fraction`` of ``allow_shift_px``), ``EDGE`` (given or fitted
          centre within ``edge_margin_px`` of the border), ``NONFINITE`` (the cutout had
          non-finite pixels, masked);
        - ``source_mask``: bool, True for real sources.

        Per cutout (N,): ``chi2`` (weighted, without priors), ``dof`` (weighted pixels minus free
        parameters), ``n_iter`` (Levenberg-Marquardt iterations), ``converged`` (bool).
        And ``flux_cov``: ``(N, S, S)`` covariance of the fluxes.
    """
    imgs = np.asarray(images.detach().cpu() if torch.is_tensor(images) else images, dtype=np.float64)
    if imgs.ndim == 2:
        imgs = imgs[None]
    if imgs.ndim != 3:
        raise InputError("images", f"expected (N, H, W), got shape {imgs.shape}")
    n, h, w = imgs.shape
    if not pixel_scale_arcsec > 0:
        raise InputError("pixel_scale_arcsec", f"must be > 0, got {pixel_scale_arcsec}")
    cen, mask = _pad_centres(centres, n, n_sources, source_mask)
    cen = np.where(mask[..., None], cen, 0.0)  # padding (possibly NaN) -> a harmless finite position
    s_max = cen.shape[1]

    # 1. Weights: 1/variance; non-finite pixels or variances get zero weight.
    if variance is not None:
        var = np.asarray(variance, dtype=np.float64)
        if var.shape != imgs.shape:
            raise InputError("variance", f"expected shape {imgs.shape}, got {var.shape}")
    elif noise_sigma is not None:
        sig = np.asarray(noise_sigma, dtype=np.float64)
        if sig.ndim == 0:
            sig = np.full(n, float(sig))
        if sig.shape != (n,):
            raise InputError("noise_sigma", f"expected a scalar or shape ({n},), got {sig.shape}")
        var = np.broadcast_to((sig * sig)[:, None, None], imgs.shape)
    else:
        raise InputError("fit_fluxes", "give noise_sigma or variance")
    finite = np.isfinite(imgs)
    good = finite & np.isfinite(var) & (var > 0)
    weight = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0)
    data = np.where(finite, imgs, 0.0)
    nonfinite = ~finite.all(axis=(1, 2))

    # 2. Initial values and fixed quantities.
    hlr0 = _shape_init(shapes, "hlr_arcsec", mask, config.hlr_init_arcsec)
    hlr0 = np.clip(hlr0, config.hlr_min_arcsec * 1.001, config.hlr_max_arcsec * 0.999)
    e10 = _shape_init(shapes, "e1", mask, 0.0)
    e20 = _shape_init(shapes, "e2", mask, 0.0)
    esq = e10**2 + e20**2
    shrink = np.where(esq > (0.98 * config.e_max) ** 2, 0.98 * config.e_max / np.sqrt(np.maximum(esq, 1e-300)), 1.0)
    e10, e20 = e10 * shrink, e20 * shrink
    lnT0 = np.log(hlr_to_T(config.model, hlr0 / pixel_scale_arcsec))
    psf = _psf_arrays(psf_mixture, n, pixel_scale_arcsec)
    prof = profile_coefficients(config.model)
    device = compute.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float64 if compute.dtype == "float64" else torch.float32
    hlr_px_bounds = (config.hlr_min_arcsec / pixel_scale_arcsec, config.hlr_max_arcsec / pixel_scale_arcsec)

    out = {k: np.full((n, s_max), np.nan) for k in ("flux", "flux_err", "x", "y", "hlr_arcsec", "e1", "e2")}
    out["flux_cov"] = np.full((n, s_max, s_max), np.nan)
    out["chi2"] = np.full(n, np.nan)
    out["dof"] = np.zeros(n, dtype=np.int64)
    out["n_iter"] = np.zeros(n, dtype=np.int64)
    out["converged"] = np.zeros(n, dtype=bool)
    flags = np.zeros((n, s_max), dtype=np.int32)

    bs = compute.batch_size
    with torch.no_grad():
        for start in range(0, n, bs):
            sl = slice(start, min(start + bs, n))
            rows = np.arange(sl.start, sl.stop)
            if not mask[sl].any():
                continue
            psf_c = psf if psf[0].shape[0] == 1 else tuple(a[sl] for a in psf)
            prob = _Problem(data=data[sl], weight=weight[sl], x0=cen[sl, :, 0], y0=cen[sl, :, 1], mask=mask[sl],
                            lnT0=lnT0[sl], psf=psf_c, prof=prof, cfg=config,
                            hlr_px_bounds=hlr_px_bounds, dtype=dtype, device=device)
            res = _fit_one_batch(prob, cen[sl], lnT0[sl], e10[sl], e20[sl], config)
            for key in ("flux", "flux_err", "x", "y", "e1", "e2"):
                out[key][rows] = res[key]
            out["hlr_arcsec"][rows] = T_to_hlr(config.model, np.exp(res["lnT"])) * pixel_scale_arcsec
            out["flux_cov"][rows] = res["flux_cov"]
            out["chi2"][rows] = res["chi2"]
            out["n_iter"][rows] = res["n_iter"]
            out["converged"][rows] = res["converged"]
            n_free = res["n_free"]
            out["dof"][rows] = (weight[sl] > 0).sum(axis=(1, 2)) - n_free
            flags[rows] |= np.where(res["shifted"], _SHIFTED, 0).astype(np.int32)
            bad = ~res["converged"][:, None] | ~np.isfinite(res["flux"]) | ~np.isfinite(res["flux_err"])
            flags[rows] |= np.where(bad, _FAILED, 0).astype(np.int32)

    # 3. Flags that need no fit: edge proximity (given or fitted centre), masked non-finite pixels.
    def edge_dist(xy_x, xy_y):
        return np.minimum(np.minimum(xy_x + 0.5, w - 0.5 - xy_x), np.minimum(xy_y + 0.5, h - 0.5 - xy_y))

    with np.errstate(invalid="ignore"):
        near = (edge_dist(cen[..., 0], cen[..., 1]) < config.edge_margin_px) | (
            edge_dist(out["x"], out["y"]) < config.edge_margin_px)
    flags |= np.where(near, _EDGE, 0).astype(np.int32)
    flags |= np.where(nonfinite[:, None], _NONFINITE, 0).astype(np.int32)
    flags[~mask] = 0
    for key in ("flux", "flux_err", "x", "y", "hlr_arcsec", "e1", "e2"):
        out[key][~mask] = np.nan
    out["flags"] = flags
    out["source_mask"] = mask
    return out


def _fit_one_batch(prob: _Problem, cen, lnT0, e10, e20, cfg: PhotometryConfig) -> dict[str, np.ndarray]:
    """Initial linear fluxes, the nonlinear fit, and the Fisher errors for one chunk."""
    b, s = cen.shape[:2]
    dev = prob.device
    idx = torch.arange(b, device=dev)
    mask = prob.mask
    # 1. Exact linear fluxes at the initial shapes: (S x S) normal equations per cutout.
    u = prob.to_u(cen[..., 0], cen[..., 1], lnT0, e10, e20, np.zeros((b, s)))
    ph = prob.physical(u, idx)
    bi, si, g_r = prob.source_templates(idx, ph)
    g = torch.zeros(b, s, g_r.shape[1], dtype=torch.float64, device=dev)
    g[bi, si] = g_r.double()
    wgt, dat = prob.weight.flatten(1).double(), prob.data.flatten(1).double()
    a = torch.bmm(g * wgt[:, None, :], g.transpose(1, 2)) + torch.diag_embed((~mask).double())
    rhs = torch.bmm(g * wgt[:, None, :], dat[..., None])[..., 0]
    # pinv: a source with no weighted pixels (masked, off the image) must not break its cutout.
    flux0 = torch.matmul(torch.linalg.pinv(a, hermitian=True), rhs[..., None])[..., 0] * mask
    u[..., 0] = flux0
    # 2. Levenberg-Marquardt on everything free.
    u, chi2_tot, hess, n_iter, converged = _fit_chunk(prob, u, cfg)
    # 3. Covariance: inverse Fisher matrix (fixed parameters carry identity rows, decoupled).
    finite = torch.isfinite(hess).all((1, 2))
    hess_safe = torch.where(finite[:, None, None], hess, torch.eye(hess.shape[1], dtype=hess.dtype, device=dev))
    cov = torch.linalg.pinv(hess_safe, hermitian=True)
    fidx = torch.arange(s, device=dev) * _NPAR
    flux_cov = cov[:, fidx][:, :, fidx]
    ph = prob.physical(u, idx)
    prior_r, _ = prob._priors(ph, idx)
    chi2 = chi2_tot - (prior_r * prior_r).sum((1, 2))
    shifted = torch.zeros((b, s), dtype=torch.bool, device=dev)
    free = prob.free.reshape(b, s, _NPAR)
    if prob.shift > 0:
        lim = cfg.shift_flag_fraction
        shifted = free[..., 1] & ((torch.tanh(u[..., 1]).abs() >= lim) | (torch.tanh(u[..., 2]).abs() >= lim))
    np_ = lambda t: t.detach().cpu().numpy()  # noqa: E731
    var_f = torch.diagonal(flux_cov, dim1=1, dim2=2)
    flux_err = torch.where(var_f > 0, torch.sqrt(var_f.clamp_min(0)), torch.full_like(var_f, float("nan")))
    # A source whose template carries (next to) no weighted signal -- off the image, or on masked
    # pixels only -- has an unconstrained flux: infinite error (and so FIT_FAILED).
    info_f = torch.diagonal(hess, dim1=1, dim2=2)[:, fidx] * mask
    blind = mask & (info_f <= 1e-10 * info_f.amax(1, keepdim=True).clamp_min(1e-300))
    flux_err = torch.where(blind, torch.full_like(flux_err, float("inf")), flux_err)
    return {
        "flux": np_(ph["flux"]), "flux_err": np_(flux_err), "flux_cov": np_(flux_cov),
        "x": np_(ph["x"]), "y": np_(ph["y"]), "lnT": np_(ph["lnT"]), "e1": np_(ph["e1"]), "e2": np_(ph["e2"]),
        "chi2": np_(chi2), "n_iter": np_(n_iter), "converged": np_(converged & finite),
        "n_free": np_(free.sum((1, 2))), "shifted": np_(shifted),
    }


def measure_input_fluxes(
    images_hr: np.ndarray,
    *,
    centres: np.ndarray | Sequence[np.ndarray],
    psf_mixture: GaussianMixture,
    noise_sigma: float | np.ndarray | None = None,
    variance: np.ndarray | None = None,
    pixel_scale_arcsec: float = 0.06,
    zeropoint_mag: float = NJY_ZEROPOINT,
    n_sources: np.ndarray | None = None,
    source_mask: np.ndarray | None = None,
    config: PhotometryConfig = PhotometryConfig(),
    compute: PhotometryComputeConfig = PhotometryComputeConfig(),
) -> dict[str, np.ndarray]:
    """Input fluxes and magnitudes: the fit on high-resolution cutouts at the true positions (Fig. 7).

    The same simultaneous fit as :func:`fit_fluxes`, on the high-resolution image with the
    high-resolution PSF mixture, so that input and recovered magnitudes are measured alike.
    ``config.allow_shift_px`` is in pixels of ``images_hr``.

    Parameters
    ----------
    images_hr : numpy.ndarray
        ``(N, H, W)`` high-resolution cutouts (one band), image units per pixel.
    centres, noise_sigma, variance, n_sources, source_mask, config, compute
        As in :func:`fit_fluxes`, in high-resolution pixels.
    psf_mixture : GaussianMixture
        Mixture of the high-resolution PSF (arcsec).
    pixel_scale_arcsec : float
        Pixel scale of ``images_hr`` (0.06" for the paper's HST cutouts).
    zeropoint_mag : float
        AB magnitude of one image unit (31.4 for nJy).

    Returns
    -------
    dict of numpy.ndarray
        Every key of :func:`fit_fluxes`, plus ``mag`` (AB; NaN where flux <= 0) and ``mag_err``
        (``2.5 / ln 10 * flux_err / flux``), both ``(N, S)``.
    """
    res = fit_fluxes(images_hr, centres=centres, psf_mixture=psf_mixture, noise_sigma=noise_sigma,
                     variance=variance, pixel_scale_arcsec=pixel_scale_arcsec, n_sources=n_sources,
                     source_mask=source_mask, config=config, compute=compute)
    flux = res["flux"]
    with np.errstate(divide="ignore", invalid="ignore"):
        res["mag"] = np.where(flux > 0, zeropoint_mag - 2.5 * np.log10(flux), np.nan)
        res["mag_err"] = np.where(flux > 0, 2.5 / math.log(10.0) * res["flux_err"] / flux, np.nan)
    return res
