"""Tiles: the unit of work of the field pipeline -- the FITS layout, reading and validation.

A *field* is a set of overlapping tiles (survey coadd patches). One tile is a multi-extension FITS
file, as survey coadd patches come:

==========  ===========================================================================================
HDU         content
==========  ===========================================================================================
primary     header only: ``TILEID`` (int, unique in the field), ``BANDS`` (comma-separated band keys
            ``survey/name`` in plane order, e.g. ``hsc/i``; ``FILTER`` is accepted for one band),
            optional ``SIMULATD`` (a simulated high-resolution tile with truth)
``IMAGE``   float ``(C, H, W)`` or ``(H, W)``, nJy per pixel (``BUNIT = 'nJy'``; otherwise ``MAGZERO``
            converts); the celestial WCS; optional inner region ``INNRX0 INNRX1 INNRY0 INNRY1``
            (0-based continuous pixel coordinates: the tile owns sources with
            ``INNRX0 <= x < INNRX1`` and ``INNRY0 <= y < INNRY1``; default the whole tile) and
            ``TRACTX0 TRACTY0`` (integer position of pixel (0, 0) on the grid shared by all tiles
            of the field, as patches of a tract share one projection)
``VARIANCE`` same shape, nJy^2 (or ``WEIGHT`` = 1 / variance)
``MASK``    optional, same shape, integer; non-zero pixels are not used
``PSF``     ``(C, P, P)`` or ``(P, P)``, odd P, the effective PSF at the tile's pixel scale
``FLAGS``   optional ``(H, W)`` integer: bits of :data:`galgan_ray.flags.FLAGS` per pixel (``SATURATED``,
            ``BRIGHT_OBJECT``, ``NO_DATA``: a survey's mask planes, :mod:`galgan_ray.survey`); the
            footprints holding them pass them to their children (usable pixels stay usable)
``TRUTH``   optional binary table of the true sources (simulated tiles): ``truthId``, ``ra``,
            ``dec`` (deg), ``x``, ``y`` (0-based px of this tile), ``mag`` (AB), ``flux_njy``,
            ``hlr_arcsec``, ``flux_radius_arcsec``, ``fwhm_arcsec``, ``redshift``, ``is_star``
==========  ===========================================================================================

:func:`read_tile` parses the bytes of such a file and checks everything the pipeline relies on;
every problem raises :class:`~galgan_ray.errors.InputError` naming the file and the problem
(corrupt or truncated FITS, missing extension, NaNs, all-zero bands, missing WCS, missing or
non-finite PSF, shape mismatches, variance <= 0, band count). Tiles can also come as Parquet files
(one row per tile, :func:`write_tiles_parquet`); :func:`read_tile_source` checks their rows the same
way and names a truncated file. Whether a tile suits the model (bands, pixel scale) is checked by
:func:`galgan_ray.field.check_tile`.

:func:`galgan_ray.sky.make_simulated_field` draws one CANDELS-like HST mosaic over the
whole field and cuts it into overlapping high-resolution tiles that carry their truth catalog; the
pipeline degrades them to HSC-like tiles itself (simulation mode). Tiles share pixels in their
overlaps (one sky), with a border of ``border_arcsec`` on every side.
"""
from __future__ import annotations

import io
import json
import posixpath
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.table import Table
from astropy.wcs import WCS

from .errors import InputError
from .geometry import pixel_scale_of
from .instrument import NJY_ZEROPOINT
from .psf import normalize_psf
from .shards import write_atomic, write_table

__all__ = ["Tile", "read_tile", "tile_to_fits_bytes", "write_tile", "list_tile_sources",
           "read_tile_source", "read_url_bytes", "write_tiles_parquet", "pack_arrays", "unpack_arrays", "pack_tile",
           "unpack_tile", "pack_tile_arrays", "tile_from_arrays", "TRUTH_COLUMNS", "PATCH_TAG", "normalize_band",
           "patch_source", "parse_patch_source", "group_survey_files"]

#: Columns of a tile's truth table (simulated tiles).
TRUTH_COLUMNS: tuple[str, ...] = ("truthId", "ra", "dec", "x", "y", "mag", "flux_njy", "hlr_arcsec",
                                  "flux_radius_arcsec", "fwhm_arcsec", "redshift", "is_star")
_TRUTH_DTYPES = {"truthId": np.int64, "ra": np.float64, "dec": np.float64, "x": np.float64, "y": np.float64,
                 "mag": np.float32, "flux_njy": np.float64, "hlr_arcsec": np.float32,
                 "flux_radius_arcsec": np.float32, "fwhm_arcsec": np.float32, "redshift": np.float32,
                 "is_star": bool}


