"""The paper's data, end to end: sky (simulated or a real mosaic + catalog) -> cuts -> dec split ->
64x64 cutouts -> HSC-like counterparts -> blends and isolated galaxies with truth -> shards.

Everything here composes the pure stage modules (:mod:`sky`, :mod:`catalog`, :mod:`cutouts`,
:mod:`degrade`, :mod:`blends`, :mod:`shards`); the ``galgan make-*`` commands and ``jobs/`` call it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import sep
from astropy.io import fits
from astropy.table import vstack
from astropy.wcs import WCS
from scipy import ndimage

from .blends import BlendConfig, simulate_blends, simulate_isolated
from .catalog import CatalogColumns, SelectionConfig, read_catalog, select_galaxies, split_by_dec
from .config import from_dict, to_dict
from .cutouts import cut_cutouts, draw_real_galaxies
from .degrade import DegradeConfig
from .errors import ConfigError, InputError
from .instrument import BandConfig, get_band
from .provenance import provenance
from .shards import read_shards, write_shards
from .sky import SkyConfig, write_sky

__all__ = ["BandsConfig", "DatasetConfig", "SkySampleConfig", "band_from_key", "make_sky_tiles", "build_galaxy_sets",
           "real_galaxy_set", "make_blend_set", "make_training_pairs", "concat_batches", "write_blend_set",
           "read_blend_set", "take_rows", "clean_neighbours", "simulated_galaxy_sets"]

log = logging.getLogger(__name__)


def band_from_key(key: str) -> BandConfig:
    """``"hst/F775W"`` -> the built-in :class:`BandConfig`."""
    if "/" not in key:
        raise ConfigError(f"band {key!r}", "expected survey/name, e.g. hst/F775W or hsc/i")
    survey, name = key.split("/", 1)
    return get_band(survey, name)


@dataclass(frozen=True)
class BandsConfig:
    """Which HR bands become which LR bands, by ``survey/name`` key (channel order)."""

    high: tuple[str, ...] = ("hst/F775W",)
    low: tuple[str, ...] = ("hsc/i",)

    def __post_init__(self):
        if len(self.high) != len(self.low) or not self.high:
            raise ConfigError("bands", f"high and low need the same non-zero length: {self.high} vs {self.low}")

    @property
    def high_names(self) -> tuple[str, ...]:
        return tuple(k.split("/", 1)[1] for k in self.high)

    def degrade_config(self, **options: Any) -> DegradeConfig:
        """The :class:`DegradeConfig` for these bands (``options`` set its other fields)."""
        return DegradeConfig(high=tuple(band_from_key(k) for k in self.high),
                             low=tuple(band_from_key(k) for k in self.low), **options)


@dataclass(frozen=True)
class DatasetConfig:
    """Everything that defines a data set made from a sky (simulated here, or a user's mosaic).

    Attributes
    ----------
    seed : int
        Master seed: sky tiles use ``seed + k``, cutouts/blends derive theirs from it.
    bands : BandsConfig
    sky_size_arcsec : float
        Side of one simulated sky tile.
    n_sky_tiles : int
        Tiles stacked in declination (the dec split then puts the southern ones in the test set).
    ra_center_deg, dec_center_deg : float
        Centre of the first (southernmost) tile (GOODS-S by default).
    selection : SelectionConfig
        The paper's cuts.
    test_fraction : float
        Southernmost share of the selected galaxies used for testing.
    clean_neighbours : bool
        Replace neighbouring objects in the cutouts by noise (:func:`clean_neighbours`), so blends
        hold only the galaxies their truth lists.
    add_noise : bool
        Draw the simulated sky with its sky noise (default). ``False`` draws the same galaxies
        noise-free (``SKYSIGMA = 0``): what the HST-like image would show without noise
        (``bench/check_false_positives.py``).
    blends : BlendConfig
    n_blends, n_isolated : int
        Blends and isolated galaxies made from the test galaxies.
    """

    seed: int = 0
    bands: BandsConfig = field(default_factory=BandsConfig)
    sky_size_arcsec: float = 60.0
    n_sky_tiles: int = 1
    ra_center_deg: float = 53.12
    dec_center_deg: float = -27.85
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    test_fraction: float = 0.2
    clean_neighbours: bool = True
    add_noise: bool = True
    blends: BlendConfig = field(default_factory=lambda: BlendConfig(exclude_flags=("EDGE",)))
    n_blends: int = 200
    n_isolated: int = 100


@dataclass(frozen=True)
class SkySampleConfig:
    """The galaxies a run takes from the simulated sky and how it blends them: what the training data
    (:class:`galgan_ray.training_job.TrainDataConfig`) and the benchmark
    (:class:`galgan_ray.evaluation.EvalSpec`) share. They inherit these keys (their YAML stays flat) and
    set their own defaults of ``seed``, ``n_sky_tiles`` and ``blends``.

    Attributes
    ----------
    seed : int
        Sky tiles ``seed + k``; cleaning, blends and noise derive their seeds from it.
    bands : BandsConfig
    sky_size_arcsec, n_sky_tiles : float, int
        ``n_sky_tiles`` tiles of ``sky_size_arcsec`` squared (about 90 galaxies/arcmin^2 pass the cuts).
    selection : SelectionConfig
    clean_neighbours : bool
        Replace neighbours in the cutouts by noise (:func:`clean_neighbours`).
    blends : BlendConfig
        Separation distribution etc. of the blends.
    match_radius_arcsec : float
        Radius within which a peak is matched to a galaxy's true position (Hungarian matching), and of
        the high-resolution cut below.
    min_high_significance : float
        Keep only galaxies that the high-resolution image detects on their own: the matched-filter
        significance of the HR cutout (:func:`galgan_ray.evaluation.select_detectable`) must reach this
        within ``match_radius_arcsec`` of the galaxy's centre. 0 keeps every galaxy that passes
        ``selection``.
    """

    seed: int = 0
    bands: BandsConfig = field(default_factory=BandsConfig)
    sky_size_arcsec: float = 60.0
    n_sky_tiles: int = 1
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    clean_neighbours: bool = True
    blends: BlendConfig = field(default_factory=lambda: BlendConfig(exclude_flags=("EDGE",)))
    match_radius_arcsec: float = 0.3
    min_high_significance: float = 0.0

    def dataset_config(self, **options: Any) -> DatasetConfig:
        """The :class:`DatasetConfig` of this sample's sky (``options`` set its other fields)."""
        return DatasetConfig(seed=self.seed, bands=self.bands, sky_size_arcsec=self.sky_size_arcsec,
                             n_sky_tiles=self.n_sky_tiles, selection=self.selection, **options)


def make_sky_tiles(config: DatasetConfig, out_dir: str | Path) -> list[dict[str, Path]]:
    """Simulate ``n_sky_tiles`` CANDELS-like tiles, north of each other, and write them as FITS.

    Returns
    -------
    list of dict
        Per tile: band name -> mosaic path, and ``"catalog"`` -> catalog path.
    """
    tiles = []
    step_deg = config.sky_size_arcsec / 3600.0
    for k in range(config.n_sky_tiles):
        sky = SkyConfig(seed=config.seed + k, size_arcsec=config.sky_size_arcsec,
                        ra_center_deg=config.ra_center_deg, dec_center_deg=config.dec_center_deg + k * step_deg,
                        bands=config.bands.high_names, reference_band=config.bands.high_names[0],
                        add_noise=config.add_noise)
        tiles.append(write_sky(sky, Path(out_dir) / f"tile_{k:03d}"))
    return tiles


def simulated_galaxy_sets(config: DatasetConfig, *, work_dir: str | Path
                          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Simulated sky tiles written under ``work_dir/sky``, then :func:`build_galaxy_sets` with the
    config's bands, selection and test fraction (cutouts not yet cleaned of neighbours)."""
    tiles = make_sky_tiles(config, Path(work_dir) / "sky")
    return build_galaxy_sets(tiles, bands=config.bands, selection=config.selection,
                             test_fraction=config.test_fraction)


def _read_mosaic_wcs(path: str | Path):
    with fits.open(path) as hdul:
        for hdu in hdul:
            if hdu.data is not None and hdu.header.get("NAXIS", 0) >= 2:
                w = WCS(hdu.header)
                if not w.has_celestial:
                    raise InputError(str(path), "has no celestial WCS (CTYPE/CRVAL/CD keywords)")
                return w.celestial
    raise InputError(str(path), "holds no image HDU")


def build_galaxy_sets(tiles: Sequence[Mapping[str, str | Path]], *, bands: BandsConfig,
                      columns: CatalogColumns = CatalogColumns(), selection: SelectionConfig = SelectionConfig(),
                      test_fraction: float = 0.2, dec_split_deg: float | None = None,
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Galaxy sets (train, test) from mosaics + catalogs: cuts, declination split, 64x64 cutouts.

    The same path serves the built-in sky and a real survey (e.g. CANDELS GOODS-S ACS mosaics with
    the Guo et al. 2013 catalog, through a :class:`CatalogColumns` mapping).

    Parameters
    ----------
    tiles : sequence of mapping
        Per tile: HR band name (e.g. ``F775W``) -> mosaic FITS, and ``catalog`` -> catalog file.

    Returns
    -------
    train, test : dict
        Galaxy sets (see docs/ARCHITECTURE.md).
    info : dict
        ``selection_counts`` (what each cut removed), ``dec_split_deg``, ``cutout_counts`` per tile
        (kept, edge, off_mosaic, ...), ``bands``, ``band_configs``, ``provenance``.
    """
    names = bands.high_names
    cats = []
    for k, tile in enumerate(tiles):
        if "catalog" not in tile:
            raise InputError(f"tile {k}", "has no 'catalog' entry")
        missing = [b for b in names if b not in tile]
        if missing:
            raise InputError(f"tile {k}", f"has no mosaic for band(s) {missing}")
        t = read_catalog(tile["catalog"], columns=columns)
        t["tile"] = np.full(len(t), k)
        cats.append(t)
    catalog = vstack(cats, metadata_conflicts="silent")
    selected, counts = select_galaxies(catalog, cuts=selection)
    split = split_by_dec(selected, dec_split_deg=dec_split_deg, test_fraction=test_fraction)
    band_configs = {b.name: b for b in bands.degrade_config().high}
    sets, tile_counts = {"train": [], "test": []}, []
    meta0 = None
    for k, tile in enumerate(tiles):
        mosaics = {b: tile[b] for b in names}
        wcs = _read_mosaic_wcs(mosaics[names[0]])
        for part, table in (("train", split.train), ("test", split.test)):
            rows = table[table["tile"] == k]
            if len(rows) == 0:
                continue
            gs, meta = cut_cutouts(mosaics, wcs, rows, band_configs=band_configs)
            meta0 = meta0 or meta
            tile_counts.append({"tile": k, "part": part, **meta["counts"]})
            sets[part].append(gs)
    train, test = (concat_batches(sets[p]) if sets[p] else {} for p in ("train", "test"))
    info = {"selection_counts": counts, "dec_split_deg": float(split.dec_split_deg),
            "n_train": len(train.get("objectId", [])), "n_test": len(test.get("objectId", [])),
            "cutout_counts": tile_counts, "bands": list(bands.high),
            "band_configs": (meta0 or {}).get("band_configs"), "provenance": provenance()}
    return train, test, info


def real_galaxy_set(catalog_file: str | Path, *, band: str = "hst/F814W", seed: int = 0,
                    **options: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Galaxy set from real HST stamps in GalSim ``RealGalaxyCatalog`` format (any directory)."""
    return draw_real_galaxies(catalog_file, band=band_from_key(band), seed=seed, **options)


def concat_batches(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate batches row-wise (keys of the first batch)."""
    keys = list(batches[0])
    return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in keys}


def take_rows(batch: Mapping[str, np.ndarray], index) -> dict[str, np.ndarray]:
    """Rows ``index`` of every column of a batch."""
    return {k: np.asarray(v)[index] for k, v in batch.items()}


def make_blend_set(galaxies: Mapping[str, np.ndarray], *, bands: BandsConfig, blends: BlendConfig,
                   n_blends: int, n_isolated: int, seed: int) -> dict[str, Any]:
    """Blends and isolated galaxies, degraded, with their truth tables.

    Returns
    -------
    dict
        ``blend_batch``, ``blends``, ``sources`` (blends); ``isolated_batch``, ``isolated``,
        ``isolated_sources`` (single galaxies, for false-positive rates); ``degrade_config``.
    """
    degrade_config = bands.degrade_config()
    out: dict[str, Any] = {"degrade_config": degrade_config}
    if n_blends:
        out["blend_batch"], out["blends"], out["sources"] = simulate_blends(
            dict(galaxies), config=blends, degrade_config=degrade_config, n_blends=n_blends, seed=seed)
    if n_isolated:
        out["isolated_batch"], out["isolated"], out["isolated_sources"] = simulate_isolated(
            dict(galaxies), config=blends, degrade_config=degrade_config, n=n_isolated, seed=seed,
            first_id=10**7)
    return out


def make_training_pairs(galaxies: Mapping[str, np.ndarray], *, bands: BandsConfig, blends: BlendConfig,
                        n_pairs: int, blend_fraction: float = 0.6, seed: int = 0) -> dict[str, np.ndarray]:
    """(LR, HR) training pairs: a mix of blends and isolated galaxies with random shifts/rotations.

    Returns
    -------
    dict
        ``image_lr`` (N, C, 22, 22), ``image_hr`` (N, C, 64, 64), ``sigma_lr`` (N, C) -- the keys
        :func:`galgan_ray.training.train_srgan` reads -- shuffled.
    """
    n_b = int(round(n_pairs * blend_fraction))
    made = make_blend_set(galaxies, bands=bands, blends=replace(blends, rotation="arbitrary"),
                          n_blends=n_b, n_isolated=n_pairs - n_b, seed=seed)
    keys = ("image_lr", "image_hr", "sigma_lr")
    parts = [take_rows(made[k], slice(None)) for k in ("blend_batch", "isolated_batch") if k in made]
    pairs = concat_batches([{k: p[k] for k in keys} for p in parts])
    order = np.random.default_rng([seed, 7]).permutation(len(pairs["image_lr"]))
    return take_rows(pairs, order)


def _table_batch(table: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in table.items()}


def write_blend_set(made: Mapping[str, Any], url: str, *, metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write a :func:`make_blend_set` result as Parquet shards under ``url`` (one folder per part)."""
    meta = dict(metadata or {})
    meta.setdefault("degrade_config", to_dict(made["degrade_config"]))
    written = {}
    for key in ("blend_batch", "blends", "sources", "isolated_batch", "isolated", "isolated_sources"):
        if key in made:
            write_shards(_table_batch(made[key]), f"{url.rstrip('/')}/{key}", metadata=meta)
            written[key] = f"{url.rstrip('/')}/{key}"
    return written


def read_blend_set(url: str) -> dict[str, Any]:
    """Inverse of :func:`write_blend_set` (the ``degrade_config`` comes back rebuilt from metadata)."""
    out: dict[str, Any] = {}
    meta = None
    for key in ("blend_batch", "blends", "sources", "isolated_batch", "isolated", "isolated_sources"):
        try:
            out[key], meta = read_shards(f"{url.rstrip('/')}/{key}")
        except InputError:
            continue
    if meta is None:
        raise InputError(url, "holds no blend set (no blend_batch/ or isolated_batch/ shards)")
    out["degrade_config"] = from_dict(DegradeConfig, meta["degrade_config"])
    out["metadata"] = meta
    return out


def clean_neighbours(galaxies: Mapping[str, np.ndarray], *, nsigma: float = 1.5, dilate_px: int = 2,
                     seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Replace neighbouring objects in each cutout by noise, keeping the central galaxy.

    Cutouts from a mosaic hold the neighbours of their galaxy. Blends built from them would then
    hold unlisted galaxies that count as spurious peaks, so (as for GalSim's cleaned COSMOS stamps)
    every segment detected by sep that does not contain the cutout centre is replaced, after
    dilation, by Gaussian noise at the stamp's ``sigma_hr``.

    Returns
    -------
    cleaned : dict
        The galaxy set with ``image_hr`` cleaned (other columns unchanged).
    n_pixels : numpy.ndarray
        Pixels replaced per cutout (int).
    """
    image = np.array(galaxies["image_hr"], dtype=np.float32, copy=True)
    n, c, h, w = image.shape
    sigma = np.asarray(galaxies.get("sigma_hr", np.full((n, c), np.nan)), dtype=np.float64).reshape(n, c)
    replaced = np.zeros(n, dtype=np.int64)
    cy, cx = (h - 1) // 2, (w - 1) // 2
    for i in range(n):
        detect = np.ascontiguousarray(image[i].sum(axis=0), dtype=np.float32)
        s = np.sqrt(np.nansum(sigma[i] ** 2))
        if not np.isfinite(s) or s <= 0:
            s = 1.4826 * np.median(np.abs(detect - np.median(detect)))
        if not s > 0:
            continue
        try:
            _, seg = sep.extract(detect, nsigma, err=float(s), segmentation_map=True, minarea=5,
                                 deblend_cont=0.005)
        except Exception:  # sep gives up on pathological stamps: keep the stamp as it is
            continue
        centre_label = seg[cy, cx]
        if centre_label == 0:  # the galaxy sits below threshold at the very centre: take the nearest segment
            labels = seg[cy - 2:cy + 3, cx - 2:cx + 3]
            centre_label = labels[labels > 0][0] if (labels > 0).any() else 0
        others = (seg > 0) & (seg != centre_label)
        if not others.any():
            continue
        others = ndimage.binary_dilation(others, iterations=dilate_px) & (seg != centre_label) if centre_label else \
            ndimage.binary_dilation(others, iterations=dilate_px)
        rng = np.random.default_rng([seed, i])
        for b in range(c):
            sb = sigma[i, b] if np.isfinite(sigma[i, b]) and sigma[i, b] > 0 else s / np.sqrt(c)
            image[i, b][others] = rng.normal(0.0, sb, size=int(others.sum()))
        replaced[i] = int(others.sum())
    out = dict(galaxies)
    out["image_hr"] = image
    return out, replaced
