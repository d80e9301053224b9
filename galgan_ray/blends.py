"""Blends of two or more galaxies with truth tables, and the matching set of isolated galaxies.

A blend is built from HR cutouts of the galaxy set (each galaxy centred at ((n-1)/2, (n-1)/2), the
catalog position): every galaxy is rotated about the cutout centre and shifted (cubic-spline
interpolation, flux conserving to ~1e-4 for resolved galaxies), and the shifted cutouts are summed.
With ``placement="centred"`` the first galaxy lands near the centre with a small random offset
(the paper's blends), each further one at a drawn separation and a uniform random position angle
from the first. With ``placement="anywhere"`` the same configuration of galaxies is moved as a whole
to a uniformly random position where every galaxy stays ``edge_margin_arcsec`` inside the cutout:
no position in the cutout is special, so a model trained on them cannot learn where galaxies sit
and a benchmark made of them catches one that did. Truth positions are where the
catalog position of each galaxy lands, so they follow the flux. The HR sum is then degraded with
:mod:`galgan_ray.degrade`.

Every blend draws from its own generator ``np.random.default_rng([seed, blendId])`` (isolated
galaxies from ``[seed, blendId, 1]``), so a blend does not depend on the batch it was made in.

Definitions used in the tables ("the pair" is the two brightest galaxies of a blend in the
reference band ``ref_band``, primary = brighter):

- ``sep_arcsec``: distance between the truth positions of the pair;
- ``delta_mag = mag_secondary - mag_primary`` (>= 0), ``flux_ratio = flux_secondary / flux_primary``
  (<= 1), catalog magnitudes/fluxes of the reference band;
- ``sum_fwhm_arcsec = fwhm_primary + fwhm_secondary`` (catalog FWHM);
- ``size`` is the catalog *flux radius* (half-light radius, arcsec), and
  ``sep_over_size = sep_arcsec / sqrt(flux_radius_primary**2 + flux_radius_secondary**2)``;
- ``delta_z = |z_primary - z_secondary|``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from .degrade import DegradeConfig, get_degrader
from .errors import ConfigError, InputError
from .flags import flag_bit, without_flags
from .geometry import hr_to_lr_pixels, make_tan_wcs
from .instrument import NJY_ZEROPOINT

__all__ = ["BlendConfig", "simulate_blends", "simulate_isolated"]

_ISOLATED_STREAM = 1  # third entry of the isolated set's per-item seeds, to keep it apart from blends


@dataclass(frozen=True)
class BlendConfig:
    """How blends are drawn from a galaxy set.

    Attributes
    ----------
    n_galaxies : int
        Galaxies per blend (2 as in the paper; 3 or more allowed).
    separation : {"half_normal", "uniform"}
        Distribution of the distance of each further galaxy from the first: ``|N(0, sep_scale)|``
        truncated to ``[min_sep, max_sep]`` (by redrawing), or uniform in ``[min_sep, max_sep]``.
    sep_scale_arcsec : float
        Scale (sigma) of the half-normal distribution.
    min_sep_arcsec, max_sep_arcsec : float
        Limits of the separation. The second galaxy must stay inside the HR cutout
        (1.92" from the centre for 64 px at 0.06").
    center_offset_arcsec : float
        ``placement="centred"``: the first galaxy is offset from the cutout centre uniformly within
        +-this along each axis.
    placement : {"centred", "anywhere"}
        Where the blend goes in the cutout (module docstring).
    edge_margin_arcsec : float
        ``placement="anywhere"``: every galaxy's position stays this far inside the cutout's edges.
    subpixel_shifts : bool
        Random sub-pixel positions; ``False`` rounds every shift to whole HR pixels (no
        interpolation unless rotating by arbitrary angles).
    rotation : {"quarter", "arbitrary", "none"}
        Random rotation of each galaxy about its centre: multiples of 90 deg (exact), any angle
        (cubic-spline interpolation), or none.
    max_delta_mag : float or None
        If set, the further galaxies are drawn among those within this many magnitudes of the
        first one (reference band).
    ref_band : int
        Channel of the galaxy set used for magnitudes, flux ratios and pair ordering.
    exclude_flags : tuple of str
        Galaxies with any of these flags (``flags.FLAGS`` names) are not used.
    interpolation_order : int
        Spline order of the sub-pixel shifts and rotations (1..5).
    edge_keep_fraction : float
        A placed galaxy that keeps less than this fraction of its stamp's flux (reference band)
        inside the cutout gets the ``EDGE`` flag: part of it was moved off the cutout.
    seed : int
        Default seed of :func:`simulate_blends` / :func:`simulate_isolated`.
    """

    n_galaxies: int = 2
    separation: Literal["half_normal", "uniform"] = "half_normal"
    sep_scale_arcsec: float = 1.0
    min_sep_arcsec: float = 0.1
    max_sep_arcsec: float = 1.5
    center_offset_arcsec: float = 0.06
    placement: Literal["centred", "anywhere"] = "centred"
    edge_margin_arcsec: float = 0.3
    subpixel_shifts: bool = True
    rotation: Literal["quarter", "arbitrary", "none"] = "quarter"
    max_delta_mag: float | None = None
    ref_band: int = 0
    exclude_flags: tuple[str, ...] = ()
    interpolation_order: int = 3
    edge_keep_fraction: float = 0.95
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "exclude_flags", tuple(self.exclude_flags))
        if self.n_galaxies < 1:
            raise ConfigError("blends.n_galaxies", f"must be >= 1, got {self.n_galaxies}")
        if not 0 <= self.min_sep_arcsec <= self.max_sep_arcsec:
            raise ConfigError("blends.min_sep_arcsec", f"need 0 <= min_sep <= max_sep, got {self.min_sep_arcsec}, "
                                                       f"{self.max_sep_arcsec}")
        if self.separation == "half_normal" and not self.sep_scale_arcsec > 0:
            raise ConfigError("blends.sep_scale_arcsec", f"must be > 0, got {self.sep_scale_arcsec}")
        if self.separation not in ("half_normal", "uniform"):
            raise ConfigError("blends.separation", f"unknown distribution {self.separation!r}")
        if self.rotation not in ("quarter", "arbitrary", "none"):
            raise ConfigError("blends.rotation", f"unknown rotation {self.rotation!r}")
        if self.placement not in ("centred", "anywhere"):
            raise ConfigError("blends.placement", f"must be centred or anywhere, got {self.placement!r}")
        if self.edge_margin_arcsec < 0:
            raise ConfigError("blends.edge_margin_arcsec", f"must be >= 0, got {self.edge_margin_arcsec}")
        if self.center_offset_arcsec < 0:
            raise ConfigError("blends.center_offset_arcsec", "must be >= 0")
        if self.max_delta_mag is not None and not self.max_delta_mag >= 0:
            raise ConfigError("blends.max_delta_mag", f"must be >= 0 or null, got {self.max_delta_mag}")
        if not 0.0 <= self.edge_keep_fraction <= 1.0:
            raise ConfigError("blends.edge_keep_fraction", f"must be in [0, 1], got {self.edge_keep_fraction}")
        if not 1 <= self.interpolation_order <= 5:
            raise ConfigError("blends.interpolation_order", f"must be 1..5, got {self.interpolation_order}")
        for name in self.exclude_flags:
            try:
                flag_bit(name)
            except KeyError as exc:
                raise ConfigError("blends.exclude_flags", str(exc)) from None


# --------------------------------------------------------------------------------------------- placing
def _shift_matrix(shift: float, n: int, order: int) -> np.ndarray:
    """(n, n) matrix S with ``S @ v`` = ``v`` shifted by ``shift`` px (spline of ``order``, zeros outside).

    A shift of a zero-padded signal is a convolution, so S is the Toeplitz matrix of the impulse
    response (computed once on a 2n+1 line, where the spline's edge effects have decayed to ~1e-30).
    The tensor-product spline is separable, so ``Sy @ img @ Sx.T`` is ``ndimage.shift(img, (dy, dx),
    mode="grid-constant")`` at the cost of two small matrix products.
    """
    if float(shift).is_integer():
        return np.eye(n, k=-int(shift))
    impulse = np.zeros(2 * n + 1)
    impulse[n] = 1.0
    h = ndimage.shift(impulse, shift, order=order, mode="grid-constant")
    i = np.arange(n)
    return h[n + i[:, None] - i[None, :]]


def _place(images: np.ndarray, *, angle_deg: float, dx: float, dy: float, order: int) -> np.ndarray:
    """Rotate ``images`` (C, n, n) counter-clockwise (x right, y up) by ``angle_deg`` about the
    centre ((n-1)/2, (n-1)/2), then shift by (dx, dy) HR pixels; zeros come in from outside."""
    n = images.shape[-1]
    q = angle_deg / 90.0
    if abs(q - round(q)) < 1e-9:  # exact: rot90 about the array centre, then a separable shift
        rotated = np.rot90(images, k=-int(round(q)) % 4, axes=(-2, -1))
        sy, sx = _shift_matrix(dy, n, order), _shift_matrix(dx, n, order)
        return (sy @ rotated.astype(np.float64) @ sx.T).astype(np.float32)
    # One interpolation for rotation + shift: output(p) = input(R^-1 (p - c - d) + c), in (y, x) order.
    th = np.deg2rad(angle_deg)
    cos, sin = np.cos(th), np.sin(th)
    r_yx = np.array([[cos, sin], [-sin, cos]])  # R acting on (x, y) = [[cos, -sin], [sin, cos]], axes swapped
    m = np.linalg.inv(r_yx)
    c = np.full(2, (n - 1) / 2.0)
    offset = c - m @ (c + np.array([dy, dx]))
    out = np.empty(images.shape, dtype=np.float32)
    for i, img in enumerate(images):
        out[i] = ndimage.affine_transform(np.asarray(img, dtype=np.float64), m, offset=offset, order=order,
                                          mode="grid-constant")
    return out


def _draw_separation(rng: np.random.Generator, config: BlendConfig) -> float:
    lo, hi = config.min_sep_arcsec, config.max_sep_arcsec
    if config.separation == "uniform" or hi == lo:
        return float(rng.uniform(lo, hi))
    for _ in range(1000):
        s = abs(rng.normal(0.0, config.sep_scale_arcsec))
        if lo <= s <= hi:
            return float(s)
    return float(rng.uniform(lo, hi))  # the window is far in the tail: fall back to uniform


# --------------------------------------------------------------------------------------------- galaxy set
class _GalaxySet:
    """Checked view of a galaxy set dict, with the columns the truth tables need."""

    def __init__(self, gs: dict, *, config: BlendConfig, degrade_config: DegradeConfig):
        if "image_hr" not in gs:
            raise InputError("galaxy_set", "has no 'image_hr' key")
        img = np.asarray(gs["image_hr"])
        if img.ndim != 4 or img.shape[-1] != img.shape[-2]:
            raise InputError("galaxy_set['image_hr']", f"expected (N, C, n, n), got shape {img.shape}")
        n, c = img.shape[:2]
        if "x_offset_px" in gs and "y_offset_px" in gs:
            # Integer-pixel cutouts (cutouts.cut_cutouts) hold the galaxy at centre + offset: shift it
            # onto the centre once, so every truth position below is where the flux is.
            dx, dy = -np.asarray(gs["x_offset_px"], float), -np.asarray(gs["y_offset_px"], float)
            moved = np.flatnonzero((np.abs(dx) > 1e-3) | (np.abs(dy) > 1e-3))
            if len(moved):
                img = img.copy()
                for i in moved:
                    img[i] = _place(img[i], angle_deg=0.0, dx=float(dx[i]), dy=float(dy[i]),
                                    order=config.interpolation_order)
        if c != len(degrade_config.high):
            raise InputError("galaxy_set['image_hr']", f"{c} bands, but the degrade config has {len(degrade_config.high)}")
        if not 0 <= config.ref_band < c:
            raise ConfigError("blends.ref_band", f"{config.ref_band} is not a band of the {c}-band galaxy set")
        self.image = img
        self.n, self.c, self.side = n, c, img.shape[-1]
        to_njy = np.array([b.to_njy for b in degrade_config.high])
        self.to_njy = to_njy

        def col(key, default, dtype):
            if key in gs:
                arr = np.asarray(gs[key])
                if arr.shape[0] != n:
                    raise InputError(f"galaxy_set[{key!r}]", f"has {arr.shape[0]} rows, image_hr has {n}")
                return arr.astype(dtype, copy=False)
            return default().astype(dtype)

        self.flux = col("flux_njy", lambda: img.sum(axis=(2, 3)) * to_njy, np.float64).reshape(n, -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mag_from_flux = np.where(self.flux > 0, NJY_ZEROPOINT - 2.5 * np.log10(self.flux), np.nan)
        self.mag = col("mag", lambda: mag_from_flux, np.float64).reshape(n, -1)
        nan = lambda: np.full(n, np.nan)  # noqa: E731
        self.fwhm = col("fwhm_arcsec", nan, np.float64)
        self.radius = col("flux_radius_arcsec", nan, np.float64)
        self.redshift = col("redshift", nan, np.float64)
        self.object_id = col("objectId", lambda: np.arange(n), np.int64)
        self.ra = col("ra_center", lambda: np.zeros(n), np.float64)
        self.dec = col("dec_center", lambda: np.zeros(n), np.float64)
        self.flags = col("flags", lambda: np.zeros(n), np.int32)
        self.sigma_hr = col("sigma_hr", lambda: np.full((n, c), np.nan), np.float64).reshape(n, -1)
        self.eligible = np.flatnonzero(without_flags(self.flags, config.exclude_flags))
        if len(self.eligible) < config.n_galaxies:
            raise InputError("galaxy_set", f"{len(self.eligible)} usable galaxies, {config.n_galaxies} needed per blend")

    def choose(self, rng: np.random.Generator, k: int, max_delta_mag: float | None, ref: int) -> np.ndarray:
        """``k`` distinct galaxy rows; all within ``max_delta_mag`` of the first, if set."""
        elig = self.eligible
        for _ in range(100):
            first = elig[rng.integers(len(elig))]
            if k == 1:
                return np.array([first])
            if max_delta_mag is None:
                others = set()
                while len(others) < k - 1:  # rejection: cheap when the set is much larger than k
                    j = elig[rng.integers(len(elig))]
                    if j != first:
                        others.add(int(j))
                rest = np.array(sorted(others))
                rng.shuffle(rest)
                return np.concatenate([[first], rest])
            dm = np.abs(self.mag[elig, ref] - self.mag[first, ref])
            cand = elig[(dm <= max_delta_mag) & (elig != first)]
            if len(cand) >= k - 1:
                return np.concatenate([[first], rng.choice(cand, size=k - 1, replace=False)])
        raise InputError("galaxy_set", f"no {k} galaxies within max_delta_mag={max_delta_mag} of each other were found "
                                       f"in 100 draws")


# --------------------------------------------------------------------------------------------- simulation
def _simulate(gs: _GalaxySet, *, config: BlendConfig, degrade_config: DegradeConfig, n_items: int, k: int,
              seed: int, first_id: int, stream: tuple[int, ...], return_components: bool):
    n_side, c = gs.side, gs.c
    scale = degrade_config.scale_high_arcsec
    centre = (n_side - 1) / 2.0
    anywhere = config.placement == "anywhere"
    margin = config.edge_margin_arcsec / scale
    if anywhere:
        span = (config.max_sep_arcsec / scale if k > 1 else 0.0) + 2 * margin
        if span > n_side - 1:
            raise ConfigError("blends.max_sep_arcsec", f"a pair {config.max_sep_arcsec}\" apart with "
                                                       f"{config.edge_margin_arcsec}\" margins does not fit the "
                                                       f"{n_side * scale:.2f}\" cutout")
    else:
        reach = config.max_sep_arcsec / scale + config.center_offset_arcsec / scale if k > 1 \
            else config.center_offset_arcsec / scale
        if reach >= centre:
            raise ConfigError("blends.max_sep_arcsec", f"galaxies up to {reach * scale:.2f}\" from the centre fall "
                                                       f"off the {n_side * scale:.2f}\" cutout")
    degrader = get_degrader(degrade_config)
    n_low = degrade_config.low_side(n_side)
    ratio = degrade_config.ratio
    order = config.interpolation_order
    edge_flag = flag_bit("EDGE")

    image_hr = np.zeros((n_items, c, n_side, n_side), dtype=np.float32)
    comps = np.zeros((n_items, k, c, n_side, n_side), dtype=np.float32) if return_components else None
    rows = []
    gens = []
    for b in range(n_items):
        blend_id = first_id + b
        rng = np.random.default_rng([int(seed), int(blend_id), *stream])
        gens.append(rng)
        idx = gs.choose(rng, k, config.max_delta_mag, config.ref_band)
        # 1. positions: first near the centre, the others at drawn separations and angles from it;
        #    "anywhere" then moves the whole configuration to a uniform position inside the margins
        off = config.center_offset_arcsec / scale
        pos = np.empty((k, 2))
        pos[0] = centre + rng.uniform(-off, off, size=2) if (off > 0 and not anywhere) else centre
        for g in range(1, k):
            s_px = _draw_separation(rng, config) / scale
            phi = rng.uniform(0.0, 2.0 * np.pi)
            pos[g] = pos[0] + s_px * np.array([np.cos(phi), np.sin(phi)])
        if anywhere:
            rel = pos - pos[0]
            lo = margin - rel.min(axis=0)
            hi = (n_side - 1 - margin) - rel.max(axis=0)
            pos = rel + rng.uniform(lo, np.maximum(hi, lo))
        shifts = pos - centre
        if not config.subpixel_shifts:
            shifts = np.round(shifts)
            pos = centre + shifts
        # 2. rotations
        if config.rotation == "quarter":
            angles = 90.0 * rng.integers(0, 4, size=k)
        elif config.rotation == "arbitrary":
            angles = rng.uniform(0.0, 360.0, size=k)
        else:
            angles = np.zeros(k)
        # 3. place and sum
        stamp_flux = np.empty((k, c))
        for g in range(k):
            comp = _place(gs.image[idx[g]], angle_deg=float(angles[g]), dx=float(shifts[g, 0]),
                          dy=float(shifts[g, 1]), order=order)
            image_hr[b] += comp
            stamp_flux[g] = comp.sum(axis=(1, 2), dtype=np.float64) * gs.to_njy
            if comps is not None:
                comps[b, g] = comp
        orig = gs.image[idx, config.ref_band].sum(axis=(1, 2), dtype=np.float64) * gs.to_njy[config.ref_band]
        with np.errstate(divide="ignore", invalid="ignore"):
            edge = (orig > 0) & (stamp_flux[:, config.ref_band] < config.edge_keep_fraction * orig)
        rows.append((blend_id, idx, pos, angles, stamp_flux, np.where(edge, edge_flag, 0).astype(np.int32)))

    out = degrader(image_hr, rng=gens)
    blends, sources = _tables(gs, rows, config=config, n_side=n_side, n_low=n_low, ratio=ratio, scale=scale)
    src_flags = np.zeros(n_items, dtype=np.int32)
    np.bitwise_or.at(src_flags, sources["blendId"] - first_id, sources["flags"])
    batch = {
        "image_hr": image_hr,
        "image_lr": out["image_lr"],
        "sigma_lr": out["sigma_lr"],
        "sigma_hr": np.sqrt(np.stack([(gs.sigma_hr[r[1]] ** 2).sum(axis=0) for r in rows])).astype(np.float32),
        "blendId": blends["blendId"].copy(),
        "ra_center": blends["ra_center"].copy(),
        "dec_center": blends["dec_center"].copy(),
        "flags": (out["flags"] | src_flags).astype(np.int32),
    }
    blends["flags"] = batch["flags"].copy()
    if comps is not None:
        batch["components_hr"] = comps
    return batch, blends, sources


def _tables(gs: _GalaxySet, rows, *, config: BlendConfig, n_side: int, n_low: int, ratio: float, scale: float):
    ref = config.ref_band
    s_cols: dict[str, list] = {k: [] for k in ("blendId", "sourceIndex", "objectId", "galaxyIndex", "x_hr", "y_hr",
                                              "x_lr", "y_lr", "ra", "dec", "mag", "flux_njy", "flux_stamp_njy",
                                              "fwhm_arcsec", "flux_radius_arcsec", "redshift", "rotation_deg",
                                              "flags")}
    b_cols: dict[str, list] = {k: [] for k in ("blendId", "n_sources", "ra_center", "dec_center", "primary_index",
                                              "secondary_index", "sep_arcsec", "delta_mag", "flux_ratio",
                                              "sum_fwhm_arcsec", "delta_z", "sep_over_size")}
    for blend_id, idx, pos, angles, stamp_flux, extra_flags in rows:
        k = len(idx)
        ra_c, dec_c = gs.ra[idx[0]], gs.dec[idx[0]]
        wcs = make_tan_wcs(ra_c, dec_c, pixel_scale_arcsec=scale, shape=(n_side, n_side))
        ra, dec = wcs.wcs_pix2world(pos[:, 0], pos[:, 1], 0)
        x_lr, y_lr = hr_to_lr_pixels(pos[:, 0], pos[:, 1], n_high=n_side, n_low=n_low, ratio=ratio)
        s_cols["blendId"].append(np.full(k, blend_id))
        s_cols["sourceIndex"].append(np.arange(k))
        s_cols["objectId"].append(gs.object_id[idx])
        s_cols["galaxyIndex"].append(idx)
        s_cols["x_hr"].append(pos[:, 0])
        s_cols["y_hr"].append(pos[:, 1])
        s_cols["x_lr"].append(x_lr)
        s_cols["y_lr"].append(y_lr)
        s_cols["ra"].append(ra)
        s_cols["dec"].append(dec)
        s_cols["mag"].append(gs.mag[idx])
        s_cols["flux_njy"].append(gs.flux[idx])
        s_cols["flux_stamp_njy"].append(stamp_flux)
        s_cols["fwhm_arcsec"].append(gs.fwhm[idx])
        s_cols["flux_radius_arcsec"].append(gs.radius[idx])
        s_cols["redshift"].append(gs.redshift[idx])
        s_cols["rotation_deg"].append(angles)
        s_cols["flags"].append(gs.flags[idx] | extra_flags)
        b_cols["blendId"].append(blend_id)
        b_cols["n_sources"].append(k)
        b_cols["ra_center"].append(ra_c)
        b_cols["dec_center"].append(dec_c)
        if k >= 2:
            order = np.argsort(-gs.flux[idx, ref], kind="stable")
            p, s = order[0], order[1]
            ip, is_ = idx[p], idx[s]
            sep = float(np.hypot(*(pos[p] - pos[s]))) * scale
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio_ps = gs.flux[is_, ref] / gs.flux[ip, ref]
            size = np.hypot(gs.radius[ip], gs.radius[is_])
            vals = (p, s, sep, gs.mag[is_, ref] - gs.mag[ip, ref], ratio_ps, gs.fwhm[ip] + gs.fwhm[is_],
                    abs(gs.redshift[ip] - gs.redshift[is_]), sep / size if size > 0 else np.nan)
        else:
            vals = (0, -1) + (np.nan,) * 6
        for key, v in zip(("primary_index", "secondary_index", "sep_arcsec", "delta_mag", "flux_ratio",
                           "sum_fwhm_arcsec", "delta_z", "sep_over_size"), vals):
            b_cols[key].append(v)

    dtypes = {"blendId": np.int64, "sourceIndex": np.int32, "objectId": np.int64, "galaxyIndex": np.int64,
              "x_hr": np.float64, "y_hr": np.float64, "x_lr": np.float64, "y_lr": np.float64, "ra": np.float64,
              "dec": np.float64, "mag": np.float32, "flux_njy": np.float32, "flux_stamp_njy": np.float32,
              "fwhm_arcsec": np.float32, "flux_radius_arcsec": np.float32, "redshift": np.float32,
              "rotation_deg": np.float32, "flags": np.int32}
    sources = {k: np.concatenate(v).astype(dtypes[k]) for k, v in s_cols.items()}
    bdt = {"blendId": np.int64, "n_sources": np.int32, "ra_center": np.float64, "dec_center": np.float64,
           "primary_index": np.int32, "secondary_index": np.int32}
    blends = {k: np.asarray(v, dtype=bdt.get(k, np.float32)) for k, v in b_cols.items()}
    return blends, sources


_RETURNS_DOC = """
    Returns
    -------
    batch : dict of numpy.ndarray
        ``image_hr`` float32 ``(N, C, n, n)``: the sum of the placed galaxies (nJy/px, HR grid);
        ``image_lr`` float32 ``(N, C, h, h)`` and ``sigma_lr`` float32 ``(N, C)`` from
        :func:`galgan_ray.degrade.degrade`; ``sigma_hr`` float32 ``(N, C)``: quadrature sum of the
        stamps' ``sigma_hr`` (NaN if unknown); ``blendId`` int64 ``(N,)``; ``ra_center``,
        ``dec_center`` float64 ``(N,)`` (deg, the cutout centre; the first galaxy's catalog
        centre); ``flags`` int32 ``(N,)`` (OR of the sources' flags and the degradation's);
        ``components_hr`` float32 ``(N, k, C, n, n)`` only with ``return_components``.
    blends : dict of numpy.ndarray, one row per blend
        ``blendId``, ``n_sources``, ``ra_center``, ``dec_center``, ``primary_index`` and
        ``secondary_index`` (``sourceIndex`` of the brightest two; -1 if none), ``sep_arcsec``,
        ``delta_mag``, ``flux_ratio``, ``sum_fwhm_arcsec``, ``delta_z``, ``sep_over_size`` (see the
        module docstring; NaN for single galaxies), ``flags``.
    sources : dict of numpy.ndarray, one row per galaxy
        ``blendId``, ``sourceIndex`` (0 = the galaxy near the centre), ``objectId``,
        ``galaxyIndex`` (row in the galaxy set), ``x_hr``, ``y_hr`` (0-based HR px), ``x_lr``,
        ``y_lr`` (0-based LR px), ``ra``, ``dec`` (deg, through the cutout's
        ``geometry.make_tan_wcs``), ``mag`` and ``flux_njy`` ``(n, C)`` (catalog values),
        ``flux_stamp_njy`` ``(n, C)`` (flux of the placed galaxy inside the HR cutout),
        ``fwhm_arcsec``, ``flux_radius_arcsec``, ``redshift``, ``rotation_deg`` (counter-clockwise,
        x right and y up), ``flags`` (the galaxy set's, plus ``EDGE`` when less than
        ``edge_keep_fraction`` of the stamp's flux stayed inside the cutout).
"""


def simulate_blends(galaxy_set: dict, *, config: BlendConfig | None = None, degrade_config: DegradeConfig | None = None,
                    n_blends: int, seed: int | None = None, first_id: int = 0, return_components: bool = False):
    """Simulate blends of ``config.n_galaxies`` galaxies from a galaxy set, with truth tables.

    Parameters
    ----------
    galaxy_set : dict of numpy.ndarray
        The galaxy set of ``cutouts.py`` (see ARCHITECTURE.md): ``image_hr`` ``(N, C, n, n)`` is
        required; ``flux_njy``, ``mag``, ``fwhm_arcsec``, ``flux_radius_arcsec``, ``redshift``,
        ``objectId``, ``ra_center``, ``dec_center``, ``flags``, ``sigma_hr`` are used when present
        (fluxes and magnitudes otherwise come from the stamps, the rest is NaN/0).
    config : BlendConfig, optional
    degrade_config : DegradeConfig, optional
        Its ``high`` bands must match the galaxy set's channels.
    n_blends : int
    seed : int, optional
        Defaults to ``config.seed``. Blend ``i`` uses ``np.random.default_rng([seed, first_id + i])``.
    first_id : int
        ``blendId`` of the first blend; make a large set in chunks with consecutive ``first_id``.
    return_components : bool
        Also return each placed galaxy's HR image (``components_hr``).
    """
    config = config or BlendConfig()
    degrade_config = degrade_config or DegradeConfig()
    gs = _GalaxySet(galaxy_set, config=config, degrade_config=degrade_config)
    return _simulate(gs, config=config, degrade_config=degrade_config, n_items=int(n_blends), k=config.n_galaxies,
                     seed=config.seed if seed is None else seed, first_id=int(first_id), stream=(),
                     return_components=return_components)


def simulate_isolated(galaxy_set: dict, *, config: BlendConfig | None = None, degrade_config: DegradeConfig | None = None,
                      n: int, seed: int | None = None, first_id: int = 0, return_components: bool = False):
    """Single galaxies placed like the first galaxy of a blend, with the same outputs (for false positives).

    Same parameters as :func:`simulate_blends` (``config.n_galaxies`` is ignored: one galaxy per
    cutout). Item ``i`` uses ``np.random.default_rng([seed, first_id + i, 1])``, a stream apart from
    the blends'. Pair columns of the ``blends`` table are NaN and ``secondary_index`` is -1.
    """
    config = config or BlendConfig()
    degrade_config = degrade_config or DegradeConfig()
    gs = _GalaxySet(galaxy_set, config=config, degrade_config=degrade_config)
    return _simulate(gs, config=config, degrade_config=degrade_config, n_items=int(n), k=1,
                     seed=config.seed if seed is None else seed, first_id=int(first_id), stream=(_ISOLATED_STREAM,),
                     return_components=return_components)


simulate_blends.__doc__ += _RETURNS_DOC
simulate_isolated.__doc__ += _RETURNS_DOC