# ------------------------------------------------------------------------------------------------
# The in-memory tile
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Tile:
    """One tile of a field, validated, in the package's conventions.

    Attributes
    ----------
    tile_id : int
        ``TILEID``.
    source : str
        URL the tile was read from (``url#row=i`` for a row of a Parquet file).
    image : numpy.ndarray
        float32 ``(C, H, W)``, nJy per pixel; masked pixels are 0.
    variance : numpy.ndarray
        float32 ``(C, H, W)``, nJy^2; ``inf`` where a pixel must not be used (masked, non-finite).
    mask : numpy.ndarray
        int32 ``(C, H, W)``; the input mask (non-zero = bad), plus bit 30 where the pipeline found
        non-finite values in masked pixels.
    psf : numpy.ndarray
        float64 ``(C, P, P)``, unit sum per band, odd P.
    wcs_header : str
        The celestial WCS as FITS header text (``astropy.wcs.WCS.to_header(relax=True)``).
    bands : tuple of str
        Band keys ``survey/name`` per plane.
    inner : tuple of float
        ``(x_lo, x_hi, y_lo, y_hi)`` 0-based continuous pixel bounds of the region the tile owns.
    tract_origin : tuple of int or None
        Pixel (0, 0) of the tile on the field's common grid (``TRACTX0``, ``TRACTY0``).
    truth : dict of numpy.ndarray or None
        The truth table (:data:`TRUTH_COLUMNS`), positions in this tile's pixels.
    simulated : bool
        A simulated high-resolution tile (``SIMULATD``).
    pixel_flags : numpy.ndarray or None
        int64 ``(H, W)``: :data:`galgan_ray.flags.FLAGS` bits per pixel from the survey's mask planes
        (``SATURATED``, ``BRIGHT_OBJECT``, ``NO_DATA``), or None.
    input_wcs_header : str or None
        A survey image brought onto the model's grid (:func:`galgan_ray.survey.to_model_tile`): the
        celestial WCS of the image as delivered, in whose pixels the catalog reports positions
        (:meth:`catalog_pixels`). Not written to tile FITS files.
    detections : numpy.ndarray or None
        float64 ``(D, 2)`` (x, y) in this tile's pixels: a survey image's plain detection on its own
        pixels (:func:`galgan_ray.survey.native_detections`), which the support test uses
        (:attr:`galgan_ray.field.Footprints.detections`). Not written to tile FITS files.
    """

    tile_id: int
    source: str
    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    psf: np.ndarray
    wcs_header: str
    bands: tuple[str, ...]
    inner: tuple[float, float, float, float]
    tract_origin: tuple[int, int] | None = None
    truth: dict[str, np.ndarray] | None = None
    simulated: bool = False
    pixel_flags: np.ndarray | None = None
    input_wcs_header: str | None = None
    detections: np.ndarray | None = None
    _wcs: Any = field(default=None, repr=False)

    @property
    def wcs(self):
        """The tile's celestial :class:`astropy.wcs.WCS` (built once)."""
        if self._wcs is None:
            self._wcs = WCS(fits.Header.fromstring(self.wcs_header)).celestial
        return self._wcs

    def catalog_pixels(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """0-based positions as the catalog reports them: in the input image's pixels (through the sky)
        for a survey image on the model's grid (:attr:`input_wcs_header`), else the tile's own."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if self.input_wcs_header is None or not x.size:
            return x, y
        ra, dec = self.wcs.pixel_to_world_values(x, y)
        wcs_in = WCS(fits.Header.fromstring(self.input_wcs_header)).celestial
        xi, yi = wcs_in.world_to_pixel_values(ra, dec)
        return np.asarray(xi, dtype=np.float64), np.asarray(yi, dtype=np.float64)

    @property
    def pixel_scale_arcsec(self) -> float:
        """Mean pixel scale of the WCS (arcsec)."""
        return pixel_scale_of(self.wcs)

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the image planes."""
        return tuple(self.image.shape[1:])

    @property
    def n_bands(self) -> int:
        return int(self.image.shape[0])

    def owns(self, x, y) -> np.ndarray:
        """True where 0-based pixel positions ``(x, y)`` lie in the tile's inner region."""
        x0, x1, y0, y1 = self.inner
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)

    def inner_area_deg2(self) -> float:
        """Sky area of the inner region clipped to the image (deg^2)."""
        h, w = self.shape
        x0, x1, y0, y1 = self.inner
        nx = max(0.0, min(x1, w - 0.5) - max(x0, -0.5))
        ny = max(0.0, min(y1, h - 0.5) - max(y0, -0.5))
        return nx * ny * (self.pixel_scale_arcsec / 3600.0) ** 2


