"""Real-sky benchmark: which HST-detected sources does each method recover from a real HSC coadd?

Every scene is a real HSC-SSP PDR2 i-band coadd cutout (0.168"/px) with the HST/ACS F814W image of
the same sky (COSMOS, 0.03"/px). The HST image is the truth: what it detects is there. Each row is
an image made from the HSC cutout alone, searched by the same detector, and scored against the HST
sources on the sky they both cover.

    .venv/bin/python bench/real_sky.py                                   # 35 COSMOS quasar fields
    .venv/bin/python bench/real_sky.py --model PATH --out docs/real_sky  # a retrained model
    .venv/bin/python bench/real_sky.py --data ../shared/data/hsc_hst_pairs --out /tmp/pairs
    .venv/bin/python bench/real_sky.py --limit 2 --out /tmp/rs           # a smoke run

What is measured, step by step (constants at the top of this file):

1. Inputs. ``hsc_hst_qso_fields``: the HSC cutout is read with
   :func:`galgan_ray.survey.read_survey_image` (image/mask/variance HDUs; flux in nJy from
   ``FLUXMAG0``), its PSF with :func:`galgan_ray.survey.read_psf`. Unusable HSC pixels are the
   reader's: non-finite, non-positive variance, or in a mask plane of
   :data:`galgan_ray.survey.BAD_MASK_PLANES` (NO_DATA, BAD, SAT, SUSPECT, UNMASKEDNAN, EDGE; not CR
   or INTRP, which in these deep coadds are the OR over the input visits and cover 15-25% of every
   cutout, whose coadded values are fine).
   The HST image's AB zero point comes from its ``PHOTFLAM``/``PHOTPLAM`` keywords
   (``-2.5 log10 PHOTFLAM - 5 log10 PHOTPLAM - 2.408``: 25.936 for F814W, the image being in e-/s),
   falling back to the COSMOS F814W value 25.94 where a header has neither. The quasar each scene is centred on is the ``cosmos_t1qso.fits`` entry nearest the
   HST file's centre coordinates (within 2"), else the HST image centre.
   ``hsc_hst_pairs`` (5 scenes, no zero points, no quasar): plane 2 (i) of the HSC cube and of its
   PSF cube; magnitudes are unknown there (one magnitude bin, ``unknown``) and nothing is excluded
   around the centre.
2. One detector for every image (:func:`detect_sources`), all settings in arcsec:
   a. Background: ``sep.Background`` with a ``BACK_MESH_ARCSEC`` = 2" mesh and a 3x3 median filter,
      subtracted. (A 4" mesh leaves each quasar's PSF halo in: in the deep HSC coadd the halo is
      above 5 sigma over most of the cutout and joins every neighbour to the quasar.)
   b. Matched filter with *that image's* PSF at *that image's* pixel scale (trimmed to the square
      holding 99.9% of sum(psf^2)): ``S = (image (*) psf) / sqrt(sum psf^2) / rms``, where ``rms`` is
      the sky RMS of that filtered map itself (3-sigma-clipped MAD; sources above 3 rms dilated by the
      kernel's half width, and pixels within that half width of the edge, left out). So "5 sigma" is
      a 5-sigma excursion of the filtered sky in every image, whatever its noise correlation
      (drizzled HST, warped coadd, bicubic, Richardson-Lucy and GAN outputs all correlate their
      noise, so a per-pixel RMS would misjudge it: on HST the filtered RMS is ~1.9x the white-noise
      value).
   c. ``sep.extract`` on ``S`` (absolute threshold ``NSIGMA`` = 5, no further filter), ``minarea`` =
      ``MINAREA_ARCSEC2`` in the image's pixels (rounded, at least 1: 6 HST px, 1 HSC px, 1-2 px on
      the fine grids), SExtractor's deblending (``DEBLEND_NTHRESH`` 32, ``DEBLEND_CONT`` 0.005), sep's
      cleaning off, and the disc of ``QSO_MASK_ARCSEC`` = 1" around the quasar masked. (Why sep on
      ``S`` rather than sep's own matched filter: its deblending kept galaxies on a quasar's wing in
      the quasar's segment even at ``deblend_cont = 0``. Why cleaning off: it merged 13 of 14
      detections of one HSC cutout, each an HST source, into the quasar. Why the mask: sep's
      deblending contrast is a fraction of the whole blend's flux, i.e. of the quasar's.)
   d. Position: the peak pixel of ``S`` in each object, refined by a three-point Gaussian fit along
      each axis (0-based), turned into RA/Dec with the image's WCS.
3. Truth: the detector on the HST image with the HST PSF (``hst_psf/``). Magnitudes: sep Kron
   (AUTO) fluxes (2.5 Kron radii, at least a ``KRON_MIN_RADIUS_ARCSEC`` circle) and the zero point.
4. Scored region, on the HST pixel grid: HST pixels that are finite and non-zero AND fall on a
   usable HSC pixel (the HST image covers ~74-77% of the HSC cutout: only the overlap is scored),
   shrunk by ``EDGE_MARGIN_ARCSEC`` from its border (a source cut by the HST edge, or a detection of
   a galaxy just outside the HST image, would otherwise be scored), minus the disc of
   ``QSO_EXCLUDE_ARCSEC`` around the quasar. Its area is reported per scene.
5. Rows, from the HSC i image alone:
   ``hsc`` the image itself (its PSF);
   ``bicubic`` :func:`galgan_ray.baselines.upsample_bicubic` x3 on the HSC grid (0.056"/px, flux
   conserving), PSF :func:`galgan_ray.baselines.upsample_psf` of the HSC PSF (the PSF that image
   really has; the model's HR PSF would be a filter for a sharper image than bicubic makes);
   ``richardson_lucy`` :func:`galgan_ray.baselines.richardson_lucy` (30 iterations, its defaults)
   on the whole cutout with the HSC PSF, detected with its effective PSF
   (:func:`galgan_ray.baselines.richardson_lucy_psf`);
   ``enhanced`` :func:`galgan_ray.enhance.enhance_image` with ``--model`` (resampled to the model's
   0.18"/px LR grid, PSF-matched, enhanced to 0.06"/px), PSF ``Enhancer.psf_high(0)``: ``galgan
   enhance``'s image as shipped, the model's output where the LR data detect a source
   (:mod:`galgan_ray.support_map`), bicubic-upsampled data elsewhere;
   ``enhanced_ungated`` the same with ``support=None`` (``--no-support-gate``): the model's output
   everywhere;
6. Matching: each row's detections and the HST truth, both as positions on the HST pixel grid
   (via RA/Dec), matched one to one within ``MATCH_RADIUS_ARCSEC`` = 0.4" by the Hungarian algorithm
   (:func:`galgan_ray.matching.match_peaks`: most pairs first, then least summed distance). All HST
   sources take part, so a detection inside the region paired with an HST source just outside it is
   not spurious; only truth inside the region counts towards recall.
7. Per row and scene, and summed over scenes: recall = matched truth / truth in the region (with a
   binomial standard error), recall of *isolated* HST sources (no other HST source within
   ``ISOLATION_ARCSEC`` = 1": HST resolves close pairs and the knots of large galaxies, which no
   image at HSC resolution separates, and these are a third of the truth), recall per HST magnitude
   bin (``MAG_EDGES``), spurious detections (detected inside the region, matched to no HST source)
   per scene and per arcmin^2 of region, and the median offset (arcsec) of the matched pairs.
   A "spurious" detection may be a real source that HST misses (low surface brightness, which the
   HSC coadd reaches deeper); the ``hsc`` row's rate bounds how often that happens.

Outputs in ``--out``: ``report.json`` (settings, provenance, per-scene and summed results, every
truth source and detection with its sky position and match), ``table.md``, ``real_sky_examples.png``
(HSC | enhanced | HST for four scenes, from the most crowded to the sparsest). Rerunning the
script with another ``--model`` regenerates all three.

Bad input: a scene whose files are missing or unreadable is reported on one line naming the file
and listed under ``failures``; the other scenes go on. A missing data folder or model: a message and
exit code 2.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sep
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage

from galgan_ray.commands.deblend import deblend_file, default_field_config
from galgan_ray.field import enhancer_noise_scale
from galgan_ray.baselines import richardson_lucy, upsample_bicubic, upsample_psf
from galgan_ray.cutouts import COSMOS_F814W_ZEROPOINT, _zeropoint_from_header
from galgan_ray.detect import detect_plain
from galgan_ray.enhance import Enhancer, enhance_image, estimate_noise_sigma, gate_enhanced
from galgan_ray.errors import InputError
from galgan_ray.geometry import pixel_scale_of
from galgan_ray.matching import match_peaks, radius_pixels
from galgan_ray.provenance import provenance
from galgan_ray.survey import BAD_MASK_PLANES, check_psf, read_psf, read_survey_image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hsc_hst_qso_fields"

# ---- the detector (one for every image; module docstring, step 2)
NSIGMA = 5.0
#: Smallest detection area, the same patch of sky at every pixel scale: 6 HST px, 1 HSC px, 1-2 HR px.
MINAREA_ARCSEC2 = 0.005
BACK_MESH_ARCSEC = 2.0
BACK_FILTER = 3
DEBLEND_NTHRESH = 32
DEBLEND_CONT = 0.005
CLEAN = False
PSF_ENERGY = 0.999
# ---- scoring
MATCH_RADIUS_ARCSEC = 0.4
QSO_EXCLUDE_ARCSEC = 1.5
#: The quasar's core is masked in the detection of every image (inside the unscored disc): otherwise
#: its isophote joins every galaxy on its wing, and sep's deblending contrast (a fraction of the whole
#: blend's flux, i.e. the quasar's) keeps them in its segment.
QSO_MASK_ARCSEC = 1.0
EDGE_MARGIN_ARCSEC = 0.5
QSO_MATCH_ARCSEC = 2.0
KRON_MIN_RADIUS_ARCSEC = 0.15
MAG_EDGES = (22.0, 23.0, 24.0, 25.0, 26.0)
ISOLATION_ARCSEC = 1.0
ROWS = ("hsc", "bicubic", "richardson_lucy", "enhanced", "enhanced_ungated", "deblend")
#: HSC mask planes whose pixels are unusable here (see :func:`read_scene` for why not CR/INTRP).
HSC_BAD_MASK_PLANES = BAD_MASK_PLANES  # the survey reader's
HSC_I_PLANE = 2  # hsc_hst_pairs cubes: g, r, i, z, y
N_EXAMPLES = 4


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneFiles:
    """Where one scene's files are (a missing one: the path or pattern looked for; reading the scene
    then fails naming it)."""

    name: str
    dataset: str  # "hsc_hst_qso_fields" | "hsc_hst_pairs"
    hsc: str
    hsc_psf: str
    hst: str
    hst_psf: str
    qso_catalog: str | None = None
    center_radec: tuple[float, float] | None = None  # from the HST file name


@dataclass(frozen=True, eq=False)
class Scene:
    """One scene in memory: the HSC i image (any flux unit per pixel) and the HST truth image."""

    files: SceneFiles
    hsc_image: np.ndarray
    hsc_wcs: WCS
    hsc_valid: np.ndarray
    hsc_psf: np.ndarray
    hsc_psf_scale_arcsec: float
    hsc_unit: str
    hst_image: np.ndarray
    hst_wcs: WCS
    hst_psf: np.ndarray
    hst_zeropoint: float | None
    hst_zeropoint_source: str
    qso_radec: tuple[float, float] | None
    qso_source: str

    @property
    def name(self) -> str:
        return self.files.name


def _scene_key(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)


def find_scenes(data_dir: str | Path) -> list[SceneFiles]:
    """The scenes of a data folder, in a stable order; the layout is recognised from its contents.

    ``hsc_hst_qso_fields``: ``hsc/ID-cutout-HSC-I-*.fits``, ``hsc_psf/ID-psf-*-HSC-I-*.fits``,
    ``hst/ID_RA_DEC_*.fits.gz``, ``hst_psf/ID-psf-HST-*.fits``, ``cosmos_t1qso.fits``.
    ``hsc_hst_pairs``: ``hsc_KEY.fits``, ``psf_hsc_KEY.fits``, ``hst_KEY.fits``, ``psf_hst_KEY.fits``.

    Raises
    ------
    InputError
        The folder holds neither layout.
    """
    d = Path(data_dir)
    if (d / "hsc").is_dir():
        qso = d / "cosmos_t1qso.fits"
        out = []
        for f in (d / "hsc").glob("*-cutout-HSC-I-*.fits"):
            sid = f.name.split("-cutout-")[0]
            psf = sorted((d / "hsc_psf").glob(f"{sid}-psf-*-HSC-I-*.fits"))
            hst = sorted((d / "hst").glob(f"{sid}_*_sci.fits*"))
            hpsf = d / "hst_psf" / f"{sid}-psf-HST-COSMOS.fits"
            if not hpsf.is_file():
                hp = sorted((d / "hst_psf").glob(f"{sid}-psf-*.fits"))
                hpsf = hp[0] if hp else None
            center = None
            if hst:
                m = re.match(rf"{re.escape(sid)}_([-+0-9.]+)_([-+0-9.]+)_", hst[0].name)
                if m:
                    center = (float(m.group(1)), float(m.group(2)))
            # A missing file is kept as the pattern looked for, so the scene's error names it.
            out.append(SceneFiles(name=sid, dataset="hsc_hst_qso_fields", hsc=str(f),
                                  hsc_psf=str(psf[0]) if psf else str(d / "hsc_psf" / f"{sid}-psf-*-HSC-I-*.fits"),
                                  hst=str(hst[0]) if hst else str(d / "hst" / f"{sid}_*_sci.fits*"),
                                  hst_psf=str(hpsf) if hpsf else str(d / "hst_psf" / f"{sid}-psf-HST-COSMOS.fits"),
                                  qso_catalog=str(qso) if qso.is_file() else None, center_radec=center))
        return sorted(out, key=lambda s: _scene_key(s.name))
    pairs = sorted(d.glob("hsc_*.fits"))
    if pairs:
        out = []
        for f in pairs:
            key = f.name[len("hsc_"):]
            out.append(SceneFiles(name=key[:-len(".fits")], dataset="hsc_hst_pairs", hsc=str(f),
                                  hsc_psf=str(d / f"psf_hsc_{key}"), hst=str(d / f"hst_{key}"),
                                  hst_psf=str(d / f"psf_hst_{key}")))
        return out
    raise InputError(str(d), "holds no scenes: expected hsc/*-cutout-HSC-I-*.fits (hsc_hst_qso_fields) or "
                             "hsc_*.fits (hsc_hst_pairs)")


_READ_ERRORS = (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, zlib.error)


def _read_image(path: str, *, plane: int | None = None) -> tuple[np.ndarray, fits.Header]:
    """The first image HDU with data (``plane`` of a cube) as float64, and its header."""
    try:
        with fits.open(path) as hdul:
            for h in hdul:
                if getattr(h, "is_image", False) and h.data is not None and np.ndim(h.data) >= 2:
                    data = np.asarray(h.data, dtype=np.float64)
                    header = h.header.copy()
                    break
            else:
                raise InputError(path, "holds no image HDU")
    except InputError:
        raise
    except _READ_ERRORS as exc:
        raise InputError(path, f"cannot be read as FITS ({type(exc).__name__}: {exc})") from None
    if plane is not None:
        if data.ndim != 3 or not 0 <= plane < data.shape[0]:
            raise InputError(path, f"expected a cube with plane {plane}, got shape {data.shape}")
        data = data[plane]
    if data.ndim != 2:
        raise InputError(path, f"expected a 2-D image, got shape {data.shape}")
    return data, header


def _celestial(header: fits.Header, path: str) -> WCS:
    try:
        w = WCS(header).celestial
    except _READ_ERRORS as exc:
        raise InputError(path, f"has an unreadable WCS ({exc})") from None
    if not w.has_celestial:
        raise InputError(path, "has no celestial WCS")
    return w


def _need(path: str, what: str) -> str:
    if not Path(path).is_file():
        raise InputError(path, f"{what} file not found")
    return path


def _quasar(files: SceneFiles, hst_wcs: WCS, shape) -> tuple[tuple[float, float] | None, str]:
    ny, nx = shape
    ra0, dec0 = (float(v) for v in hst_wcs.pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0))
    if files.dataset != "hsc_hst_qso_fields":
        return None, "none (not a quasar field)"
    if files.center_radec is not None:
        ra0, dec0 = files.center_radec
    if files.qso_catalog:
        try:
            with fits.open(files.qso_catalog) as t:
                tab = t[1].data
                ra, dec = np.asarray(tab["RA"], float), np.asarray(tab["DEC"], float)
        except _READ_ERRORS as exc:
            raise InputError(files.qso_catalog, f"cannot be read as the quasar catalog ({exc})") from None
        sep_arcsec = 3600.0 * np.hypot((ra - ra0) * math.cos(math.radians(dec0)), dec - dec0)
        i = int(np.argmin(sep_arcsec))
        if sep_arcsec[i] <= QSO_MATCH_ARCSEC:
            return (float(ra[i]), float(dec[i])), f"cosmos_t1qso.fits row {i} ({sep_arcsec[i]:.2f}\" from the centre)"
    return (ra0, dec0), "scene centre (no catalog entry within 2\")"


def read_scene(files: SceneFiles) -> Scene:
    """Read one scene (module docstring, step 1).

    Raises
    ------
    InputError
        Naming the file that is missing, unreadable or unusable.
    """
    _need(files.hsc, "HSC image")
    hsc_psf_path = _need(files.hsc_psf, "HSC PSF")
    hst_path = _need(files.hst, "HST image")
    hst_psf_path = _need(files.hst_psf, "HST PSF")
    if files.dataset == "hsc_hst_qso_fields":
        # The reader gives the flux unit, WCS, mask planes, PSF and the unusable pixels (survey.BAD_MASK_PLANES)
        si = read_survey_image(files.hsc, psf=hsc_psf_path)
        hsc_valid = ~si.bad
        hsc_image = si.image
        hsc_wcs, hsc_psf = si.wcs, si.psf
        hsc_unit = f"nJy ({si.unit_source})"
    else:
        hsc_image, hdr = _read_image(files.hsc, plane=HSC_I_PLANE)
        hsc_wcs = _celestial(hdr, files.hsc)
        hsc_valid = np.isfinite(hsc_image)
        hsc_image = np.where(hsc_valid, hsc_image, 0.0)
        psf_cube, _ = _read_image(hsc_psf_path, plane=HSC_I_PLANE)
        hsc_psf = check_psf(psf_cube, source=hsc_psf_path)
        hsc_unit = "unknown (no zero point recorded)"
    if not hsc_valid.any():
        raise InputError(files.hsc, "has no usable pixels")
    hst_image, hst_hdr = _read_image(hst_path)
    hst_wcs = _celestial(hst_hdr, hst_path)
    if not np.isfinite(hst_image).any() or not np.any(np.nan_to_num(hst_image)):
        raise InputError(hst_path, "has no usable pixels (all zero or non-finite)")
    hst_psf = read_psf(hst_psf_path)
    zp = _zeropoint_from_header(hst_hdr)
    if files.dataset == "hsc_hst_pairs":
        zp, zp_source = None, "none (hsc_hst_pairs records no zero point)"
    elif zp is None:
        zp, zp_source = COSMOS_F814W_ZEROPOINT, "COSMOS F814W 25.94 (assumed: no PHOTFLAM/PHOTPLAM in the header)"
    else:
        zp, zp_source = float(zp[0]), zp[1]
    qso, qso_source = _quasar(files, hst_wcs, hst_image.shape)
    return Scene(files=files, hsc_image=hsc_image, hsc_wcs=hsc_wcs, hsc_valid=hsc_valid, hsc_psf=hsc_psf,
                 hsc_psf_scale_arcsec=float(pixel_scale_of(hsc_wcs)), hsc_unit=hsc_unit, hst_image=hst_image,
                 hst_wcs=hst_wcs, hst_psf=hst_psf, hst_zeropoint=zp, hst_zeropoint_source=zp_source,
                 qso_radec=qso, qso_source=qso_source)


# ----------------------------------------------------------------------------------------------
# The detector
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Detections:
    """sep detections of one image (0-based pixel positions) and how the image was judged."""

    x: np.ndarray
    y: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    objects: np.ndarray  # sep's structured array
    image: np.ndarray  # background-subtracted image (for photometry and display)
    sigma_filtered: float  # sky RMS of the matched-filter map (the "1 sigma" of the threshold)
    sigma_pixel: float  # sep.Background global RMS per pixel (for information)
    minarea_px: int
    pixel_scale_arcsec: float
    kernel_shape: tuple[int, int]

    @property
    def meta(self) -> dict[str, Any]:
        return {"n": len(self.x), "sigma_filtered": self.sigma_filtered, "sigma_pixel": self.sigma_pixel,
                "minarea_px": self.minarea_px, "pixel_scale_arcsec": self.pixel_scale_arcsec,
                "kernel_shape": list(self.kernel_shape)}


def detect_sources(image: np.ndarray, wcs: WCS, *, psf: np.ndarray, valid: np.ndarray | None = None,
                   exclude_radec: tuple[float, float] | None = None, exclude_radius_arcsec: float = 0.0,
                   source: str = "image") -> Detections:
    """The benchmark's one detector (module docstring, step 2) on one image.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image, any flux unit per pixel.
    wcs : astropy.wcs.WCS
        Its celestial WCS (positions are converted with ``pixel_to_world_values``, 0-based).
    psf : numpy.ndarray
        Its PSF at its pixel scale (odd sides, centred).
    valid : numpy.ndarray of bool, optional
        Usable pixels (default: the finite ones).
    exclude_radec, exclude_radius_arcsec : optional
        A disc (the quasar) left out of the detection (not of the background or the noise).
    source : str
        Named in errors.

    Returns
    -------
    Detections
    """
    img = np.asarray(image, dtype=np.float64)
    ok = np.isfinite(img) if valid is None else (np.asarray(valid, bool) & np.isfinite(img))
    if not ok.any():
        raise InputError(source, "no usable pixels to detect on")
    bad = ~ok
    scale = float(pixel_scale_of(wcs))
    det_mask = np.zeros(img.shape, bool)
    if exclude_radec is not None and exclude_radius_arcsec > 0:
        qx, qy = wcs.world_to_pixel_values(*exclude_radec)
        yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
        det_mask = np.hypot(xx - qx, yy - qy) * scale <= exclude_radius_arcsec
    # sep thresholds and deblends the significance map itself (no further filter, absolute threshold).
    # Why not sep's own matched filter (an err array and filter_kernel): its deblending kept faint
    # galaxies on a quasar's wing in the quasar's segment even at deblend_cont = 0, where the same
    # sep on this map splits every local maximum.
    r = detect_plain(img, bad, psf, pixel_scale_arcsec=scale, nsigma=NSIGMA, back_arcsec=BACK_MESH_ARCSEC,
                     back_filter=BACK_FILTER, minarea_arcsec2=MINAREA_ARCSEC2, deblend_nthresh=DEBLEND_NTHRESH,
                     deblend_cont=DEBLEND_CONT, clean=CLEAN, exclude=det_mask, psf_energy=PSF_ENERGY)
    if not r["rms"] > 0:
        raise InputError(source, "the sky RMS of the filtered image is 0 (a noiseless image?)")
    x, y, objs, minarea, kernel = r["x"], r["y"], r["objects"], r["minarea_px"], r["kernel"]
    if len(x):
        ra, dec = (np.asarray(v, float) for v in wcs.pixel_to_world_values(x, y))
    else:
        ra, dec = np.zeros(0), np.zeros(0)
    return Detections(x=x, y=y, ra=ra, dec=dec, objects=objs, image=r["image_sub"], sigma_filtered=r["rms"],
                      sigma_pixel=r["back_rms"], minarea_px=minarea, pixel_scale_arcsec=scale,
                      kernel_shape=tuple(int(v) for v in kernel.shape))


def kron_magnitudes(det: Detections, *, zeropoint: float | None) -> np.ndarray:
    """AB magnitudes from sep Kron (AUTO) fluxes: 2.5 Kron radii, at least a circle of
    ``KRON_MIN_RADIUS_ARCSEC``; NaN without a zero point, 99 for a non-positive flux."""
    n = len(det.x)
    if n == 0 or zeropoint is None:
        return np.full(n, np.nan)
    o = det.objects
    data = det.image
    a = np.maximum(np.asarray(o["a"], float), 0.5)
    b = np.maximum(np.asarray(o["b"], float), 0.5)
    theta = np.clip(np.nan_to_num(np.asarray(o["theta"], float)), -np.pi / 2, np.pi / 2)
    kr, _ = sep.kron_radius(data, det.x, det.y, a, b, theta, 6.0)
    kr = np.nan_to_num(kr, nan=0.0)
    flux, _, _ = sep.sum_ellipse(data, det.x, det.y, a, b, theta, np.maximum(2.5 * kr, 1e-3), subpix=1)
    r_min = KRON_MIN_RADIUS_ARCSEC / det.pixel_scale_arcsec
    circ = kr * np.sqrt(a * b) < r_min
    if circ.any():
        cflux, _, _ = sep.sum_circle(data, det.x[circ], det.y[circ], r_min, subpix=1)
        flux = np.where(circ, 0.0, flux)
        flux[circ] = cflux
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(flux > 0, zeropoint - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), 99.0)
    return mag


def mag_bin_labels() -> list[str]:
    e = MAG_EDGES
    return [f"<{e[0]:g}"] + [f"{lo:g}-{hi:g}" for lo, hi in itertools.pairwise(e)] + [f">{e[-1]:g}"]


def _mag_bin(mag: np.ndarray) -> list[str]:
    labels = mag_bin_labels()
    return ["unknown" if not np.isfinite(m) else labels[int(np.searchsorted(MAG_EDGES, m, side="right"))]
            for m in mag]


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def _upsampled_wcs(wcs: WCS, factor: int) -> WCS:
    """The WCS of :func:`upsample_bicubic` (crop 0): HR pixel q sits at LR pixel ``(q + 0.5) / f - 0.5``,
    i.e. FITS (1-based) CRPIX' = f CRPIX - (f - 1) / 2 ... with f = 3: 3 CRPIX - 1."""
    w = wcs.deepcopy()
    f = float(factor)
    w.wcs.crpix = f * (w.wcs.crpix - 1.0) + (f - 1.0) / 2.0 + 1.0
    if w.wcs.has_cd():
        w.wcs.cd = w.wcs.cd / f
    else:
        w.wcs.cdelt = w.wcs.cdelt / f
    if w.pixel_shape is not None:
        w.pixel_shape = tuple(int(s * factor) for s in w.pixel_shape)
    w.wcs.set()
    return w


