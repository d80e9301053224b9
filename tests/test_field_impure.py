"""bench/field_impure.py: the HR-support measures of impure field rows (synthetic images, < 1 s)."""

import numpy as np
import pytest
from conftest import load_bench
from scipy import ndimage

fi = load_bench("field_impure")
SCALE = 0.06


def _disk(n=161, hlr_px=30.0, flux=30000.0):
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(xx - n // 2, yy - n // 2)
    img = np.exp(-1.678 * r / hlr_px)
    return flux * img / img.sum(), xx, yy


def test_a_knot_on_a_disk_is_a_prominent_peak_with_its_own_flux_and_smooth_disk_is_not():
    disk, xx, yy = _disk()
    kx, ky, kflux = 110.0, 80.0, 400.0
    knot = np.exp(-0.5 * ((xx - kx) ** 2 + (yy - ky) ** 2) / 1.2**2)
    knot *= kflux / knot.sum()
    rng = np.random.default_rng(3)
    noise = 0.05
    with_knot = disk + knot + rng.normal(0, noise, disk.shape)
    plain = disk + rng.normal(0, noise, disk.shape)
    for img, expect_peak in ((with_knot, True), (plain, False)):
        sm = ndimage.gaussian_filter(img, fi.SMOOTH_SIGMA_PX)
        sm_noise = noise / (2 * np.sqrt(np.pi) * fi.SMOOTH_SIGMA_PX)  # white noise through the Gaussian
        sig = fi.hr_peak_sigma(sm, sm_noise, kx + 1.0, ky - 1.0, scale=SCALE)
        exc = fi.hr_excess(img, kx, ky, scale=SCALE)
        if expect_peak:
            assert sig > 20 * fi.HR_PEAK_SIGMA
            assert exc == pytest.approx(kflux, rel=0.1)  # the knot's flux, not the disk's under it
        else:
            assert sig < fi.HR_PEAK_SIGMA
            assert abs(exc) < 0.1 * kflux


def test_a_field_output_without_hr_tiles_is_refused_by_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    for name in ("catalog", "truth"):
        (tmp_path / name).mkdir()
        pq.write_table(pa.table({"coord_ra": [1.0], "coord_dec": [2.0]}), tmp_path / name / "part.parquet")
    with pytest.raises(FileNotFoundError, match="input"):
        fi.analyse(tmp_path)