# ------------------------------------------------------------------------------------------------
# FITS <-> Tile
# ------------------------------------------------------------------------------------------------
def _planes(arr: np.ndarray, name: str, source: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise InputError(source, f"{name} must be 2-D (H, W) or 3-D (C, H, W), got shape {a.shape}")
    return a.astype(a.dtype.newbyteorder("="), copy=False)


def _bands_of(header, n: int, source: str) -> tuple[str, ...]:
    raw = header.get("BANDS")
    if raw is None and header.get("FILTER") is not None:
        raw = str(header["FILTER"])
    if raw is None:
        raise InputError(source, "no BANDS (or FILTER) keyword naming the band(s) of the image planes")
    bands = tuple(b.strip() for b in str(raw).split(",") if b.strip())
    if len(bands) != n:
        raise InputError(source, f"BANDS lists {len(bands)} band(s) {list(bands)} but IMAGE has {n} plane(s)")
    return bands


def _check_pixels(image: np.ndarray, var: np.ndarray, mask: np.ndarray, *, bands: Sequence[str], source: str,
                  vname: str = "VARIANCE") -> np.ndarray:
    """The usable pixels (``mask == 0``) after checking them; raises naming ``source`` and the problem.

    Unmasked pixels must be finite with a finite variance > 0, some pixel must be unmasked, and
    no band may be all zeros: a real exposure has noise, so an all-zero plane is an empty or unfilled
    one (a missing band written as zeros), not data -- it would give an empty catalog, not a failure.
    """
    good = mask == 0
    bad_img = good & ~np.isfinite(image)
    if bad_img.any():
        raise InputError(source, f"IMAGE has {int(bad_img.sum())} non-finite (NaN/inf) unmasked pixel(s)")
    bad_var = good & ~(np.isfinite(var) & (var > 0))
    if bad_var.any():
        raise InputError(source, f"{vname} has {int(bad_var.sum())} unmasked pixel(s) with variance <= 0 or "
                                 f"non-finite")
    if not good.any():
        raise InputError(source, "every pixel is masked")
    for b, band in enumerate(bands):
        if not np.any(np.where(good[b], image[b], 0.0)):
            raise InputError(source, f"all pixels are zero in band {band} (an empty or unfilled exposure: "
                                     f"a real one has noise)")
    return good


def _check_psf(psf: np.ndarray, n_bands: int, source: str) -> np.ndarray:
    """PSF planes ``(n_bands, P, P)``, float64, unit sum; raises naming ``source`` and the problem."""
    psf = _planes(psf, "PSF", source).astype(np.float64)
    if psf.shape[0] not in (1, n_bands):
        raise InputError(source, f"PSF has {psf.shape[0]} planes for {n_bands} band(s)")
    if psf.shape[1] != psf.shape[2] or psf.shape[1] % 2 == 0:
        raise InputError(source, f"PSF planes must be square with odd sides, got {psf.shape[1:]}")

    return np.stack([normalize_psf(p, source=source) for p in np.broadcast_to(psf, (n_bands,) + psf.shape[1:])])


def _check_pixel_scale(wcs, source: str) -> float:
    """The mean pixel scale of a celestial WCS (arcsec), or InputError when it has none that is usable."""
    try:
        scale = pixel_scale_of(wcs)
    except Exception as exc:  # noqa: BLE001
        raise InputError(source, f"the IMAGE WCS has no usable pixel scale: {exc}") from None
    if not (np.isfinite(scale) and scale > 0):
        raise InputError(source, f"the IMAGE WCS gives a pixel scale of {scale}\"")
    return float(scale)


def _validate_tile(tile: Tile) -> Tile:
    """Check a tile that did not come through :func:`read_tile` (a Parquet row) the same way.

    Raises
    ------
    InputError
        Naming ``tile.source``: arrays of the wrong rank or shapes, a band list that does not match the
        planes, non-finite or all-zero pixels, a variance <= 0, a bad PSF, or no celestial WCS.
    """
    source = tile.source
    image = _planes(tile.image, "IMAGE", source)
    c = image.shape[0]
    var, mask = np.asarray(tile.variance), np.asarray(tile.mask)
    for name, arr in (("VARIANCE", var), ("MASK", mask)):
        if arr.shape != image.shape:
            raise InputError(source, f"{name} shape {arr.shape} differs from IMAGE shape {image.shape}")
    if len(tile.bands) != c:
        raise InputError(source, f"BANDS lists {len(tile.bands)} band(s) {list(tile.bands)} but IMAGE has "
                                 f"{c} plane(s)")
    _check_pixels(image, var, mask, bands=tile.bands, source=source)
    tile.psf = _check_psf(tile.psf, c, source)
    tile.pixel_flags = _check_pixel_flags(tile.pixel_flags, image.shape[1:], source)
    try:
        has_celestial = tile.wcs.has_celestial and tile.wcs.naxis == 2
    except Exception as exc:  # noqa: BLE001
        raise InputError(source, f"the tile holds an unreadable WCS: {exc}") from None
    if not has_celestial:
        raise InputError(source, "no celestial WCS (CTYPE/CRVAL/CRPIX/CD keywords)")
    _check_pixel_scale(tile.wcs, source)
    return tile


def _truth_from_table(table, source: str) -> dict[str, np.ndarray]:
    missing = [c for c in TRUTH_COLUMNS if c not in table.colnames]
    if missing:
        raise InputError(source, f"TRUTH table lacks column(s) {missing}")
    return {c: np.asarray(table[c]).astype(_TRUTH_DTYPES[c]) for c in TRUTH_COLUMNS}


def read_tile(data: bytes, *, source: str) -> Tile:
    """Parse and validate the bytes of a tile FITS file.

    Parameters
    ----------
    data : bytes
        The whole file.
    source : str
        Its URL, used in every error message.

    Returns
    -------
    Tile

    Raises
    ------
    InputError
        ``"<source>: <problem>"`` for a corrupt or truncated file, a missing ``IMAGE``,
        ``VARIANCE``/``WEIGHT`` or ``PSF`` extension, a missing ``TILEID``, no celestial WCS in the
        ``IMAGE`` header, planes of different shapes, non-finite unmasked pixels, a variance <= 0 in
        an unmasked pixel, a band whose pixels are all zero, a PSF that is not finite, or a band list
        that does not match the planes.
    """
    if not data:
        raise InputError(source, "is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", VerifyWarning)
            warnings.filterwarnings("error", message=".*truncated.*")  # astropy only warns otherwise
            hdul = fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False)
            hdul.verify("exception")
            names = [h.name for h in hdul]
            arrays = {}
            for name in ("IMAGE", "VARIANCE", "WEIGHT", "MASK", "PSF", "FLAGS"):
                if name in names:
                    d = hdul[name].data
                    arrays[name] = None if d is None else np.array(d)
            truth_hdu = hdul["TRUTH"] if "TRUTH" in names else None
            truth_table = Table.read(truth_hdu) if truth_hdu is not None else None
            primary = hdul[0].header.copy()
            img_header = hdul["IMAGE"].header.copy() if "IMAGE" in names else None
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - astropy raises OSError, TypeError, ValueError, VerifyError...
        raise InputError(source, f"not a readable FITS file (corrupt or truncated?): {type(exc).__name__}: {exc}") from None

    if img_header is None or arrays.get("IMAGE") is None:
        raise InputError(source, f"no IMAGE extension with data (extensions: {names})")
    header = primary.copy()
    header.update(img_header)
    image = _planes(arrays["IMAGE"], "IMAGE", source)
    c, h, w = image.shape
    if h < 8 or w < 8:
        raise InputError(source, f"IMAGE planes of {h}x{w} px are too small to process")

    if "TILEID" not in header:
        raise InputError(source, "no TILEID keyword in the primary or IMAGE header")
    try:
        tile_id = int(header["TILEID"])
    except (TypeError, ValueError):
        raise InputError(source, f"TILEID {header['TILEID']!r} is not an integer") from None
    if not 0 <= tile_id < 2**38:
        raise InputError(source, f"TILEID {tile_id} outside [0, 2^38) (object ids are (TILEID << 24) | n)")
    bands = _bands_of(header, c, source)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(img_header)
    except Exception as exc:  # noqa: BLE001
        raise InputError(source, f"the IMAGE header holds an unreadable WCS: {exc}") from None
    if not wcs.has_celestial:
        raise InputError(source, "no celestial WCS in the IMAGE header (CTYPE/CRVAL/CRPIX/CD keywords)")
    wcs = wcs.celestial
    _check_pixel_scale(wcs, source)

    # Units: nJy per pixel, or converted with the zero point.
    bunit = str(header.get("BUNIT", "nJy")).strip()
    zp = header.get("MAGZERO", header.get("PHOTZP"))
    if bunit.lower() != "njy":
        if zp is None:
            raise InputError(source, f"BUNIT is {bunit!r}, not nJy, and there is no MAGZERO to convert")
        factor = 10.0 ** (-0.4 * (float(zp) - NJY_ZEROPOINT))
    elif zp is not None and abs(float(zp) - NJY_ZEROPOINT) > 1e-6:
        raise InputError(source, f"BUNIT is nJy but MAGZERO is {zp}, not {NJY_ZEROPOINT}")
    else:
        factor = 1.0

    mask = np.zeros((c, h, w), dtype=np.int32)
    if arrays.get("MASK") is not None:
        m = _planes(arrays["MASK"], "MASK", source)
        if m.shape[1:] != (h, w) or m.shape[0] not in (1, c):
            raise InputError(source, f"MASK shape {m.shape} differs from IMAGE shape {image.shape}")
        if not np.issubdtype(m.dtype, np.integer) and not np.issubdtype(m.dtype, np.bool_):
            raise InputError(source, f"MASK must be integer, got {m.dtype}")
        mask = np.broadcast_to(m.astype(np.int32), (c, h, w)).copy()

    if arrays.get("VARIANCE") is not None:
        var = _planes(arrays["VARIANCE"], "VARIANCE", source).astype(np.float64)
        vname = "VARIANCE"
    elif arrays.get("WEIGHT") is not None:
        wt = _planes(arrays["WEIGHT"], "WEIGHT", source).astype(np.float64)
        with np.errstate(divide="ignore"):
            var = np.where(wt > 0, 1.0 / np.where(wt > 0, wt, 1.0), 0.0)
        vname = "WEIGHT"
    else:
        raise InputError(source, "no VARIANCE or WEIGHT extension")
    if var.shape != image.shape:
        raise InputError(source, f"{vname} shape {var.shape} differs from IMAGE shape {image.shape}")

    image = image.astype(np.float64) * factor
    var = var * factor**2
    good = _check_pixels(image, var, mask, bands=bands, source=source, vname=vname)
    image = np.where(good & np.isfinite(image), image, 0.0).astype(np.float32)
    var = np.where(good, var, np.inf).astype(np.float32)

    if arrays.get("PSF") is None:
        raise InputError(source, "no PSF extension")
    psf = _check_psf(arrays["PSF"], c, source)

    inner = (-0.5, w - 0.5, -0.5, h - 0.5)
    keys = ("INNRX0", "INNRX1", "INNRY0", "INNRY1")
    if any(k in header for k in keys):
        if not all(k in header for k in keys):
            raise InputError(source, f"the inner region needs all of {keys}")
        inner = tuple(float(header[k]) for k in keys)
        if not (inner[0] < inner[1] and inner[2] < inner[3]):
            raise InputError(source, f"empty inner region {inner}")
    origin = None
    if "TRACTX0" in header and "TRACTY0" in header:
        origin = (int(header["TRACTX0"]), int(header["TRACTY0"]))

    truth = _truth_from_table(truth_table, source) if truth_table is not None else None
    pixel_flags = _check_pixel_flags(arrays.get("FLAGS"), (h, w), source)
    return Tile(tile_id=tile_id, source=source, image=image, variance=var, mask=mask, psf=psf,
                wcs_header=wcs.to_header(relax=True).tostring(), bands=bands, inner=inner, tract_origin=origin,
                truth=truth, simulated=bool(header.get("SIMULATD", False)), pixel_flags=pixel_flags)