def _upsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(np.asarray(mask, bool), factor, axis=0), factor, axis=1)


def _sample_mask(mask: np.ndarray, wcs_mask: WCS, wcs_target: WCS, shape_target) -> np.ndarray:
    """``mask`` (on ``wcs_mask``) at the pixel centres of a target grid, nearest pixel; False outside."""
    ny, nx = shape_target
    yy, xx = np.mgrid[:ny, :nx]
    ra, dec = wcs_target.pixel_to_world_values(xx.ravel(), yy.ravel())
    px, py = wcs_mask.world_to_pixel_values(ra, dec)
    ix, iy = np.round(px).astype(np.int64), np.round(py).astype(np.int64)
    inside = (ix >= 0) & (iy >= 0) & (ix < mask.shape[1]) & (iy < mask.shape[0])
    out = np.zeros(ix.shape, bool)
    out[inside] = np.asarray(mask, bool)[iy[inside], ix[inside]]
    return out.reshape(ny, nx)


def row_images(scene: Scene, enhancer: Enhancer) -> dict[str, dict[str, Any]]:
    """The images each row detects on (module docstring, step 5): ``{row: {image, wcs, psf, valid, info}}``."""
    img, wcs, psf, valid = scene.hsc_image, scene.hsc_wcs, scene.hsc_psf, scene.hsc_valid
    rows: dict[str, dict[str, Any]] = {"hsc": {"image": img, "wcs": wcs, "psf": psf, "valid": valid, "info": {}}}
    f = 3
    rows["bicubic"] = {"image": upsample_bicubic(img, factor=f, crop=0), "wcs": _upsampled_wcs(wcs, f),
                       "psf": upsample_psf(psf, factor=f), "valid": _upsample_mask(valid, f), "info": {"factor": f}}
    sigma = estimate_noise_sigma(img, mask=~valid)
    if not sigma > 0:
        raise InputError(scene.files.hsc, "noise sigma of the HSC image is 0")
    rl = richardson_lucy(img, psf=psf, noise_sigma=sigma, background="sep")
    rows["richardson_lucy"] = {"image": rl["image"], "wcs": wcs, "psf": rl["psf"], "valid": valid,
                               "info": {"noise_sigma_in": float(sigma), "fwhm_px": float(rl["fwhm_px"])}}
    # one enhancement: the model's output everywhere, then galgan enhance's support gate on it
    raw, wcs_hr, info = enhance_image(img, wcs, enhancer=enhancer, psf=psf,
                                      psf_pixel_scale_arcsec=scene.hsc_psf_scale_arcsec, source=scene.files.hsc,
                                      support=None)
    hr, support = gate_enhanced(raw, info["image_lr"][0], enhancer=enhancer, valid=info["footprint_lr"] > 0,
                                sigma_lr=info["sigma_lr"])
    support.pop("weight_lr")
    foot = _upsample_mask(np.asarray(info["footprint_lr"]) > 0, enhancer.factor)[:hr.shape[0], :hr.shape[1]]
    valid_hr = foot & _sample_mask(valid, wcs, wcs_hr, hr.shape)
    common = {"checkpoint": info["checkpoint"], "sha256": info["sha256"], "sigma_lr": info["sigma_lr"],
              "psf": info["psf"], "warnings": info["warnings"]}
    rows["enhanced"] = {"image": hr, "wcs": wcs_hr, "psf": enhancer.psf_high(0), "valid": valid_hr,
                        "info": {**common, "support": support}}
    rows["enhanced_ungated"] = {**rows["enhanced"], "image": raw, "info": {**common, "support": None}}
    return rows


