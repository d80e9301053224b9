"""The galaxy set: 64x64 cutouts at 0.06"/px from mosaics + a catalog, or drawn from real HST stamps.

Both functions return ``(galaxies, meta)``: ``galaxies`` is the galaxy-set dict of
``docs/ARCHITECTURE.md`` (``image_hr`` float32 ``(N, C, size, size)`` in nJy/px, ``objectId``,
``ra_center``, ``dec_center``, ``mag``, ``flux_njy``, ``sigma_hr`` ``(N, C)``, ``fwhm_arcsec``,
``flux_radius_arcsec``, ``redshift``, ``class_star``, ``flags``, plus ``x_offset_px``/``y_offset_px``)
and ``meta`` the plain dict stored next to it (bands, band configs, pixel scale, counts,
provenance).

Centring (:func:`cut_cutouts`). When a mosaic is already on the target grid (0.06"/px, north up,
east left, within ``scale_tolerance``), cutouts are *integer-pixel* windows: the 64x64 window whose
centre (31.5, 31.5) lies nearest the catalog position, with no interpolation (the noise stays
white). The catalog position then sits at ``(31.5 + x_offset_px, 31.5 + y_offset_px)``, offsets in
[-0.5, 0.5], and ``ra_center``/``dec_center`` are the sky position of the cutout centre, so
``geometry.make_tan_wcs(ra_center, dec_center, ...)`` rebuilds the cutout WCS (to a few hundredths
of a pixel for a north-up TAN mosaic). A mosaic on another grid (e.g. the 0.03"/px CANDELS
mosaics, a rotated frame) is *resampled* onto that cutout WCS with ``reproject_exact`` times the
pixel-area ratio, which conserves flux.

Units. Mosaic pixels are converted to nJy with the AB zero point, taken (first found) from the
``zeropoints`` argument, the header's ``PHOTZP``, ``MAGZERO``, ``PHOTFLAM``+``PHOTPLAM``, ``BUNIT =
nJy`` (31.4), or the band's ``BandConfig.zeropoint_mag``; the source used is in ``meta``. CANDELS
ACS mosaics are in e-/s (F775W: ZP 25.654).

Real stamps (:func:`draw_real_galaxies`) are drawn through ``galsim.RealGalaxy``: deconvolved by
their own PSF, reconvolved with the target band's PSF, drawn at 0.06"/px, the correlated noise
whitened and topped up with white noise to the band's ``sky_sigma``. The target PSF can only be as
sharp as the stamps' PSF (deconvolving to a sharper PSF amplifies the noise without bound), so the
band PSF is broadened by a Gaussian when needed, once for the whole set; the effective PSF is the
band config in ``meta["band_configs"]``.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, Mapping

import galsim
import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning
from reproject import reproject_exact

from .config import to_dict
from .errors import InputError
from .flags import flag_bit
from .geometry import make_tan_wcs, pixel_scale_of
from .instrument import NJY_ZEROPOINT, BandConfig, get_band
from .provenance import provenance
from .psf import draw_psf, measure_fwhm, psf_profile

__all__ = ["cut_cutouts", "draw_real_galaxies", "GALAXY_SET_KEYS", "COSMOS_F814W_ZEROPOINT"]

COSMOS_F814W_ZEROPOINT = 25.94  # AB mag of 1 e-/s in ACS/WFC F814W, the unit of GalSim's COSMOS stamps

GALAXY_SET_KEYS: tuple[str, ...] = (
    "image_hr", "objectId", "ra_center", "dec_center", "mag", "flux_njy", "fwhm_arcsec",
    "flux_radius_arcsec", "redshift", "class_star", "sigma_hr", "flags", "x_offset_px", "y_offset_px",
)

_EDGE = flag_bit("EDGE")
_NONFINITE = flag_bit("NONFINITE")


# ------------------------------------------------------------------------------------------------
# Mosaics
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Mosaic:
    name: str
    source: str
    data: Any  # ndarray, memmap or FITS section: anything sliceable with a .shape
    wcs: WCS
    to_njy: float
    zeropoint_mag: float
    zeropoint_source: str
    scale_arcsec: float
    aligned: bool  # on the target grid (integer-pixel cutouts possible)
    sigma: float | None  # noise per pixel in mosaic units from the header (SKYSIGMA), if any


def _zeropoint_from_header(header) -> tuple[float, str] | None:
    for key in ("PHOTZP", "MAGZERO", "MAGZPT", "ZEROPNT"):
        if key in header and header[key] is not None:
            try:
                return float(header[key]), key
            except (TypeError, ValueError):
                continue
    if "PHOTFLAM" in header and "PHOTPLAM" in header:
        flam, plam = float(header["PHOTFLAM"]), float(header["PHOTPLAM"])
        if flam > 0 and plam > 0:  # HST AB zero point from the inverse sensitivity
            return -2.5 * math.log10(flam) - 5.0 * math.log10(plam) - 2.408, "PHOTFLAM/PHOTPLAM"
    if str(header.get("BUNIT", "")).strip().lower() == "njy":
        return NJY_ZEROPOINT, "BUNIT=nJy"
    return None


def _grid_aligned(wcs: WCS, scale_arcsec: float, *, tolerance: float) -> bool:
    """True when the WCS is north-up, east-left at ``scale_arcsec`` (relative ``tolerance``)."""
    m = wcs.celestial.pixel_scale_matrix * 3600.0  # arcsec per pixel
    sx, sy = -m[0, 0], m[1, 1]
    off = max(abs(m[0, 1]), abs(m[1, 0]))
    return (abs(sx / scale_arcsec - 1) <= tolerance and abs(sy / scale_arcsec - 1) <= tolerance
            and off <= tolerance * scale_arcsec * 0.05)


def _open_mosaic(name, item, wcs, band, *, zeropoint, hdu, stack, target_scale, tolerance) -> _Mosaic:
    if isinstance(item, (str, Path)):
        source = str(item)
        try:
            hdul = stack.enter_context(fits.open(source, memmap=True, lazy_load_hdus=True))
        except FileNotFoundError:
            raise InputError(source, "mosaic file not found") from None
        except OSError as exc:
            raise InputError(source, f"cannot open the mosaic as FITS: {exc}") from exc
        index = hdu
        if index is None:
            index = next((i for i, h in enumerate(hdul) if h.is_image and h.header.get("NAXIS", 0) == 2), None)
            if index is None:
                raise InputError(source, "no 2-D image HDU in the file")
        h = hdul[index]
        header = h.header
        if header.get("NAXIS", 0) != 2:
            raise InputError(source, f"HDU {index} is not a 2-D image (NAXIS={header.get('NAXIS')})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            file_wcs = WCS(header).celestial
        if file_wcs.has_celestial:
            mosaic_wcs = file_wcs
        elif wcs is not None:
            mosaic_wcs = wcs.celestial
        else:
            raise InputError(source, "the FITS header has no celestial WCS (CTYPE/CRVAL/CD); "
                                     "pass wcs= to cut_cutouts or fix the header")
        data = h.section
        zp_found = _zeropoint_from_header(header)
        sigma_header = float(header["SKYSIGMA"]) if header.get("SKYSIGMA") else None
    else:
        source = f"mosaics[{name!r}]"
        data = np.asarray(item)
        if data.ndim != 2:
            raise InputError(source, f"a mosaic must be a 2-D array, got shape {data.shape}")
        if wcs is None or not wcs.has_celestial:
            raise InputError(source, "an array mosaic needs a celestial wcs")
        mosaic_wcs = wcs.celestial
        zp_found = None
        sigma_header = None
    if zeropoint is not None:
        zp, zp_source = float(zeropoint), "argument"
    elif zp_found is not None:
        zp, zp_source = zp_found
    else:
        zp, zp_source = band.zeropoint_mag, "BandConfig"
    scale = pixel_scale_of(mosaic_wcs)
    return _Mosaic(name=name, source=source, data=data, wcs=mosaic_wcs,
                   to_njy=10.0 ** (-0.4 * (zp - NJY_ZEROPOINT)), zeropoint_mag=zp, zeropoint_source=zp_source,
                   scale_arcsec=scale, aligned=_grid_aligned(mosaic_wcs, target_scale, tolerance=tolerance),
                   sigma=sigma_header)


def _window(data, x0: int, y0: int, nx: int, ny: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """``data[y0:y0+ny, x0:x0+nx]`` padded with NaN: (float64 array, inside-mosaic mask, any inside)."""
    h, w = data.shape
    out = np.full((ny, nx), np.nan)
    inside = np.zeros((ny, nx), bool)
    ya, yb, xa, xb = max(y0, 0), min(y0 + ny, h), max(x0, 0), min(x0 + nx, w)
    if ya >= yb or xa >= xb:
        return out, inside, False
    out[ya - y0:yb - y0, xa - x0:xb - x0] = np.asarray(data[ya:yb, xa:xb], dtype=np.float64)
    inside[ya - y0:yb - y0, xa - x0:xb - x0] = True
    return out, inside, True


def _resample(mosaic: _Mosaic, ra: float, dec: float, size: int, target_scale: float):
    """Flux-conserving resampling of the mosaic around (ra, dec) onto the cutout grid.

    Returns (image in mosaic units, edge, n_nonfinite, any_inside).
    """
    target = make_tan_wcs(ra, dec, pixel_scale_arcsec=target_scale, shape=(size, size))
    xc, yc = mosaic.wcs.world_to_pixel_values(ra, dec)
    if not (np.isfinite(xc) and np.isfinite(yc)):
        return None, True, 0, False
    m = int(math.ceil(size * target_scale / mosaic.scale_arcsec * 1.5)) + 6
    x0, y0 = int(round(float(xc))) - m // 2, int(round(float(yc))) - m // 2
    native, inside, any_inside = _window(mosaic.data, x0, y0, m, m)
    if not any_inside:
        return None, True, 0, False
    # Where do the output pixel centres land on the mosaic? That decides EDGE and NONFINITE.
    yy, xx = np.mgrid[0:size, 0:size]
    wx, wy = target.pixel_to_world_values(xx.ravel(), yy.ravel())
    px, py = mosaic.wcs.world_to_pixel_values(wx, wy)
    ix, iy = np.round(px).astype(int) - x0, np.round(py).astype(int) - y0
    ok = (ix >= 0) & (ix < m) & (iy >= 0) & (iy < m)
    edge = not ok.all() or not inside[iy[ok], ix[ok]].all()
    nonfinite_native = inside & ~np.isfinite(native)
    n_bad = int(np.count_nonzero(nonfinite_native[iy[ok], ix[ok]]))
    native = np.where(np.isfinite(native), native, 0.0)
    sub = mosaic.wcs.deepcopy()
    sub.wcs.crpix = sub.wcs.crpix - np.array([x0, y0], float)
    sub.pixel_shape = (m, m)
    out, _ = reproject_exact((native, sub), target, shape_out=(size, size))
    out = np.nan_to_num(out, nan=0.0) * (target_scale / mosaic.scale_arcsec) ** 2
    return out, edge, n_bad, True


def _robust_sigma(image: np.ndarray, valid: np.ndarray) -> float:
    """Noise per pixel from the cutout's outer ring (width size/8), sigma-clipped MAD."""
    w = max(image.shape[0] // 8, 2)
    ring = np.zeros(image.shape, bool)
    ring[:w], ring[-w:], ring[:, :w], ring[:, -w:] = True, True, True, True
    values = image[ring & valid]
    if values.size < 20:
        values = image[valid]
    if values.size < 10:
        return float("nan")
    return float(sigma_clipped_stats(values, sigma=3.0, maxiters=5, stdfunc="mad_std")[2])


def _column(table: Table, name: str, n: int) -> np.ndarray:
    return np.asarray(table[name], dtype=np.float64) if name in table.colnames else np.full(n, np.nan)


def _resolve_band(name: str, survey: str, band_configs, target_scale: float) -> BandConfig:
    if band_configs and name in band_configs:
        band = band_configs[name]
    elif "/" in name:
        band = get_band(*name.split("/", 1))
    else:
        band = get_band(survey, name)
    if band.pixel_scale_arcsec != target_scale:
        band = dataclasses.replace(band, pixel_scale_arcsec=target_scale)
    return band


def cut_cutouts(mosaics: Mapping[str, str | Path | np.ndarray], wcs: WCS | None, catalog: Table, *,
                size: int = 64, survey: str = "hst", band_configs: Mapping[str, BandConfig] | None = None,
                pixel_scale_arcsec: float = 0.06, zeropoints: Mapping[str, float] | None = None,
                hdu: int | None = None, resample: Literal["auto", "always", "never"] = "auto",
                sigma: Mapping[str, float] | None = None, scale_tolerance: float = 0.005,
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Cut ``size`` x ``size`` cutouts centred on catalog positions from one mosaic per band.

    FITS mosaics are read lazily (``memmap`` and ``HDU.section``): only the pixels of each cutout
    are read, so multi-GB CANDELS mosaics work.

    Parameters
    ----------
    mosaics : mapping of str -> path or numpy.ndarray
        Band name (``"F775W"``, or ``"survey/name"``) -> FITS file or 2-D array, in channel order.
    wcs : astropy.wcs.WCS or None
        WCS of array mosaics, and of FITS mosaics whose header has none. ``None`` for FITS files
        with a WCS (a FITS mosaic without one is then an :class:`InputError` naming the file).
    catalog : astropy.table.Table
        Canonical table from :func:`galgan_ray.catalog.read_catalog` (``objectId``, ``ra``,
        ``dec``; optional ``mag_<band>``, ``flux_njy_<band>``, ``fwhm_arcsec``,
        ``flux_radius_arcsec``, ``redshift``, ``class_star``).
    size : int
        Cutout side in pixels.
    survey : str
        Registry survey of the band names (``instrument.get_band``).
    band_configs : mapping of str -> BandConfig, optional
        Band definitions overriding the registry.
    pixel_scale_arcsec : float
        Pixel scale of the cutouts.
    zeropoints : mapping of str -> float, optional
        AB zero point of each mosaic's pixel unit, overriding the header.
    hdu : int, optional
        HDU of FITS mosaics (default: the first 2-D image).
    resample : {"auto", "always", "never"}
        ``auto`` resamples only mosaics that are not on the target grid; ``never`` raises
        :class:`InputError` for those.
    sigma : mapping of str -> float, optional
        Noise per pixel (nJy) of each band. By default the header's ``SKYSIGMA`` (written by
        :func:`galgan_ray.sky.write_sky`) for integer cutouts, else a sigma-clipped MAD of each
        cutout's outer ring.
    scale_tolerance : float
        Relative pixel-scale difference still treated as the target grid.

    Returns
    -------
    galaxies : dict of str -> numpy.ndarray
        ``image_hr`` float32 ``(N, C, size, size)`` nJy/px; ``objectId`` int64; ``ra_center``,
        ``dec_center`` float64 (sky position of the cutout centre); ``mag``, ``flux_njy``,
        ``sigma_hr`` float32 ``(N, C)``; ``fwhm_arcsec``, ``flux_radius_arcsec``, ``redshift``,
        ``class_star`` float32 ``(N,)``; ``flags`` int32 (EDGE: padded with zeros beyond the
        mosaic; NONFINITE: non-finite mosaic pixels set to zero); ``x_offset_px``,
        ``y_offset_px`` float32 (catalog position minus the cutout centre, in cutout pixels).
    meta : dict
        ``bands`` (band keys), ``band_configs`` (dicts), ``pixel_scale_arcsec``, ``size``,
        ``centering`` per band (``integer`` or ``resampled``), ``zeropoints`` and their sources,
        ``sources`` (files), ``counts`` (``input``, ``kept``, ``edge``, ``off_mosaic`` --
        catalog rows whose cutout misses every mosaic, not in ``galaxies`` --, ``nonfinite_cutouts``,
        ``nonfinite_pixels``, ``resampled`` per band), ``off_mosaic_ids``, ``provenance``.

    Raises
    ------
    InputError
        Unreadable or WCS-less mosaic, catalog without canonical columns, or a grid mismatch with
        ``resample="never"``.
    """
    for col in ("objectId", "ra", "dec"):
        if col not in catalog.colnames:
            src = catalog.meta.get("source", "catalog")
            raise InputError(str(src), f"missing column {col!r}: read catalogs with galgan_ray.catalog.read_catalog")
    if not mosaics:
        raise InputError("mosaics", "no mosaic given")
    names = list(mosaics)
    bands = [_resolve_band(n, survey, band_configs, pixel_scale_arcsec) for n in names]
    n_in = len(catalog)
    ra_cat = np.asarray(catalog["ra"], np.float64)
    dec_cat = np.asarray(catalog["dec"], np.float64)
    half = (size - 1) / 2.0

    with ExitStack() as stack:
        ms = [_open_mosaic(n, mosaics[n], wcs, b, zeropoint=(zeropoints or {}).get(n), hdu=hdu, stack=stack,
                           target_scale=pixel_scale_arcsec, tolerance=scale_tolerance)
              for n, b in zip(names, bands)]
        for m in ms:
            if not m.aligned and resample == "never":
                raise InputError(m.source, f"mosaic grid ({m.scale_arcsec:.4f}\"/px, or rotated) is not the target "
                                           f"{pixel_scale_arcsec}\"/px north-up grid and resample='never'")
        use_integer = [m.aligned and resample != "always" for m in ms]

        images = np.zeros((n_in, len(ms), size, size), np.float32)
        sig = np.full((n_in, len(ms)), np.nan, np.float32)
        flags = np.zeros(n_in, np.int32)
        ra_c, dec_c = ra_cat.copy(), dec_cat.copy()
        offx, offy = np.zeros(n_in), np.zeros(n_in)
        touched = np.zeros(n_in, bool)
        n_bad_pix = 0
        nonfinite_rows = np.zeros(n_in, bool)
        n_resampled = {m.name: 0 for m in ms}

        # 1. The first band anchors each cutout's centre.
        anchor = ms[0]
        ax, ay = anchor.wcs.world_to_pixel_values(ra_cat, dec_cat)
        if use_integer[0]:
            good = np.isfinite(ax) & np.isfinite(ay)
            x0 = np.where(good, np.floor(np.where(good, ax, 0) - half + 0.5), 0).astype(np.int64)
            y0 = np.where(good, np.floor(np.where(good, ay, 0) - half + 0.5), 0).astype(np.int64)
            offx = np.where(good, ax - x0 - half, np.nan)
            offy = np.where(good, ay - y0 - half, np.nan)
            rc, dc = anchor.wcs.pixel_to_world_values(x0 + half, y0 + half)
            ra_c, dec_c = np.where(good, rc, ra_cat), np.where(good, dc, dec_cat)

        # 2. Every band: an integer window where its grid coincides with the cutout grid, else resample.
        for c, m in enumerate(ms):
            mx, my = m.wcs.world_to_pixel_values(ra_c, dec_c)
            for i in range(n_in):
                if not (np.isfinite(mx[i]) and np.isfinite(my[i])):
                    flags[i] |= _EDGE
                    continue
                sx, sy = mx[i] - half, my[i] - half
                integer_cut = use_integer[c] and abs(sx - round(sx)) < 0.01 and abs(sy - round(sy)) < 0.01
                if integer_cut:
                    cut, inside, any_in = _window(m.data, int(round(sx)), int(round(sy)), size, size)
                    if not any_in:
                        flags[i] |= _EDGE
                        continue
                    edge = not inside.all()
                    bad = inside & ~np.isfinite(cut)
                    n_bad = int(np.count_nonzero(bad))
                    cut = np.where(inside & ~bad, cut, 0.0)
                    valid = inside & ~bad
                else:
                    cut, edge, n_bad, any_in = _resample(m, float(ra_c[i]), float(dec_c[i]), size, pixel_scale_arcsec)
                    if not any_in:
                        flags[i] |= _EDGE
                        continue
                    valid = cut != 0.0
                    n_resampled[m.name] += 1
                touched[i] = True
                if edge:
                    flags[i] |= _EDGE
                if n_bad:
                    flags[i] |= _NONFINITE
                    nonfinite_rows[i] = True
                    n_bad_pix += n_bad
                img = cut * m.to_njy
                images[i, c] = img
                if sigma and m.name in sigma:
                    sig[i, c] = sigma[m.name]
                elif m.sigma is not None and integer_cut:  # resampling changes it: measure then
                    sig[i, c] = m.sigma * m.to_njy
                else:
                    sig[i, c] = _robust_sigma(img, valid)

        sources = {m.name: m.source for m in ms}
        zps = {m.name: {"zeropoint_mag": m.zeropoint_mag, "source": m.zeropoint_source} for m in ms}
        centering = {m.name: ("integer" if u else "resampled") for m, u in zip(ms, use_integer)}
        native_scales = {m.name: m.scale_arcsec for m in ms}

    keep = touched
    mags = np.stack([_column(catalog, f"mag_{n.split('/')[-1]}", n_in) for n in names], axis=1)
    fluxes = np.stack([_column(catalog, f"flux_njy_{n.split('/')[-1]}", n_in) for n in names], axis=1)
    fluxes = np.where(np.isfinite(fluxes), fluxes, 10.0 ** (-0.4 * (mags - NJY_ZEROPOINT)))
    if not use_integer[0]:
        offx, offy = np.zeros(n_in), np.zeros(n_in)
    galaxies = {
        "image_hr": images[keep],
        "objectId": np.asarray(catalog["objectId"], np.int64)[keep],
        "ra_center": ra_c[keep].astype(np.float64),
        "dec_center": dec_c[keep].astype(np.float64),
        "mag": mags[keep].astype(np.float32),
        "flux_njy": fluxes[keep].astype(np.float32),
        "fwhm_arcsec": _column(catalog, "fwhm_arcsec", n_in)[keep].astype(np.float32),
        "flux_radius_arcsec": _column(catalog, "flux_radius_arcsec", n_in)[keep].astype(np.float32),
        "redshift": _column(catalog, "redshift", n_in)[keep].astype(np.float32),
        "class_star": _column(catalog, "class_star", n_in)[keep].astype(np.float32),
        "sigma_hr": sig[keep],
        "flags": flags[keep],
        "x_offset_px": offx[keep].astype(np.float32),
        "y_offset_px": offy[keep].astype(np.float32),
    }
    counts = {
        "input": n_in,
        "kept": int(keep.sum()),
        "edge": int(np.count_nonzero(flags[keep] & _EDGE)),
        "off_mosaic": int(np.count_nonzero(~keep)),
        "nonfinite_cutouts": int(np.count_nonzero(nonfinite_rows[keep])),
        "nonfinite_pixels": n_bad_pix,
        "resampled": n_resampled,
    }
    meta = {
        "bands": tuple(b.key for b in bands),
        "band_configs": [to_dict(b) for b in bands],
        "pixel_scale_arcsec": pixel_scale_arcsec,
        "size": size,
        "centering": centering,
        "native_pixel_scale_arcsec": native_scales,
        "zeropoints": zps,
        "sources": sources,
        "catalog_source": str(catalog.meta.get("source", "")),
        "counts": counts,
        "off_mosaic_ids": [int(v) for v in np.asarray(catalog["objectId"])[~keep]],
        "provenance": provenance(None, producer="cutouts.cut_cutouts", resample=resample),
    }
    return galaxies, meta


# ------------------------------------------------------------------------------------------------
# Real HST stamps (GalSim RealGalaxyCatalog format)
# ------------------------------------------------------------------------------------------------

def _companion_columns(catalog_file: Path, fits_catalog, rgc) -> tuple[dict[str, np.ndarray], str | None]:
    """flux_radius (stamp px) and photo-z of each galaxy from the companion ``*_fits.fits``."""
    n = rgc.nobjects
    path = None
    if fits_catalog is None:
        guess = catalog_file.with_name(catalog_file.name.replace(".fits", "_fits.fits"))
        path = guess if guess.exists() and guess != catalog_file else None
    elif fits_catalog is not False:
        path = Path(fits_catalog)
        if not path.exists():
            raise InputError(str(path), "companion catalog not found")
    out = {"flux_radius": np.full(n, np.nan), "zphot": np.full(n, np.nan)}
    if path is None:
        return out, None
    comp = Table.read(path)
    lower = {c.lower(): c for c in comp.colnames}
    if "ident" in lower:
        ids = {str(v).strip(): k for k, v in enumerate(comp[lower["ident"]])}
        rows = np.array([ids.get(str(v).strip(), -1) for v in rgc.ident])
    elif len(comp) == n:
        rows = np.arange(n)
    else:
        raise InputError(str(path), f"no IDENT column and {len(comp)} rows for {n} galaxies: cannot match")
    for key, names in (("flux_radius", ("flux_radius",)), ("zphot", ("zphot", "photo_z", "z_phot", "zbest"))):
        col = next((lower[c] for c in names if c in lower), None)
        if col is not None:
            vals = np.asarray(comp[col], np.float64)
            out[key] = np.where(rows >= 0, vals[np.clip(rows, 0, None)], np.nan)
    return out, str(path)


def _stamp_zeropoint(rgc, sample: np.ndarray) -> float:
    """AB zero point of the stamps' pixel unit: median of MAG + 2.5 log10(stamp sum)."""
    zps = []
    for i in sample:
        total = float(np.sum(rgc.getGalImage(int(i)).array))
        if total > 0 and np.isfinite(rgc.mag[i]):
            zps.append(rgc.mag[i] + 2.5 * math.log10(total))
    if not zps:
        raise InputError(str(rgc.getFileName()), "cannot derive a zero point (no stamp with positive flux); "
                                                 "pass zeropoint_mag")
    return float(np.median(zps))


def draw_real_galaxies(catalog_file: str | Path, *, dir: str | Path | None = None,
                       band: BandConfig | None = None, size: int = 64, seed: int = 0,
                       indices: np.ndarray | list[int] | None = None,
                       zeropoint_mag: float | Literal["stamps"] = COSMOS_F814W_ZEROPOINT,
                       fits_catalog: str | Path | None | Literal[False] = None,
                       psf_broadening_fwhm_arcsec: float | None = None,
                       noise: Literal["match", "whiten", "none"] = "match",
                       target_sigma: float | None = None,
                       ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Draw real HST galaxies (GalSim ``RealGalaxyCatalog`` format) onto the cutout grid.

    Steps per galaxy (works on any directory in this format; nothing is specific to one file):

    1. ``galsim.RealGalaxy`` with its own PSF and correlated noise, in nJy (``zeropoint_mag``),
       noise-padded beyond its postage stamp with the stamp's own correlated noise.
    2. Deconvolved by its PSF, convolved with the target PSF and drawn (pixel-integrated) on
       ``size`` x ``size`` at the band's pixel scale, centred on the stamp centre.
    3. The drawn noise: GalSim's propagated noise model does not follow a change of pixel scale
       (GalSim issue #1071), so the correlation function is measured on a pure-noise field pushed
       through the same chain (stamp noise -> deconvolve -> reconvolve -> draw). Then
       ``noise="match"`` (default) keeps the stamp's (correlated) noise and adds white noise up to
       ``target_sigma`` (default: the band's ``sky_sigma``, the HST depth) when lower;
       ``"whiten"`` first whitens it (``Image.whitenNoise``; white, but about 4x the stamp's
       noise level for COSMOS stamps at 0.06"/px), then tops up the same way; ``"none"`` leaves it.

    Zero point: stamps are in the unit of AB zero point ``zeropoint_mag``, by default 25.94, the
    ACS/WFC F814W zero point of 1 e-/s (GalSim's COSMOS stamps: 1 s HST exposures); for the
    shared 70-stamp catalog ``MAG + 2.5 log10(stamp_flux)`` is 25.937. ``"stamps"`` derives it as
    the median of ``MAG + 2.5 log10(sum(stamp))`` over (up to 200 of) the catalog's stamps (biased bright by
    neighbours in the stamps, ~0.1 mag for COSMOS). ``mag``/``flux_njy`` are the catalog ``MAG``
    and its flux.

    Target PSF: ``band.psf`` convolved with a Gaussian of ``psf_broadening_fwhm_arcsec``. By default
    the smallest one (plus 15%) that makes the target as wide as the widest stamp PSF (measured
    at the stamps' pixel scale): deconvolving to a sharper PSF amplifies the noise without bound.
    For an Airy (or Gaussian) band PSF the broadening is folded into the effective band config
    returned in ``meta["band_configs"]`` (``jitter_fwhm_arcsec``), so downstream stages use the
    PSF the images really have.

    Parameters
    ----------
    catalog_file : str or Path
        The RealGalaxyCatalog FITS file.
    dir : str or Path, optional
        Directory of the image, PSF and noise files (default: the catalog's directory).
    band : BandConfig, optional
        Target band (default HST ACS F814W at 0.06"/px).
    size : int
        Side of the output stamps in pixels.
    seed : int
        Noise padding and added noise of catalog row ``i`` use ``default_rng([seed, i])``.
    indices : array of int, optional
        Catalog rows to draw (default all).
    zeropoint_mag : float or "stamps"
        AB zero point of the stamps' pixel unit.
    fits_catalog : str or Path, optional
        Companion catalog with ``flux_radius`` (stamp pixels) and ``ZPHOT``, matched on ``IDENT``;
        by default ``<catalog>_fits.fits`` if present; ``False`` for none.
    psf_broadening_fwhm_arcsec : float, optional
        Extra Gaussian on the target PSF (0 for none).
    noise : {"match", "whiten", "none"}
        Noise treatment, see above.
    target_sigma : float, optional
        Noise per pixel (nJy) to top up to (default ``band.sky_sigma``; 0 adds nothing).

    Returns
    -------
    galaxies : dict of str -> numpy.ndarray
        The galaxy-set keys (see :func:`cut_cutouts`): ``image_hr`` float32 ``(N, 1, size, size)``
        nJy/px; ``objectId`` (``IDENT``, or the row when not an integer); ``ra_center``,
        ``dec_center`` (catalog RA/DEC, NaN if absent); ``mag``, ``flux_njy`` ``(N, 1)``;
        ``sigma_hr`` ``(N, 1)`` (final noise per pixel); ``fwhm_arcsec`` (measured on the drawn
        image); ``flux_radius_arcsec`` (companion ``flux_radius`` times the stamp pixel scale);
        ``redshift`` (companion ``ZPHOT``); ``class_star`` (NaN: not in the format); ``flags``
        (EDGE: the original stamp is larger than the output and was cropped);
        ``x_offset_px``, ``y_offset_px`` (0).
    meta : dict
        ``bands``, ``band_configs`` (the effective band), ``pixel_scale_arcsec``, ``size``,
        ``zeropoint_mag``, ``psf_broadening_fwhm_arcsec``, ``source_band``, ``catalog``,
        ``fits_catalog``, ``noise``, ``counts`` (``input``, ``drawn``, ``failed``), ``failures``
        (``[objectId, reason]``), ``provenance``.

    Raises
    ------
    InputError
        Missing or unreadable catalog, indices out of range.
    """
    band = band or get_band("hst", "F814W")
    catalog_file = Path(catalog_file)
    image_dir = Path(dir) if dir is not None else catalog_file.parent
    cat_path = catalog_file if catalog_file.exists() else image_dir / catalog_file
    if not cat_path.exists():
        raise InputError(str(catalog_file), "RealGalaxyCatalog file not found")
    try:
        rgc = galsim.RealGalaxyCatalog(str(cat_path.resolve()), dir=str(image_dir))
        rgc.getGalImage(0)  # fail here, naming the catalog, if the image files are missing
    except (OSError, galsim.GalSimError, KeyError, ValueError, IndexError) as exc:
        raise InputError(str(cat_path),
                         f"not a usable GalSim RealGalaxyCatalog (images in {image_dir}): {exc}") from exc
    n_all = rgc.nobjects
    rows = np.arange(n_all) if indices is None else np.asarray(indices, dtype=int).ravel()
    if rows.size and (rows.min() < 0 or rows.max() >= n_all):
        raise InputError(str(cat_path), f"indices out of range 0..{n_all - 1}")
    # Set-wide quantities (zero point, PSF broadening) come from the whole catalog, not from
    # ``indices``, so that a galaxy is drawn the same whatever subset is asked for.
    sample = np.arange(n_all) if n_all <= 200 else np.random.default_rng(0).choice(n_all, 200, replace=False)
    zp = _stamp_zeropoint(rgc, sample) if zeropoint_mag == "stamps" else float(zeropoint_mag)
    to_njy = 10.0 ** (-0.4 * (zp - NJY_ZEROPOINT))
    scale = band.pixel_scale_arcsec

    # 1. The target PSF, no sharper than the widest stamp PSF.
    if psf_broadening_fwhm_arcsec is None:
        extra = 0.0
        if n_all:
            p_scale = float(np.median(np.asarray(rgc.pixel_scale)[sample]))
            stamp_fwhm = max(measure_fwhm(rgc.getPSFImage(int(i)).array, pixel_scale_arcsec=float(rgc.pixel_scale[i]))
                             for i in sample)
            target_fwhm = measure_fwhm(draw_psf(band.psf, pixel_scale_arcsec=p_scale, size=101),
                                       pixel_scale_arcsec=p_scale)
            extra = 1.15 * math.sqrt(max(stamp_fwhm**2 - target_fwhm**2, 0.0))
    else:
        extra = float(psf_broadening_fwhm_arcsec)
    eff_band = band
    if extra > 0 and band.psf.kind == "airy":
        eff_band = dataclasses.replace(band, psf=dataclasses.replace(
            band.psf, jitter_fwhm_arcsec=math.hypot(band.psf.jitter_fwhm_arcsec, extra)))
        target_psf = psf_profile(eff_band.psf)
    elif extra > 0 and band.psf.kind == "gaussian":
        eff_band = dataclasses.replace(band, psf=dataclasses.replace(
            band.psf, fwhm_arcsec=math.hypot(band.psf.fwhm_arcsec, extra)))
        target_psf = psf_profile(eff_band.psf)
    elif extra > 0:
        target_psf = galsim.Convolve(psf_profile(band.psf), galsim.Gaussian(fwhm=extra))
    else:
        target_psf = psf_profile(band.psf)
    # The band's own noise per pixel (its depth with its nominal PSF), not the broadened PSF's.
    sky = band.sky_sigma * band.to_njy if target_sigma is None else float(target_sigma)

    companion, companion_path = _companion_columns(cat_path, fits_catalog, rgc)
    cat_table = Table.read(cat_path)
    lower = {c.lower(): c for c in cat_table.colnames}
    ra_all = np.asarray(cat_table[lower["ra"]], np.float64) if "ra" in lower else np.full(n_all, np.nan)
    dec_all = np.asarray(cat_table[lower["dec"]], np.float64) if "dec" in lower else np.full(n_all, np.nan)
    source_band = str(cat_table[lower["band"]][0]).strip() if "band" in lower and len(cat_table) else None

    # 2. Draw each galaxy; a failure is recorded, never silently dropped.
    pad_arcsec = size * scale * 1.5
    out_img, out_sig, out_fwhm, out_flags, done, failures = [], [], [], [], [], []
    for i in rows:
        ident = str(rgc.ident[i]).strip()
        oid = int(ident) if ident.lstrip("-").isdigit() else int(i)
        try:
            stamp = rgc.getGalImage(int(i))
            if not np.all(np.isfinite(stamp.array)):
                raise InputError(f"{cat_path}[{ident}]", "stamp has non-finite pixels")
            gen = np.random.default_rng([seed, int(i)])
            gs_rng = galsim.BaseDeviate(int(gen.integers(1, 2**31 - 1)))
            gal = galsim.RealGalaxy(rgc, index=int(i), flux_rescale=to_njy, noise_pad_size=pad_arcsec, rng=gs_rng)
            img = galsim.Convolve(gal, target_psf).drawImage(nx=size, ny=size, scale=scale)
            fwhm = measure_fwhm(img.array, pixel_scale_arcsec=scale)
            cf = _drawn_noise(rgc, int(i), target_psf, scale=scale, to_njy=to_njy, size=size, rng=gs_rng)
            var = float(img.whitenNoise(cf)) if noise == "whiten" else float(cf.getVariance())
            arr = img.array.astype(np.float64)
            if noise != "none" and sky**2 > var:
                arr = arr + gen.normal(0.0, math.sqrt(sky**2 - var), arr.shape)
                var = sky**2
        except (galsim.GalSimError, InputError, ValueError, RuntimeError, OSError) as exc:
            failures.append([oid, str(exc)])
            continue
        side_arcsec = max(stamp.array.shape) * float(rgc.pixel_scale[i])
        out_flags.append(_EDGE if side_arcsec > size * scale else 0)
        out_img.append(arr.astype(np.float32))
        out_sig.append(math.sqrt(var))
        out_fwhm.append(fwhm)
        done.append((int(i), oid))

    idx = np.array([d[0] for d in done], dtype=int)
    n = len(idx)
    mag = np.asarray(rgc.mag, np.float64)[idx]
    galaxies = {
        "image_hr": np.stack(out_img)[:, None] if n else np.zeros((0, 1, size, size), np.float32),
        "objectId": np.array([d[1] for d in done], np.int64),
        "ra_center": ra_all[idx],
        "dec_center": dec_all[idx],
        "mag": mag[:, None].astype(np.float32),
        "flux_njy": (10.0 ** (-0.4 * (mag - NJY_ZEROPOINT)))[:, None].astype(np.float32),
        "fwhm_arcsec": np.asarray(out_fwhm, np.float32),
        "flux_radius_arcsec": (companion["flux_radius"][idx]
                               * np.asarray(rgc.pixel_scale, float)[idx]).astype(np.float32),
        "redshift": companion["zphot"][idx].astype(np.float32),
        "class_star": np.full(n, np.nan, np.float32),
        "sigma_hr": np.asarray(out_sig, np.float32).reshape(n, 1),
        "flags": np.asarray(out_flags, np.int32),
        "x_offset_px": np.zeros(n, np.float32),
        "y_offset_px": np.zeros(n, np.float32),
    }
    meta = {
        "bands": (eff_band.key,),
        "band_configs": [to_dict(eff_band)],
        "pixel_scale_arcsec": scale,
        "size": size,
        "zeropoint_mag": zp,
        "psf_broadening_fwhm_arcsec": extra,
        "source_band": source_band,
        "catalog": str(cat_path),
        "fits_catalog": companion_path,
        "noise": noise,
        "counts": {"input": int(rows.size), "drawn": n, "failed": len(failures)},
        "failures": failures,
        "provenance": provenance(None, producer="cutouts.draw_real_galaxies", seed=seed),
    }
    return galaxies, meta


def _drawn_noise(rgc, i: int, target_psf, *, scale: float, to_njy: float, size: int, rng):
    """Correlated noise of stamp ``i`` after the draw chain, measured on a pure-noise field.

    A field of the stamp's noise (its correlation function and variance, in nJy) is deconvolved
    by the stamp PSF, convolved with the target PSF and drawn at ``scale``, exactly as the galaxy;
    the correlation function is estimated on the interior of the drawn field.
    """
    s0 = float(rgc.pixel_scale[i])
    cn = rgc.getNoise(i, rng=rng).withScaledVariance(to_njy**2)
    n_out = 2 * size
    n_in = int(math.ceil(n_out * scale / s0))
    field = galsim.ImageD(n_in, n_in, scale=s0)
    field.addNoise(cn)
    noise_gal = galsim.RealGalaxy.makeFromImage(field, rgc.getPSF(i), cn)
    drawn = galsim.Convolve(noise_gal, target_psf).drawImage(nx=n_out, ny=n_out, scale=scale)
    m = size // 4
    inner = drawn[galsim.BoundsI(drawn.xmin + m, drawn.xmax - m, drawn.ymin + m, drawn.ymax - m)]
    return galsim.CorrelatedNoise(inner, rng=rng, correct_periodicity=True)