def _check_pixel_flags(flags, shape: tuple[int, int], source: str) -> np.ndarray | None:
    """The ``FLAGS`` plane as int64 ``(H, W)`` (None when absent); raises naming ``source``."""
    if flags is None:
        return None
    f = np.asarray(flags)
    if f.ndim == 3 and f.shape[0] == 1:
        f = f[0]
    if f.shape != tuple(shape):
        raise InputError(source, f"FLAGS shape {f.shape} differs from the image planes' {tuple(shape)}")
    if not (np.issubdtype(f.dtype, np.integer) or np.issubdtype(f.dtype, np.bool_)):
        raise InputError(source, f"FLAGS must be integer, got {f.dtype}")
    return f.astype(np.int64)


def tile_to_fits_bytes(tile: Tile, *, extra_header: Mapping[str, Any] | None = None) -> bytes:
    """The FITS bytes of a tile in the layout of the module docstring (inverse of :func:`read_tile`)."""
    primary = fits.PrimaryHDU()
    ph = primary.header
    ph["TILEID"] = (int(tile.tile_id), "tile id, unique in the field")
    ph["BANDS"] = (",".join(tile.bands), "band keys survey/name of the image planes")
    ph["SIMULATD"] = (bool(tile.simulated), "simulated high-resolution tile with truth")
    for k, v in (extra_header or {}).items():
        ph[k] = v
    hdr = fits.Header.fromstring(tile.wcs_header)
    hdr["BUNIT"] = ("nJy", "per pixel")
    for k, v in zip(("INNRX0", "INNRX1", "INNRY0", "INNRY1"), tile.inner):
        hdr[k] = (float(v), "inner region, 0-based pixel coordinates")
    if tile.tract_origin is not None:
        hdr["TRACTX0"] = (int(tile.tract_origin[0]), "pixel (0,0) on the field grid, x")
        hdr["TRACTY0"] = (int(tile.tract_origin[1]), "pixel (0,0) on the field grid, y")
    var = np.where(np.isfinite(tile.variance), tile.variance, 0.0).astype(np.float32)
    mask = tile.mask.astype(np.int32) | np.where(np.isfinite(tile.variance), 0, 1).astype(np.int32)
    hdus = [primary,
            fits.ImageHDU(np.asarray(tile.image, dtype=np.float32), header=hdr, name="IMAGE"),
            fits.ImageHDU(var, name="VARIANCE"),
            fits.ImageHDU(mask, name="MASK"),
            fits.ImageHDU(np.asarray(tile.psf, dtype=np.float32), name="PSF")]
    if tile.pixel_flags is not None:
        hdus.append(fits.ImageHDU(np.asarray(tile.pixel_flags, dtype=np.int64), name="FLAGS"))
    if tile.truth is not None:
        hdus.append(fits.BinTableHDU(Table({c: tile.truth[c] for c in TRUTH_COLUMNS}), name="TRUTH"))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def write_tile(tile: Tile, url: str, *, storage_options: Mapping | None = None) -> str:
    """Write a tile FITS file to any fsspec URL (through a temporary name, then moved)."""
    data = tile_to_fits_bytes(tile)
    write_atomic(url, lambda fh: fh.write(data), storage_options=storage_options)
    return url