# ----------------------------------------------------------------------------------------------
# Scoring one scene
# ----------------------------------------------------------------------------------------------
def scored_region(scene: Scene) -> np.ndarray:
    """Module docstring, step 4: bool mask on the HST pixel grid."""
    hst = scene.hst_image
    s = pixel_scale_of(scene.hst_wcs)
    ok = np.isfinite(hst) & (hst != 0)
    ok &= _sample_mask(scene.hsc_valid, scene.hsc_wcs, scene.hst_wcs, hst.shape)
    dist = ndimage.distance_transform_edt(np.pad(ok, 1))[1:-1, 1:-1] * s
    region = ok & (dist > EDGE_MARGIN_ARCSEC)
    if scene.qso_radec is not None:
        qx, qy = scene.hst_wcs.world_to_pixel_values(*scene.qso_radec)
        yy, xx = np.mgrid[:hst.shape[0], :hst.shape[1]]
        region &= np.hypot(xx - qx, yy - qy) * s > QSO_EXCLUDE_ARCSEC
    return region


def _in_region(region: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    ix, iy = np.round(x).astype(np.int64), np.round(y).astype(np.int64)
    inside = (ix >= 0) & (iy >= 0) & (ix < region.shape[1]) & (iy < region.shape[0])
    out = np.zeros(len(x), bool)
    out[inside] = region[iy[inside], ix[inside]]
    return out


def detect_truth(scene: Scene) -> Detections:
    """The truth: the one detector on the HST image with the HST PSF, the quasar's disc left out (step 3)."""
    return detect_sources(scene.hst_image, scene.hst_wcs, psf=scene.hst_psf, source=scene.files.hst,
                          exclude_radec=scene.qso_radec, exclude_radius_arcsec=QSO_MASK_ARCSEC)


def outside_quasar(scene: Scene, ra, dec) -> np.ndarray:
    """bool per position: farther than ``QSO_MASK_ARCSEC`` from the quasar (all True without one), the
    disc the detector rows leave out and the deblend row's catalog is cut to."""
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    if scene.qso_radec is None or not len(ra):
        return np.ones(len(ra), bool)
    q_ra, q_dec = scene.qso_radec
    return np.hypot((ra - q_ra) * np.cos(np.radians(q_dec)), dec - q_dec) * 3600 > QSO_MASK_ARCSEC


def match_detections(scene: Scene, truth_xy: np.ndarray, region: np.ndarray, det_ra, det_dec):
    """One row's detections matched to the truth (module docstring, step 6): ``(match, scored)``, the
    :func:`galgan_ray.matching.match_peaks` result and whether each detection lies in the scored region."""
    if len(det_ra):
        dx, dy = scene.hst_wcs.world_to_pixel_values(det_ra, det_dec)
        d_xy = np.column_stack([np.asarray(dx, float), np.asarray(dy, float)])
    else:
        d_xy = np.zeros((0, 2))
    radius = radius_pixels(MATCH_RADIUS_ARCSEC, pixel_scale_arcsec=pixel_scale_of(scene.hst_wcs))
    m = match_peaks(truth_xy, d_xy, radius_px=radius)
    return m, _in_region(region, d_xy[:, 0], d_xy[:, 1])


def score_scene(scene: Scene, enhancer: Enhancer, *, keep_images: bool = False, deblend=None) -> dict[str, Any]:
    """Detect, match and count one scene (module docstring, steps 3-7).

    Returns
    -------
    dict
        ``scene``, ``dataset``, ``area_arcmin2`` (scored region), ``zeropoint``, ``zeropoint_source``,
        ``quasar`` (ra, dec, source), ``truth`` (``n_all``, ``n_scored``, ``sources``: list of ``ra``,
        ``dec``, ``mag``, ``bin``, ``scored``, ``matched`` {row: bool}), ``detector`` {row or ``hst``:
        sigma_filtered, sigma_pixel, minarea_px, pixel_scale_arcsec, kernel_shape, n}, ``rows`` {row:
        ``n_truth``, ``n_matched``, ``recall``, ``by_mag`` {bin: [n_truth, n_matched]}, ``n_detected``
        (in the region), ``n_spurious``, ``spurious_per_arcmin2``, ``median_offset_arcsec``,
        ``detections`` (ra, dec, scored, matched), ``info``}; with ``keep_images`` also ``_images``
        (for the figure, not written to JSON).
    """
    s_hst = pixel_scale_of(scene.hst_wcs)
    region = scored_region(scene)
    area = float(region.sum()) * s_hst**2 / 3600.0
    excl = {"exclude_radec": scene.qso_radec, "exclude_radius_arcsec": QSO_MASK_ARCSEC}
    truth = detect_truth(scene)
    mags = kron_magnitudes(truth, zeropoint=scene.hst_zeropoint)
    bins = _mag_bin(mags)
    t_scored = _in_region(region, truth.x, truth.y)
    # Isolated: no other HST source within ISOLATION_ARCSEC (where the HST image resolves what no
    # ground-based image can: close pairs and the knots of large galaxies).
    if len(truth.x) > 1:
        dd = np.hypot(truth.x[:, None] - truth.x[None], truth.y[:, None] - truth.y[None]) * s_hst
        np.fill_diagonal(dd, np.inf)
        t_isolated = dd.min(axis=1) > ISOLATION_ARCSEC
    else:
        t_isolated = np.ones(len(truth.x), bool)
    t_xy = np.column_stack([truth.x, truth.y])
    out_rows: dict[str, Any] = {}
    matched_by: dict[str, np.ndarray] = {}
    detector = {"hst": truth.meta}
    images = {"hst": (truth.image, scene.hst_wcs, truth)} if keep_images else None
    def score_row(name, det_ra, det_dec, info):
        m, d_scored = match_detections(scene, t_xy, region, det_ra, det_dec)
        spurious = d_scored & ~m["peak_matched"]
        tm = m["truth_matched"]
        matched_by[name] = tm
        sel = t_scored[m["truth_index"]]
        offsets = m["distance"][sel] * s_hst
        by_mag = {}
        for lab in [*mag_bin_labels(), "unknown"]:
            inbin = t_scored & (np.asarray(bins) == lab)
            if inbin.any() or lab != "unknown":
                by_mag[lab] = [int(inbin.sum()), int((inbin & tm).sum())]
        n_t, n_m = int(t_scored.sum()), int((t_scored & tm).sum())
        iso = t_scored & t_isolated
        out_rows[name] = {
            "n_truth": n_t, "n_matched": n_m, "recall": (n_m / n_t) if n_t else None, "by_mag": by_mag,
            "n_truth_isolated": int(iso.sum()), "n_matched_isolated": int((iso & tm).sum()),
            "n_detected": int(d_scored.sum()), "n_spurious": int(spurious.sum()),
            "spurious_per_arcmin2": float(spurious.sum()) / area if area > 0 else None,
            "median_offset_arcsec": float(np.median(offsets)) if len(offsets) else None,
            "detections": [{"ra": float(a), "dec": float(b), "scored": bool(sc), "matched": bool(mm)}
                           for a, b, sc, mm in zip(det_ra, det_dec, d_scored, m["peak_matched"])],
            "info": info,
        }

    for name, r in row_images(scene, enhancer).items():
        det = detect_sources(r["image"], r["wcs"], psf=r["psf"], valid=r["valid"], source=f"{scene.files.hsc} [{name}]",
                             **excl)
        detector[name] = det.meta
        score_row(name, det.ra, det.dec, r["info"])
        if keep_images:
            images[name] = (det.image, r["wcs"], det)
    if deblend is not None:
        # galgan deblend's catalog itself (the field job's steps, support tests included): its rows
        # are the detections, with the quasar's 1" left out as for the detector rows
        cols, summ, _, _ = deblend_file(scene.files.hsc, psf=scene.files.hsc_psf, enhancer=enhancer, noise=deblend)
        ra, dec = np.asarray(cols["coord_ra"]), np.asarray(cols["coord_dec"])
        keep = outside_quasar(scene, ra, dec)
        ra, dec = ra[keep], dec[keep]
        score_row("deblend", ra, dec, {k: summ[k] for k in ("rows", "unsupported_dropped", "psf_plan", "warnings")})
    sources = [{"ra": float(truth.ra[i]), "dec": float(truth.dec[i]),
                "mag": None if not np.isfinite(mags[i]) else float(mags[i]), "bin": bins[i],
                "scored": bool(t_scored[i]), "isolated": bool(t_isolated[i]),
                "matched": {k: bool(v[i]) for k, v in matched_by.items()}}
               for i in range(len(truth.x))]
    res = {
        "scene": scene.name, "dataset": scene.files.dataset,
        "files": {k: v for k, v in asdict(scene.files).items() if k in ("hsc", "hsc_psf", "hst", "hst_psf")},
        "area_arcmin2": area, "hsc_unit": scene.hsc_unit,
        "zeropoint": scene.hst_zeropoint, "zeropoint_source": scene.hst_zeropoint_source,
        "quasar": None if scene.qso_radec is None else {"ra": scene.qso_radec[0], "dec": scene.qso_radec[1],
                                                         "source": scene.qso_source},
        "truth": {"n_all": len(truth.x), "n_scored": int(t_scored.sum()), "sources": sources},
        "detector": detector, "rows": out_rows,
    }
    if keep_images:
        res["_images"] = images
        res["_region"] = region
    return res


# ----------------------------------------------------------------------------------------------
# Summing scenes
# ----------------------------------------------------------------------------------------------
def summarize(scenes: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums over scenes per row: ``n_scenes``, ``area_arcmin2``, ``n_truth``, ``n_matched``, ``recall``,
    ``recall_err`` (binomial standard error), ``by_mag`` {bin: {n_truth, n_matched, recall}},
    ``n_spurious``, ``spurious_per_scene``, ``spurious_per_arcmin2``, ``median_offset_arcsec``
    (median of the per-scene medians)."""
    n = len(scenes)
    area = float(sum(s["area_arcmin2"] for s in scenes))
    out: dict[str, Any] = {}
    for row in ROWS:
        rs = [s["rows"][row] for s in scenes if row in s["rows"]]
        if not rs:
            continue
        nt, nm = sum(r["n_truth"] for r in rs), sum(r["n_matched"] for r in rs)
        nti, nmi = sum(r["n_truth_isolated"] for r in rs), sum(r["n_matched_isolated"] for r in rs)
        p = nm / nt if nt else None
        labels = []
        for r in rs:
            labels += [k for k in r["by_mag"] if k not in labels]
        by_mag = {}
        for lab in labels:
            bt = sum(r["by_mag"].get(lab, [0, 0])[0] for r in rs)
            bm = sum(r["by_mag"].get(lab, [0, 0])[1] for r in rs)
            by_mag[lab] = {"n_truth": bt, "n_matched": bm, "recall": (bm / bt) if bt else None}
        nsp = sum(r["n_spurious"] for r in rs)
        offs = [r["median_offset_arcsec"] for r in rs if r["median_offset_arcsec"] is not None]
        out[row] = {
            "n_scenes": len(rs), "area_arcmin2": area, "n_truth": nt, "n_matched": nm, "recall": p,
            "n_truth_isolated": nti, "n_matched_isolated": nmi, "recall_isolated": (nmi / nti) if nti else None,
            "recall_err": math.sqrt(p * (1 - p) / nt) if nt else None, "by_mag": by_mag,
            "n_detected": sum(r["n_detected"] for r in rs), "n_spurious": nsp,
            "spurious_per_scene": nsp / len(rs), "spurious_per_arcmin2": nsp / area if area > 0 else None,
            "median_offset_arcsec": float(np.median(offs)) if offs else None,
        }
    return {"n_scenes": n, "area_arcmin2": area, "rows": out}


def settings() -> dict[str, Any]:
    """The benchmark's constants (module docstring), as written into the report."""
    return {"nsigma": NSIGMA, "minarea_arcsec2": MINAREA_ARCSEC2, "back_mesh_arcsec": BACK_MESH_ARCSEC,
            "back_filter": BACK_FILTER, "deblend_nthresh": DEBLEND_NTHRESH, "deblend_cont": DEBLEND_CONT,
            "clean": CLEAN, "psf_energy": PSF_ENERGY,
            "detection": "sep.extract on the matched-filter significance map (each image's own PSF, "
                         "its filtered sky RMS); positions = refined peaks of that map",
            "match_radius_arcsec": MATCH_RADIUS_ARCSEC, "matching": "one-to-one, Hungarian (galgan_ray.matching)",
            "qso_exclude_arcsec": QSO_EXCLUDE_ARCSEC, "qso_mask_arcsec": QSO_MASK_ARCSEC,
            "edge_margin_arcsec": EDGE_MARGIN_ARCSEC, "kron_min_radius_arcsec": KRON_MIN_RADIUS_ARCSEC,
            "isolation_arcsec": ISOLATION_ARCSEC,
            "mag_edges": list(MAG_EDGES), "hsc_bad_mask_planes": list(HSC_BAD_MASK_PLANES), "rows": list(ROWS)}


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def format_table(summary: dict[str, Any]) -> str:
    """The summed results as a Markdown table (one line per row)."""
    rows = summary["rows"]
    labels: list[str] = []
    for r in rows.values():
        labels += [k for k, b in r["by_mag"].items() if b["n_truth"] and k not in labels]
    order = [*mag_bin_labels(), "unknown"]
    labels.sort(key=order.index)
    head = ["row", "recall", "recall, isolated", *[f"i814 {lab}" for lab in labels], "spurious/scene",
            "spurious/arcmin²", "median offset \""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, f"{_fmt(r['recall'], '.3f')} ± {_fmt(r['recall_err'], '.3f')} ({r['n_matched']}/{r['n_truth']})",
                 f"{_fmt(r['recall_isolated'], '.2f')} ({r['n_matched_isolated']}/{r['n_truth_isolated']})"]
        for lab in labels:
            b = r["by_mag"].get(lab)
            cells.append("-" if not b or not b["n_truth"] else f"{b['recall']:.2f} ({b['n_matched']}/{b['n_truth']})")
        cells += [f"{r['spurious_per_scene']:.2f}", _fmt(r["spurious_per_arcmin2"], ".1f"),
                  _fmt(r["median_offset_arcsec"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_scene_table(scenes: list[dict[str, Any]]) -> str:
    head = ["scene", "area arcmin²", "HST truth", *[f"{r} matched / spurious" for r in ROWS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in scenes:
        cells = [s["scene"], f"{s['area_arcmin2']:.4f}", str(s["truth"]["n_scored"])]
        for r in ROWS:
            x = s["rows"].get(r)
            cells.append("-" if x is None else f"{x['n_matched']} / {x['n_spurious']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


_MARKERS = {"hsc": ("x", "tab:orange"), "bicubic": ("+", "tab:cyan"), "richardson_lucy": ("^", "tab:purple"),
            "enhanced": ("s", "tab:red"), "enhanced_ungated": ("1", "tab:pink"), "deblend": ("D", "tab:purple")}


def plot_examples(scenes: list[dict[str, Any]], out: Path, *, n: int = N_EXAMPLES) -> Path | None:
    """HSC | enhanced | HST for ``n`` scenes spread over the ranking by scored truth: HST truth as circles of
    the matching radius (solid: scored, dotted: outside the region), the scored region's outline, and
    each row's detections (HSC panel: hsc, bicubic, richardson_lucy; enhanced panel: enhanced)."""
    from galgan_ray.figures import _plt, asinh_display

    have = [s for s in scenes if "_images" in s]
    if not have:
        return None
    # n scenes evenly spread over the ranking by scored HST sources (the most crowded to the sparsest).
    ranked = sorted(have, key=lambda s: (-s["truth"]["n_scored"], _scene_key(s["scene"])))
    idx = sorted({round(i * (len(ranked) - 1) / max(n - 1, 1)) for i in range(min(n, len(ranked)))})
    pick = [ranked[i] for i in idx]
    plt = _plt()
    fig, axes = plt.subplots(len(pick), 3, figsize=(11.5, 3.9 * len(pick)), squeeze=False)
    for irow, s in enumerate(pick):
        ims = s["_images"]
        panels = [("hsc", ["hsc", "bicubic", "richardson_lucy"]), ("enhanced", ["enhanced", "deblend"]), ("hst", [])]
        hst_wcs = ims["hst"][1]
        for icol, (key, rows) in enumerate(panels):
            rows = [r for r in rows if r in s["rows"]]  # hsc_hst_pairs has no deblend row
            ax = axes[irow, icol]
            img, wcs, det = ims[key]
            ax.imshow(asinh_display(img, noise=det.sigma_pixel), origin="lower", cmap="gray_r", interpolation="nearest")
            scale = pixel_scale_of(wcs)
            # region outline: HST-grid mask -> this panel via its corners' sky positions
            reg = s["_region"]
            ny, nx = reg.shape
            yy, xx = np.mgrid[:ny:4, :nx:4]
            rx, ry = wcs.world_to_pixel_values(*hst_wcs.pixel_to_world_values(xx, yy))
            ax.contour(rx, ry, reg[::4, ::4].astype(float), levels=[0.5], colors="tab:blue", linewidths=0.8)
            for src in s["truth"]["sources"]:
                tx, ty = wcs.world_to_pixel_values(src["ra"], src["dec"])
                ax.add_patch(plt.Circle((tx, ty), MATCH_RADIUS_ARCSEC / scale, fill=False, color="lime",
                                        lw=1.0, ls="-" if src["scored"] else ":"))
            for r in rows:
                dets = s["rows"][r]["detections"]
                if not dets:
                    continue
                px, py = wcs.world_to_pixel_values(np.array([d["ra"] for d in dets]),
                                                   np.array([d["dec"] for d in dets]))
                mk, col = _MARKERS[r]
                style = {"facecolors": "none", "edgecolors": col} if mk in "s^" else {"c": col}
                ax.scatter(px, py, marker=mk, s=28, linewidths=1.0, label=r, **style)
            h, w = img.shape
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(-0.5, h - 0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if key == "hst":
                title = f"HST F814W ({s['truth']['n_scored']} scored sources)"
            else:
                title = ", ".join(f"{r} {s['rows'][r]['n_matched']}/{s['rows'][r]['n_truth']} "
                                  f"({s['rows'][r]['n_spurious']} spur.)" for r in rows)
                title = ("HSC i: " if key == "hsc" else "enhanced: ") + title
            ax.set_title(title, fontsize=7.5)
            if rows:
                ax.legend(loc="lower left", fontsize=6.5, framealpha=0.6)
        axes[irow, 0].set_ylabel(f"scene {s['scene']}", fontsize=9)
    fig.suptitle(f"Real sky: HST truth (green circles, r = {MATCH_RADIUS_ARCSEC}\"; dotted: not scored), "
                 f"scored region (blue)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def write_outputs(out_dir: Path, report: dict[str, Any], scenes_full: list[dict[str, Any]]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"report": out_dir / "report.json", "table": out_dir / "table.md",
             "figure": out_dir / "real_sky_examples.png"}
    with open(paths["report"], "w") as fh:
        json.dump(report, fh, indent=1, default=_json_default)
    s = report["settings"]
    md = [f"# Real-sky benchmark ({report['dataset']})", "",
          (f"Model `{report['model']}` (sha256 {str(report.get('model_sha256'))[:12]}), "
          f"{report['summary']['n_scenes']} scenes, {report['summary']['area_arcmin2']:.3f} arcmin² scored, "
          f"{len(report['failures'])} failed. Truth: HST F814W sources (sep, {s['nsigma']:g} sigma, matched "
          f"filter), in the HST-HSC overlap shrunk by {s['edge_margin_arcsec']}\", more than "
          f"{s['qso_exclude_arcsec']}\" from the quasar; matched one to one within {s['match_radius_arcsec']}\" "
          f"(Hungarian). Generated by `bench/real_sky.py`."), "", format_table(report["summary"]), "",
          "## Per scene", "", format_scene_table(report["scenes"]), ""]
    if report["failures"]:
        md += ["## Failures", ""] + [f"- {f['scene']}: {f['error']}" for f in report["failures"]] + [""]
    paths["table"].write_text("\n".join(md))
    if plot_examples(scenes_full, paths["figure"]) is None:
        paths.pop("figure")
    return paths


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def run(data_dir: str | Path, *, model: str = "default", limit: int | None = None, keep_images: bool = True,
        device: str | None = None, log=print) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score every scene of ``data_dir`` (the first ``limit``): ``(report, scenes with images)``.

    ``report`` holds ``dataset``, ``data``, ``model``, ``model_sha256``, ``settings``, ``provenance``,
    ``scenes`` (:func:`score_scene` each, without images), ``summary`` (:func:`summarize`),
    ``failures`` (list of ``scene``, ``error``), ``runtime_s``.

    Raises
    ------
    InputError
        No scenes in ``data_dir`` or an unusable model.
    """
    t0 = time.perf_counter()
    files = find_scenes(data_dir)
    if limit is not None:
        files = files[:max(int(limit), 0)]
    enhancer = Enhancer(model, device=device)
    # galgan deblend's noise model, calibrated once (as the command does per run)
    noise = (enhancer_noise_scale(enhancer, default_field_config())
             if files and files[0].dataset == "hsc_hst_qso_fields" else None)
    full, failures = [], []
    for i, sf in enumerate(files):
        t1 = time.perf_counter()
        try:
            res = score_scene(read_scene(sf), enhancer, keep_images=keep_images, deblend=noise)
        except InputError as exc:
            failures.append({"scene": sf.name, "error": str(exc)})
            log(f"scene {sf.name}: FAILED: {exc}")
            continue
        full.append(res)
        r = res["rows"]
        log(f"scene {sf.name} ({i + 1}/{len(files)}, {time.perf_counter() - t1:.1f} s): truth "
            f"{res['truth']['n_scored']} | "
            + "  ".join(f"{k} {v['n_matched']}/{v['n_truth']} sp {v['n_spurious']}" for k, v in r.items()))
    scenes = [{k: v for k, v in s.items() if not k.startswith("_")} for s in full]
    dataset = files[0].dataset if files else "unknown"
    report = {"dataset": dataset, "data": str(data_dir), "model": str(model), "checkpoint": enhancer.checkpoint,
              "model_sha256": enhancer.meta.get("sha256"), "settings": settings(),
              "provenance": provenance(model=str(model)), "scenes": scenes, "summary": summarize(scenes),
              "failures": failures, "runtime_s": time.perf_counter() - t0}
    return report, full


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="hsc_hst_qso_fields or hsc_hst_pairs folder")
    ap.add_argument("--model", default="default", help="model alias or checkpoint path")
    ap.add_argument("--out", default=str(REPO / "docs" / "real_sky"), help="output folder")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N scenes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default=None, help="torch device for the model (default: cuda if available)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not Path(args.data).is_dir():
        print(f"real_sky: data folder {args.data} not found (the real HSC/HST scenes live in ../shared/data, "
              f"absent on a fresh clone); pass --data DIR", file=sys.stderr)
        return 2
    try:
        report, full = run(args.data, model=args.model, limit=args.limit, device=args.device)
    except InputError as exc:
        print(f"real_sky: {exc}", file=sys.stderr)
        return 2
    paths = write_outputs(Path(args.out), report, full)
    print()
    print(format_table(report["summary"]))
    print(f"\n{report['summary']['n_scenes']} scenes scored, {len(report['failures'])} failed, "
          f"{report['runtime_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if report["summary"]["n_scenes"] else 1


if __name__ == "__main__":
    sys.exit(main())