# ------------------------------------------------------------------------------------------------
# Parquet tiles (one row per tile) and the packing used between pipeline stages
# ------------------------------------------------------------------------------------------------
def pack_tile_arrays(tile: Tile) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays = {"image": tile.image, "variance": tile.variance, "mask": tile.mask, "psf": tile.psf}
    if tile.truth is not None:
        arrays.update({f"truth.{k}": np.asarray(v) for k, v in tile.truth.items()})
    if tile.pixel_flags is not None:
        arrays["pixel_flags"] = np.asarray(tile.pixel_flags, dtype=np.int64)
    if tile.detections is not None:
        arrays["detections"] = np.asarray(tile.detections, dtype=np.float64).reshape(-1, 2)
    meta = {"tile_id": int(tile.tile_id), "source": tile.source, "wcs_header": tile.wcs_header,
            "bands": list(tile.bands), "inner": [float(v) for v in tile.inner],
            "tract_origin": None if tile.tract_origin is None else [int(v) for v in tile.tract_origin],
            "simulated": bool(tile.simulated), "input_wcs_header": tile.input_wcs_header}
    return arrays, meta


def tile_from_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], source: str | None = None) -> Tile:
    truth_keys = [k for k in arrays if k.startswith("truth.")]
    truth = {k[len("truth."):]: np.asarray(arrays[k]) for k in truth_keys} or None
    return Tile(tile_id=int(meta["tile_id"]), source=source or meta["source"], image=np.asarray(arrays["image"]),
                variance=np.asarray(arrays["variance"]), mask=np.asarray(arrays["mask"]),
                psf=np.asarray(arrays["psf"]), wcs_header=meta["wcs_header"], bands=tuple(meta["bands"]),
                inner=tuple(meta["inner"]), tract_origin=None if meta.get("tract_origin") is None
                else tuple(meta["tract_origin"]), truth=truth, simulated=bool(meta.get("simulated", False)),
                pixel_flags=None if arrays.get("pixel_flags") is None else np.asarray(arrays["pixel_flags"]),
                input_wcs_header=meta.get("input_wcs_header"),
                detections=None if arrays.get("detections") is None else np.asarray(arrays["detections"]))


def pack_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    """Arrays and a JSON-able dict as one ``.npz`` byte string (no pickle; shapes and dtypes kept).

    Tiles of different shapes travel between Ray Data stages as one binary column built with this:
    tensor columns need one shape per block, a tile does not fit in one.
    """
    buf = io.BytesIO()
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(buf, **payload)
    return buf.getvalue()


def unpack_arrays(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of :func:`pack_arrays`."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
        meta = json.loads(z["__meta__"].tobytes().decode())
    return arrays, meta


def pack_tile(tile: Tile, *, extra: Mapping[str, np.ndarray] | None = None,
              info: Mapping[str, Any] | None = None) -> bytes:
    """A tile plus pipeline products (``extra`` arrays, ``info`` dict) as bytes (:func:`pack_arrays`)."""
    arrays, meta = pack_tile_arrays(tile)
    arrays = {f"tile.{k}": v for k, v in arrays.items()}
    arrays.update({f"x.{k}": v for k, v in (extra or {}).items()})
    return pack_arrays(arrays, {"tile": meta, "info": dict(info or {})})


def unpack_tile(data: bytes) -> tuple[Tile, dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of :func:`pack_tile`: ``(tile, extra, info)``."""
    arrays, meta = unpack_arrays(data)
    tile = tile_from_arrays({k[5:]: v for k, v in arrays.items() if k.startswith("tile.")}, meta["tile"])
    extra = {k[2:]: v for k, v in arrays.items() if k.startswith("x.")}
    return tile, extra, meta.get("info", {})


def write_tiles_parquet(tiles: Sequence[Tile], url: str, *, storage_options: Mapping | None = None) -> str:
    """Write tiles as one Parquet file, one row per tile (a ``tile`` binary column of
    :func:`pack_tile` bytes beside ``tileId`` and ``bands``)."""
    table = pa.table({"tileId": pa.array([int(t.tile_id) for t in tiles], pa.int64()),
                      "bands": pa.array([",".join(t.bands) for t in tiles]),
                      "tile": pa.array([pack_tile(t) for t in tiles], pa.binary())})
    return write_table(table, url, storage_options=storage_options)


# ------------------------------------------------------------------------------------------------
# Listing and reading sources
# ------------------------------------------------------------------------------------------------
_FITS_EXT = (".fits", ".fit", ".fts", ".fits.gz", ".fits.fz")

# ------------------------------------------------------------------------------------------------
# Survey files as delivered: the naming rule that groups a folder of cutouts/patches into patches
# ------------------------------------------------------------------------------------------------
#: The fragment of a source that lists the files of one survey patch: ``FOLDER/KEY#patch={json}``,
#: the JSON mapping each band to ``[image URL, PSF URL or null]`` (:func:`patch_source`).
PATCH_TAG = "#patch="
#: A band in a file name: a token (between ``-``, ``_``, ``.`` or the ends) that is one of ugrizy, i2, r2 or a
#: narrow band (NB0921, N921), optionally after ``HSC-`` (``..._i.fits``, ``...-HSC-I-9813-...fits``).
_BAND_IN_NAME = re.compile(r"(?i)(?:(?<=^)|(?<=[-_.]))(?:hsc[-_])?([ugrizy]|[ir]2|nb?\d{3,4})(?=$|[-_.])")
_PSF_IN_NAME = re.compile(r"(?i)(?:^|[-_.])psf(?:$|[-_.])")
#: Primary-header keywords of the package's own tiles (a FITS file with none of them is a survey file).
_TILE_KEYS = ("TILEID", "BANDS", "SIMULATD")


def normalize_band(name: str | None) -> str:
    """A band as the naming rule compares it: lower case, no survey prefix (``HSC-I``, ``hsc_udeep/i`` and HSC's second
    i filter ``HSC-I2`` -> ``i``, ``HSC-R2`` -> ``r``, ``NB0921`` -> ``nb0921``); ``""`` for None."""
    if not name:
        return ""
    b = str(name).strip().split("/")[-1].lower()
    for prefix in ("hsc-", "hsc_", "lsst-", "lsst_"):
        b = b.removeprefix(prefix)
    return b[:1] if b in ("i2", "r2") else b


def _stem(url: str) -> str:
    name = posixpath.basename(url.split("#", 1)[0])
    low = name.lower()
    for ext in sorted(_FITS_EXT, key=len, reverse=True):
        if low.endswith(ext):
            return name[:-len(ext)]
    return name


def _band_span(stem: str, band: str | None = None) -> re.Match | None:
    """The last band token of a file name (of ``band`` when given)."""
    found = [m for m in _BAND_IN_NAME.finditer(stem) if band is None or normalize_band(m.group(1)) == band]
    return found[-1] if found else None


def _lead_token(stem: str) -> str:
    return re.split(r"[-_]", stem, maxsplit=1)[0]


def patch_source(key: str, files: Mapping[str, tuple[str, str | None]]) -> str:
    """The source naming one survey patch: ``KEY#patch={band: [image, psf]}`` (:data:`PATCH_TAG`)."""
    payload = {b: [img, psf] for b, (img, psf) in sorted(files.items())}
    return key + PATCH_TAG + json.dumps(payload, separators=(",", ":"))


def parse_patch_source(source: str) -> tuple[str, dict[str, tuple[str, str | None]]]:
    """Inverse of :func:`patch_source`: ``(key, {band: (image, psf)})``; raises InputError naming it."""
    key, _, text = source.partition(PATCH_TAG)
    try:
        files = {str(b): (str(v[0]), None if v[1] is None else str(v[1])) for b, v in json.loads(text).items()}
    except (ValueError, TypeError, IndexError, AttributeError):
        raise InputError(source, "not a survey patch source (KEY#patch={band: [image, psf]})") from None
    if not files:
        raise InputError(source, "the patch lists no image")
    return key, files


def group_survey_files(images: Sequence[tuple[str, str | None]], psfs: Sequence[str]) -> list[str]:
    """Survey images and PSF files grouped into patches by the naming rule (one source per patch).

    The rule, for files as the HSC data-access service and PSF picker name them
    (``149.2558,2.5652_300x300_i.fits`` + ``149.2558,2.5652_i_psf.fits``;
    ``10-cutout-HSC-I-9813-pdr2_dud.fits`` + ``10-psf-calexp-pdr2_dud-HSC-I-9813-4,3-150.18-2.11.fits``):

    1. an image's band is its ``FILTER``/``BAND`` keyword (given with it), else the band token of its
       name (:data:`_BAND_IN_NAME`);
    2. its patch is its folder and its name less that band token: the bands of one patch differ only
       by the band;
    3. its PSF is a file with ``psf`` as a token of its name, the same band token and the same first
       token (the object or position id before the first ``-`` or ``_``), in the image's folder if one
       is, else anywhere in the inputs (``hsc/`` beside ``hsc_psf/``); none: the image's PSF HDU, if it
       has one, or a failure when read.

    A patch holding two images of one band lists the first; the second becomes its own patch.

    Parameters
    ----------
    images : sequence of (url, band or None)
    psfs : sequence of str

    Returns
    -------
    list of str
        :func:`patch_source` strings.
    """
    psf_info = []
    for u in psfs:
        st = _stem(u)
        m = _band_span(st)
        psf_info.append((u, posixpath.dirname(u), _lead_token(st), normalize_band(m.group(1)) if m else ""))
    patches: dict[str, dict[str, tuple[str, str | None]]] = {}
    for url, band in sorted(images):
        st = _stem(url)
        b = normalize_band(band)
        m = _band_span(st, b or None) if b else _band_span(st)
        if not b and m is not None:
            b = normalize_band(m.group(1))
        name_key = re.sub(r"([-_.])[-_.]+", r"\1", st[:m.start()] + st[m.end():]).strip("-_.") if m is not None else st
        folder = posixpath.dirname(url)
        cands = [p for p in psf_info if p[2] == _lead_token(st) and p[3] == b]
        here = [p for p in cands if p[1] == folder]
        cands = here or cands
        psf = max(cands, key=lambda p: len(posixpath.commonprefix([_stem(p[0]), st])))[0] if cands else None
        key = posixpath.join(folder, name_key or st)
        while b in patches.get(key, {}):  # a second image of one band: a patch of its own
            key += "+"
        patches.setdefault(key, {})[b] = (url, psf)
    return [patch_source(k, v) for k, v in sorted(patches.items())]


def _peek_primary(fs, path: str):
    """The primary header of a FITS file (gzip too), or None when it cannot be read."""
    try:
        with fs.open(path, "rb", compression="infer") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fits.Header.fromfile(fh)
    except Exception:  # noqa: BLE001 - unreadable: kept as a tile source, a failure when read
        return None


def _read_manifest(fs, path: str, full) -> list[str]:
    """Patches from a manifest CSV (columns ``patch, band, image, psf``; paths relative to its folder)."""
    import csv

    with fs.open(path, "rt") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"patch", "band", "image"} <= set(rows[0]):
        raise InputError(full(path), "a manifest needs the columns patch, band, image (and psf)")
    folder = posixpath.dirname(path)

    def resolve(p):
        p = (p or "").strip()
        if not p:
            return None
        return p if ("://" in p or p.startswith("/")) else full(posixpath.normpath(posixpath.join(folder, p)))

    patches: dict[str, dict[str, tuple[str, str | None]]] = {}
    for i, r in enumerate(rows):
        b, img = normalize_band(r.get("band")), resolve(r.get("image"))
        if img is None:
            raise InputError(full(path), f"row {i + 1} names no image")
        key = posixpath.join(full(folder), str(r.get("patch", "")).strip() or _stem(img))
        if b in patches.get(key, {}):
            raise InputError(full(path), f"row {i + 1}: patch {r.get('patch')!r} lists band {b!r} twice")
        patches.setdefault(key, {})[b] = (img, resolve(r.get("psf")))
    return [patch_source(k, v) for k, v in sorted(patches.items())]


def _protocol_prefix(fs) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "" if protocol in ("file", "local") else f"{protocol}://"


def _parquet_rows(fs, path: str) -> int | None:
    """Rows of a Parquet file of tiles, or None when it cannot be read (kept as one source, which then
    becomes a failure row naming the problem instead of stopping the listing)."""
    try:
        with fs.open(path, "rb") as fh:
            return int(pq.ParquetFile(fh).metadata.num_rows)
    except Exception:  # noqa: BLE001 - missing, truncated, not Parquet: reported when read
        return None


def list_tile_sources(urls: str | Sequence[str], *, storage_options: Mapping | None = None) -> list[str]:
    """Tile sources under ``urls`` (files, directories, globs), sorted and de-duplicated.

    The package's tile FITS files (``TILEID``/``BANDS`` in the primary header) are one source each; a
    Parquet file of tiles gives ``url#row=i`` per row. Other FITS files are survey images as delivered
    (HSC data-access cutouts and coadd patches, Rubin-style files) and their PSF files: they are
    grouped into patches by the naming rule of :func:`group_survey_files`, across all of ``urls``
    (a folder of images and one of PSFs pair up), or by a manifest CSV given as an input (columns
    ``patch, band, image, psf``, paths relative to it); each patch is one source
    (:func:`patch_source`), read by :func:`galgan_ray.survey.read_survey_patch`. A URL that cannot be
    read -- a file which does not exist, an unknown protocol, a truncated Parquet file -- is kept as
    it is (it becomes a failure row when read); a directory or glob that matches nothing is an error.

    Returns
    -------
    list of str
    """
    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    survey_images: list[tuple[str, str | None]] = []
    psfs: list[str] = []
    for url in urls:
        try:
            fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except Exception:  # noqa: BLE001 - unknown protocol or options: kept, fails when read
            out.append(url)
            continue
        prefix = _protocol_prefix(fs)
        full = lambda p: p if (not prefix or p.startswith(prefix)) else prefix + p  # noqa: E731
        if any(ch in path for ch in "*?["):
            try:
                found = sorted(fs.glob(path))
            except FileNotFoundError:
                found = []
            if not found:
                raise InputError(url, "matches no files")
        else:
            try:
                is_dir = fs.isdir(path)
            except Exception:  # noqa: BLE001 - an unreachable store: kept, fails when read
                is_dir = False
            if is_dir:
                found = sorted(p for p in fs.find(path) if p.lower().endswith(_FITS_EXT + (".parquet",))
                               and not posixpath.basename(p).startswith((".", "_")))
                if not found:
                    raise InputError(url, "holds no tile files (*.fits, *.parquet)")
            else:
                found = [path]
        for p in found:
            name = url if p == path else full(p)
            if p.lower().endswith(".csv"):
                out += _read_manifest(fs, p, full)
                continue
            n = _parquet_rows(fs, p) if p.lower().endswith(".parquet") else None
            if n is not None:
                out += [f"{full(p)}#row={i}" for i in range(n)]
                continue
            hdr = _peek_primary(fs, p) if p.lower().endswith(_FITS_EXT) else None
            if hdr is not None and any(k in hdr for k in _TILE_KEYS):
                out.append(name)  # one of the package's tiles
            elif _PSF_IN_NAME.search(_stem(p)):
                psfs.append(name)  # (unreadable: its patch fails when read)
            elif hdr is None:
                out.append(name)  # unreadable: a failure row when read
            else:
                band = next((str(hdr[k]).strip() for k in ("FILTER", "BAND") if str(hdr.get(k, "")).strip()), None)
                survey_images.append((name, band))
    if survey_images:
        out += group_survey_files(survey_images, psfs)
    return sorted(dict.fromkeys(out))


def _url_error(source: str, exc: BaseException) -> InputError:
    """The InputError for a URL that cannot be opened: missing, unknown protocol, network, permissions."""
    if isinstance(exc, FileNotFoundError):
        # A local ENOENT names the path again; an object store says what is missing (key or bucket).
        detail = "" if getattr(exc, "filename", None) else f": {exc}"
        return InputError(source, f"no such file (unreadable URL){detail}")
    protocol = source.split("://", 1)[0] if "://" in source else None
    if protocol and protocol not in fsspec.available_protocols():
        return InputError(source, f"unreadable URL: unknown protocol {protocol!r} (not an fsspec filesystem)")
    return InputError(source, f"unreadable URL: {type(exc).__name__}: {exc}")


def read_url_bytes(url: str, *, storage_options: Mapping | None = None) -> bytes:
    """The whole file at a local path or fsspec URL.

    Raises
    ------
    InputError
        Naming ``url``: no such file (or bucket), an unknown protocol, or any error opening it.
    """
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as fh:
            return fh.read()
    except Exception as exc:  # noqa: BLE001 - network, permissions, bad protocol
        raise _url_error(url, exc) from None


def _read_parquet_row(source: str, storage_options: Mapping | None) -> Tile:
    url, row = source.rsplit("#row=", 1) if "#row=" in source else (source, None)
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        fh = fs.open(path, "rb")
    except Exception as exc:  # noqa: BLE001
        raise _url_error(source, exc) from None
    with fh:
        try:
            pf = pq.ParquetFile(fh)
            n = pf.metadata.num_rows
        except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError, ...
            raise InputError(source, f"not a readable Parquet file (truncated or corrupt?): "
                                     f"{type(exc).__name__}: {exc}") from None
        if row is None:
            raise InputError(source, f"a Parquet file of {n} tile row(s); name one row as URL#row=i "
                                     f"(list_tile_sources does)")
        try:
            i = int(row)
        except ValueError:
            raise InputError(source, f"row {row!r} is not an integer") from None
        if not 0 <= i < n:
            raise InputError(source, f"row {i} does not exist: the file has {n} row(s)")
        try:  # only the row group that holds row i
            first = 0
            for k in range(pf.metadata.num_row_groups):
                n_k = pf.metadata.row_group(k).num_rows
                if i < first + n_k:
                    break
                first += n_k
            data = pf.read_row_group(k, columns=["tile"]).column("tile")[i - first].as_py()
        except Exception as exc:  # noqa: BLE001
            raise InputError(source, f"not a readable Parquet file of tiles (truncated or corrupt?): "
                                     f"{type(exc).__name__}: {exc}") from None
    try:
        tile, _, _ = unpack_tile(data)
    except Exception as exc:  # noqa: BLE001 - not pack_tile bytes
        raise InputError(source, f"the tile column does not hold a packed tile: "
                                 f"{type(exc).__name__}: {exc}") from None
    tile.source = source
    return _validate_tile(tile)


def read_tile_source(source: str, *, storage_options: Mapping | None = None) -> Tile:
    """Read and validate one tile source (a FITS URL or ``parquet-url#row=i``).

    Raises
    ------
    InputError
        Naming ``source``: an unreadable URL (no such file or bucket, unknown protocol), a truncated
        or corrupt Parquet file, or any problem :func:`read_tile` finds (Parquet rows are checked
        the same way).
    """
    if "#row=" in source or source.lower().endswith(".parquet"):
        return _read_parquet_row(source, storage_options)
    return read_tile(read_url_bytes(source, storage_options=storage_options), source=source)
